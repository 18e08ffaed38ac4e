"""`fluxexport quantize`: calibrate, fake-quantize the transformer's block Linears, export a standard Q/DQ graph."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from onnx_ir.tensor_adapters import TorchTensor

from fluxexport.atomic import write_text_atomic
from fluxexport.backends.torch_backend import TorchBackend
from fluxexport.dtypes import ELEMENT_TORCH, torch_dtype
from fluxexport.errors import FluxExportError
from fluxexport.export.graph import replace_with_initializer
from fluxexport.export.manifest import now, write_manifest
from fluxexport.export.onnx_export import DEFAULT_OPSET, export_component, manifest_entry, open_manifest
from fluxexport.models.adapters import TransformerWrapper
from fluxexport.models.loaders import load_transformer
from fluxexport.models.source import ModelSource
from fluxexport.quantize.calibrate import KEEP_HIGH_PRECISION, CalibrationSettings, calibrate, fake_quantize
from fluxexport.quantize.fp8 import E4M3_MAX, TRANSLATIONS, quantize_e4m3
from fluxexport.specs import ExportBounds, component_specs

CALIBRATION_FILE = "calibration.json"
MIN_QDQ_OPSET = 19  # FLOAT8E4M3FN in QuantizeLinear / DequantizeLinear


def fake_quantized_transformer(source: ModelSource, amax: dict[str, float], dtype: str = "fp32") -> TransformerWrapper:
    """The PyTorch reference of the Q/DQ graph: the transformer with its block Linears in FP8 fake quantization."""
    model = fake_quantize(load_transformer(source, torch_dtype(dtype)), amax)
    return TransformerWrapper(model, source.guidance_embeds).eval()


CALIBRATION_FORMAT = "fp8_e4m3_per_tensor"


def store_weights_in_fp8(model) -> str | None:
    """Quantize every constant weight's QuantizeLinear at export time: the FLOAT8E4M3FN result becomes the
    initializer DequantizeLinear reads (TensorRT's explicit quantization takes pre-quantized weights), so the
    graph stores FP8 weights — a quarter of fp32, half of bf16 — and computes exactly what Q→DQ did.

    The rounding is the fake quantizer's (x / scale in the weight's dtype, saturated to ±448, nearest-even
    cast), which is also QuantizeLinear's with saturate=1."""
    import onnx_ir as ir

    graph, stored = model.graph, 0
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or not node.inputs[0].is_initializer():
            continue
        weight, scale = (ir.convenience.get_const_tensor(value) for value in node.inputs[:2])
        if weight is None or scale is None:
            continue
        values = torch.from_numpy(weight.numpy().astype("float32")).to(ELEMENT_TORCH[weight.dtype.name.lower()])
        quantized = quantize_e4m3(values, torch.from_numpy(scale.numpy().astype("float32")))
        replace_with_initializer(graph, node, TorchTensor(quantized, node.outputs[0].name))
        stored += 1
    return f"{stored} weights stored as FLOAT8E4M3FN (DequantizeLinear only)" if stored else None


def write_calibration(
    out_dir: Path, source: ModelSource, settings: CalibrationSettings, amax: dict[str, float]
) -> Path:
    record = {
        "format": CALIBRATION_FORMAT,
        "model": {"name": source.name, "fingerprint": source.fingerprint()},
        "prompts": len(settings.prompts),
        "prompts_sha256": hashlib.sha256("\n".join(settings.prompts).encode()).hexdigest(),
        "steps": settings.steps,
        "height": settings.height,
        "width": settings.width,
        "kept_high_precision": list(KEEP_HIGH_PRECISION),
        "input_amax": dict(sorted(amax.items())),
        "input_scale": {name: value / E4M3_MAX for name, value in sorted(amax.items())},
        "calibrated_at": now(),
    }
    return write_text_atomic(out_dir / CALIBRATION_FILE, json.dumps(record, indent=2) + "\n")


def read_calibration(path: Path, source: ModelSource) -> tuple[dict[str, float], dict]:
    """(input amax per layer, the record) of an earlier `calibration.json`, refused unless it was made for
    this checkpoint: scales of another model would quantize silently wrong."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except OSError as error:
        raise FluxExportError(f"cannot read calibration {path}: {error.strerror} (--calibration)") from None
    except json.JSONDecodeError as error:
        raise FluxExportError(f"{path} is not valid JSON ({error.msg}): calibrate again (drop --calibration)") from None
    if record.get("format") != CALIBRATION_FORMAT or "input_amax" not in record:
        raise FluxExportError(f"{path} is not a fluxexport FP8 calibration: calibrate again (drop --calibration)")
    made_for = record.get("model", {})
    if made_for.get("fingerprint") != source.fingerprint():
        raise FluxExportError(
            f"{path} was calibrated on {made_for.get('name', 'an unrecorded model')!r}, not on {source.name!r} "
            "(checkpoint fingerprints differ): calibrate again (drop --calibration)"
        )
    return {name: float(value) for name, value in record["input_amax"].items()}, record


def quantize_transformer(
    source: ModelSource,
    out_dir: Path,
    settings: CalibrationSettings | None = None,
    base_dtype: str = "bf16",
    opset: int = DEFAULT_OPSET,
    bounds: ExportBounds | None = None,
    external_data: bool | None = None,
    calibration_device: str | None = None,
    on_prompt: Callable[[int, int], None] | None = None,
    calibration_file: Path | None = None,
) -> dict:
    """Calibrate on our runtime's trajectories, then export `out_dir/transformer.onnx` as an FP8 Q/DQ graph.

    The graph keeps the transformer's contract; its non-quantized math is in `base_dtype` (bf16 for TensorRT,
    fp32 to run it in ONNX Runtime on CPU). With `calibration_file` (an earlier `calibration.json` of the same
    checkpoint) no model runs: its scales are reused."""
    if base_dtype not in ("bf16", "fp32", "fp16"):
        raise FluxExportError(f"unknown base dtype {base_dtype!r}: choose bf16, fp16 or fp32 (--dtype)")
    if opset < MIN_QDQ_OPSET:
        raise FluxExportError(f"FP8 Q/DQ needs opset ≥ {MIN_QDQ_OPSET}, got {opset} (--opset)")
    settings = settings or CalibrationSettings()
    out_dir = Path(out_dir)
    bounds = bounds or ExportBounds.for_model(source)
    if calibration_file is not None:
        amax, _ = read_calibration(calibration_file, source)
    else:  # in float32: the scales then do not depend on where calibration ran
        with TorchBackend(source, "fp32", calibration_device) as backend:
            amax = calibrate(backend, source, settings, on_prompt)
    module = fake_quantized_transformer(source, amax, base_dtype)
    spec = component_specs(source, bounds)["transformer"]
    quantized = sum(1 for _ in amax)
    exported = export_component(
        source, spec, out_dir, base_dtype, opset, external_data, module=module, translations=TRANSLATIONS,
        notes=[f"FP8 E4M3 per-tensor Q/DQ on {quantized} block Linear layers; kept in {base_dtype}: "
               + ", ".join(KEEP_HIGH_PRECISION)],
        graph_pass=store_weights_in_fp8,
    )  # fmt: skip
    if calibration_file is not None and Path(calibration_file).resolve() == (out_dir / CALIBRATION_FILE).resolve():
        calibration = out_dir / CALIBRATION_FILE  # reused in place: kept as it is
    elif calibration_file is not None:
        calibration = write_text_atomic(out_dir / CALIBRATION_FILE, Path(calibration_file).read_text())
    else:
        calibration = write_calibration(out_dir, source, settings, amax)
    manifest = open_manifest(source, out_dir, base_dtype, bounds)
    entry = manifest_entry(spec, exported, opset) | {
        "dtype": "fp8",
        "base_dtype": base_dtype,
        "quantization": {"format": "fp8_e4m3", "layers": quantized, "calibration": calibration.name},
    }
    manifest["components"]["transformer"] = entry
    write_manifest(out_dir, manifest)
    return entry
