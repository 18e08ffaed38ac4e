"""`fluxexport quantize`: calibrate, fake-quantize the transformer's block Linears, export a standard Q/DQ graph."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from fluxexport.atomic import write_text_atomic
from fluxexport.backends.torch_backend import TorchBackend
from fluxexport.dtypes import torch_dtype
from fluxexport.errors import FluxExportError
from fluxexport.export.manifest import now, write_manifest
from fluxexport.export.onnx_export import DEFAULT_OPSET, export_component, manifest_entry, open_manifest
from fluxexport.models.adapters import TransformerWrapper
from fluxexport.models.loaders import load_transformer
from fluxexport.models.source import ModelSource
from fluxexport.quantize.calibrate import KEEP_HIGH_PRECISION, CalibrationSettings, calibrate, fake_quantize
from fluxexport.quantize.fp8 import E4M3_MAX, TRANSLATIONS
from fluxexport.specs import ExportBounds, component_specs

CALIBRATION_FILE = "calibration.json"
MIN_QDQ_OPSET = 19  # FLOAT8E4M3FN in QuantizeLinear / DequantizeLinear


def fake_quantized_transformer(source: ModelSource, amax: dict[str, float], dtype: str = "fp32") -> TransformerWrapper:
    """The PyTorch reference of the Q/DQ graph: the transformer with its block Linears in FP8 fake quantization."""
    model = fake_quantize(load_transformer(source, torch_dtype(dtype)), amax)
    return TransformerWrapper(model, source.guidance_embeds).eval()


def write_calibration(out_dir: Path, settings: CalibrationSettings, amax: dict[str, float]) -> Path:
    record = {
        "format": "fp8_e4m3_per_tensor",
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
) -> dict:
    """Calibrate on our runtime's trajectories, then export `out_dir/transformer.onnx` as an FP8 Q/DQ graph.

    The graph keeps the transformer's contract; its non-quantized math is in `base_dtype` (bf16 for TensorRT,
    fp32 to run it in ONNX Runtime on CPU)."""
    if base_dtype not in ("bf16", "fp32", "fp16"):
        raise FluxExportError(f"unknown base dtype {base_dtype!r}: choose bf16, fp16 or fp32 (--dtype)")
    if opset < MIN_QDQ_OPSET:
        raise FluxExportError(f"FP8 Q/DQ needs opset ≥ {MIN_QDQ_OPSET}, got {opset} (--opset)")
    settings = settings or CalibrationSettings()
    out_dir = Path(out_dir)
    bounds = bounds or ExportBounds.for_model(source)
    # Calibrate in float32: the scales then do not depend on where calibration ran.
    amax = calibrate(TorchBackend(source, "fp32", calibration_device), source, settings, on_prompt)
    module = fake_quantized_transformer(source, amax, base_dtype)
    spec = component_specs(source, bounds)["transformer"]
    quantized = sum(1 for _ in amax)
    exported = export_component(
        source, spec, out_dir, base_dtype, opset, external_data, module=module, translations=TRANSLATIONS,
        notes=[f"FP8 E4M3 per-tensor Q/DQ on {quantized} block Linear layers; kept in {base_dtype}: "
               + ", ".join(KEEP_HIGH_PRECISION)],
    )  # fmt: skip
    calibration = write_calibration(out_dir, settings, amax)
    manifest = open_manifest(source, out_dir, base_dtype, bounds)
    entry = manifest_entry(spec, exported, opset) | {
        "dtype": "fp8",
        "base_dtype": base_dtype,
        "quantization": {"format": "fp8_e4m3", "layers": quantized, "calibration": calibration.name},
    }
    manifest["components"]["transformer"] = entry
    write_manifest(out_dir, manifest)
    return entry
