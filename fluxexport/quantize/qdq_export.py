"""`fluxexport quantize`: calibrate, fake-quantize the transformer's block Linears, export a standard Q/DQ graph."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from onnx_ir.tensor_adapters import TorchTensor

from fluxexport.adapters import adapter_for
from fluxexport.artifacts.files import MANIFEST, now
from fluxexport.artifacts.folders import FP8_COMPONENTS, fp8_stem, open_export
from fluxexport.artifacts.records import GraphRecord
from fluxexport.atomic import write_text_atomic
from fluxexport.dtypes import E4M3_MAX, ELEMENT_TORCH, quantize_e4m3, torch_dtype
from fluxexport.errors import FluxExportError
from fluxexport.export.graph import replace_with_initializer
from fluxexport.export.onnx_export import (
    DEFAULT_OPSET,
    ExportedComponent,
    export_component,
    graph_record,
    open_folder_for,
)
from fluxexport.export.streaming import FP8_SUFFIX
from fluxexport.models.checkpoint import CheckpointTensors
from fluxexport.models.loaders import load_transformer
from fluxexport.models.source import ModelSource
from fluxexport.pytorch.backend import TorchBackend
from fluxexport.quantize.calibrate import (
    Calibration,
    CalibrationSettings,
    calibrate,
    fake_quantize,
    kept_high_precision,
)
from fluxexport.quantize.fp8 import TRANSLATIONS
from fluxexport.specs import TRANSFORMER_PARTS, ComponentSpec, ExportBounds, component_specs

CALIBRATION_FILE = "calibration.json"
MIN_QDQ_OPSET = 19  # FLOAT8E4M3FN in QuantizeLinear / DequantizeLinear


def fake_quantized_transformer(
    source: ModelSource, amax: dict[str, float], dtype: str = "fp32", weight_amax: dict[str, float] | None = None,
    attention_amax: dict[str, float] | None = None,
) -> torch.nn.Module:  # fmt: skip
    """The PyTorch reference of the Q/DQ graph: the transformer with its block Linears in FP8 fake quantization
    (weight scales from the weights, or from `weight_amax`: a LoRA-merged model on the base model's scales) and,
    with `attention_amax`, its block attentions in FP8 (`--fp8-attention`), behind its family's transformer
    adapter (float32 RoPE, as exported)."""
    model = fake_quantize(load_transformer(source, torch_dtype(dtype)), amax, weight_amax, attention_amax)
    return adapter_for(source, "transformer", model).eval()


CALIBRATION_FORMAT = "fp8_e4m3_per_tensor"


def fp8_weight_name(weight: str) -> str:
    """The FP8 initializer of a quantized weight: `….to_q.weight` → `….to_q.weight.fp8`."""
    return f"{weight}{FP8_SUFFIX}"


def store_weights_in_fp8(model, what: str = "weights") -> str | None:
    """Quantize every constant weight's QuantizeLinear at export time: the FLOAT8E4M3FN result becomes the
    initializer DequantizeLinear reads (TensorRT's explicit quantization takes pre-quantized weights), so the
    graph stores FP8 weights — a quarter of fp32, half of bf16 — and computes exactly what Q→DQ did.

    Lazily: each FP8 initializer reads its weight (itself lazy when the export streams) and quantizes it as
    it is written. The rounding is the fake quantizer's (x / scale in the weight's dtype, saturated to ±448,
    nearest-even cast), which is also QuantizeLinear's with saturate=1. A per-row scale (axis 0: a published
    checkpoint's rows) divides its row. `what` names the weights in the note returned."""
    import onnx_ir as ir

    graph, stored = model.graph, 0
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or not node.inputs[0].is_initializer():
            continue
        weight, scale = node.inputs[0].const_value, ir.convenience.get_const_tensor(node.inputs[1])
        if weight is None or scale is None:
            continue
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
        step = torch.from_numpy(scale.numpy().astype("float32"))
        step = step[:, None] if step.dim() == 1 and axis == 0 else step
        # named after its source weight, so the manifest can say which checkpoint tensor it quantizes
        name = fp8_weight_name(node.inputs[0].name)
        node.outputs[0].name = name

        def quantized(weight=weight, step=step, name=name) -> TorchTensor:
            values = torch.from_numpy(weight.numpy().astype("float32")).to(ELEMENT_TORCH[weight.dtype.name.lower()])
            return TorchTensor(quantize_e4m3(values, step), name)

        lazy = ir.LazyTensor(quantized, dtype=ir.DataType.FLOAT8E4M3FN, shape=weight.shape, name=name)
        replace_with_initializer(graph, node, lazy)
        stored += 1
    return f"{stored} {what} stored as FLOAT8E4M3FN (DequantizeLinear only)" if stored else None


def weights_amax(source: ModelSource, layers, dtype: torch.dtype) -> dict[str, float]:
    """amax of each layer's weight in `dtype`, read tensor by tensor from the checkpoint (never the model)."""
    tensors = CheckpointTensors(source, "transformer")
    return {name: tensors.load(f"{name}.weight", dtype).abs().max().float().item() for name in layers}


def in_dtype(amax: dict[str, float], dtype: torch.dtype) -> dict[str, float]:
    """Float32 weight amax as the amax of the weights cast to `dtype` (rounding is monotonic, so the cast of
    the max is the max of the casts)."""
    return {name: torch.tensor(value).to(dtype).float().item() for name, value in amax.items()}


def write_calibration(
    out_dir: Path, source: ModelSource, settings: CalibrationSettings, calibration: Calibration
) -> Path:
    """`out_dir/calibration.json`: the scales, what they were measured on, and the checkpoint's fingerprint."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    amax = calibration.input_amax
    record = {
        "format": CALIBRATION_FORMAT,
        "model": {"name": source.name, "fingerprint": source.fingerprint()},
        "prompts": len(settings.prompts),
        "prompts_sha256": hashlib.sha256("\n".join(settings.prompts).encode()).hexdigest(),
        "steps": settings.steps,
        "height": settings.height,
        "width": settings.width,
        "kept_high_precision": list(kept_high_precision(source)),
        "transformer_calls": calibration.transformer_calls,  # single-sample runs: prompts × steps × CFG branches
        "input_amax": dict(sorted(amax.items())),
        "input_scale": {name: value / E4M3_MAX for name, value in sorted(amax.items())},
        "weight_amax": dict(sorted(calibration.weight_amax.items())),  # float32, from the checkpoint
        # --fp8-attention: each block attention's query, key and value (the softmax output's scale is fixed)
        "attention_amax": dict(sorted(calibration.attention_amax.items())),
        "calibrated_at": now(),
    }
    return write_text_atomic(out_dir / CALIBRATION_FILE, json.dumps(record, indent=2) + "\n")


def read_calibration(path: Path, source: ModelSource) -> tuple[Calibration, dict]:
    """(the calibration, the record) of an earlier `calibration.json`, refused unless it was made for this
    checkpoint: scales of another model would quantize silently wrong. Records without weight amax (older
    ones) give an empty `weight_amax`: the export then reads the weights for it."""
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
    floats = lambda values: {name: float(value) for name, value in values.items()}  # noqa: E731
    calibration = Calibration(
        floats(record["input_amax"]), floats(record.get("weight_amax", {})), int(record.get("transformer_calls", 0)),
        floats(record.get("attention_amax", {})),
    )  # fmt: skip
    return calibration, record


def calibration_modules(source: ModelSource) -> tuple[str, ...]:
    """The modules calibration loads: the transformer and the family's text encoders."""
    module_of = source.family.module_of
    return ("transformer", *(module_of[name] for name in source.family.text_components))


def float32_bytes(source: ModelSource, modules: tuple[str, ...] | None = None) -> int:
    """Bytes of `modules` (default: `calibration_modules`) in float32, from their configs alone (parameters on
    meta: nothing is read)."""
    from fluxexport.models.meta import module_from_config, parameters_on_meta

    modules = modules or calibration_modules(source)
    with parameters_on_meta():
        models = [module_from_config(source, module) for module in modules]
    return 4 * sum(p.numel() for model in models for p in model.parameters())


def available_bytes(device: str | None) -> int:
    """Memory free for a model on `device`: the GPU's free memory, or the host's MemAvailable."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda":
        return torch.cuda.mem_get_info(target)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def choose_sequential(source: ModelSource, device: str | None = None, headroom: float = 0.8) -> tuple[bool, str]:
    """Whether calibration must hold one block at a time: when the float32 transformer and text encoders need
    more than `headroom` of the free memory. Returns the choice and a line that says why."""
    needed, free = float32_bytes(source), available_bytes(device)
    sizes = f"the float32 model needs {needed / 1e9:.1f} GB, {free / 1e9:.1f} GB are free"
    if needed > headroom * free:
        return True, f"calibrating one block at a time: {sizes}"
    return False, f"calibrating the whole model: {sizes} (--sequential holds one block at a time)"


def calibrate_transformer(
    source: ModelSource,
    settings: CalibrationSettings | None = None,
    device: str | None = None,
    sequential: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    attention: bool = False,
) -> Calibration:
    """Calibrate in float32 (the scales then do not depend on where calibration ran); `sequential` holds one
    block at a time, read from the checkpoint: the text encoders' (T5's and CLIP's blocks, FLUX.2's LM decoder
    layers) while they encode the prompts, then the transformer's. `attention`: the block attentions' query, key
    and value too (`--fp8-attention`)."""
    settings = settings or CalibrationSettings()
    with TorchBackend(source, "fp32", device, stream_blocks=sequential) as backend:
        return calibrate(backend, source, settings, on_progress, attention)


def keep_calibration(out_dir: Path, calibration_file: Path) -> Path:
    """The reused calibration file, copied into `out_dir` beside the graph it made (unless it is there)."""
    if Path(calibration_file).resolve() == (Path(out_dir) / CALIBRATION_FILE).resolve():
        return Path(out_dir) / CALIBRATION_FILE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return write_text_atomic(Path(out_dir) / CALIBRATION_FILE, Path(calibration_file).read_text())


def fp8_components(out_dir: Path, wanted: Sequence[str] = ()) -> list[str]:
    """What `quantize` makes FP8 in `out_dir`: the transformer, each of its parts the folder holds (base or FP8:
    the parts then compute with the transformer's scales) and any of `wanted`, in the transformer's order."""
    held: set[str] = set()
    if (Path(out_dir) / MANIFEST).is_file():
        folder = open_export(out_dir)
        held = set(folder.components) | set(folder.fp8)
    return ["transformer", *(part for part in TRANSFORMER_PARTS if part in held or part in wanted)]


def _check_fp8_components(components: Sequence[str], source: ModelSource) -> None:
    if not components:
        raise FluxExportError(f"nothing to quantize: name any of {', '.join(FP8_COMPONENTS)}")
    unknown = [name for name in components if name not in FP8_COMPONENTS]
    if unknown:
        raise FluxExportError(f"quantize makes FP8 graphs of {', '.join(FP8_COMPONENTS)}, not of {unknown[0]}")
    foreign = [name for name in components if name not in source.family.module_of]
    if foreign:  # a family without the transformer's parts (FLUX.1 and FLUX.2 both have them)
        raise FluxExportError(
            f"{source.name} is {source.family.title}, which has no {foreign[0]}: quantize its transformer alone "
            "(drop --transformer-parts)"
        )


def quantized_components(source: ModelSource, out_dir: Path, components: Sequence[str] | None) -> list[str]:
    """The components a quantized export writes: those named, else the transformer and the parts `out_dir` holds;
    each one checked against the model."""
    names = list(fp8_components(out_dir) if components is None else components)
    _check_fp8_components(names, source)
    return names


def calibrated_weight_amax(source: ModelSource, calibration: Calibration, base_dtype: str) -> dict[str, float]:
    """The weights' amax in `base_dtype`: the calibration's record when it covers every calibrated Linear (no
    weight read), else read from the checkpoint one tensor at a time."""
    amax, dtype = calibration.input_amax, torch_dtype(base_dtype)
    recorded = calibration.weight_amax if set(amax) <= set(calibration.weight_amax) else None
    return in_dtype(recorded, dtype) if recorded else weights_amax(source, amax, dtype)


def _export_fp8_graph(
    source: ModelSource, spec: ComponentSpec, out_dir: Path,
    scales: tuple[dict[str, float], dict[str, float], dict[str, float]], base_dtype: str, opset: int,
    external_data: bool | None, on_bytes: Callable[[int, int], None] | None,
) -> ExportedComponent:  # fmt: skip
    """`out_dir/<component>.fp8.onnx`: the component of the fake-quantized transformer (`scales`: input and
    weight amax per block Linear, and the attentions' query/key/value amax or none), traced on fake weights, its
    weights quantized to FP8 as they stream."""
    amax, weight_amax, attention_amax = scales
    return export_component(
        source, spec, out_dir, base_dtype, opset, external_data, translations=TRANSLATIONS,
        graph_pass=store_weights_in_fp8, on_bytes=on_bytes, stem=fp8_stem(spec.name),
        prepare=lambda transformer: fake_quantize(transformer, amax, weight_amax, attention_amax),
    )  # fmt: skip


def attention_record(attention_amax: dict[str, float]) -> list[str]:
    """The block attentions an FP8 graph computes in FP8 (`transformer_blocks.0.attn`, …), from their amax."""
    return sorted({name.rpartition(".")[0] for name in attention_amax})


def _fp8_record(
    spec: ComponentSpec, exported: ExportedComponent, opset: int, base_dtype: str, calibration_path: Path,
    kept_layers: Sequence[str], attention: Sequence[str] = (),
) -> GraphRecord:  # fmt: skip
    """The manifest record of an FP8 graph: its quantized layers (those of its blocks), its FP8 attentions
    (`--fp8-attention`: query, key, value and softmax output in FP8), the calibration behind its scales and what
    stayed in the base dtype (`kept_layers`)."""
    layers = sum(origin.fp8_scale is not None for origin in (exported.weights or {}).values())
    kept = f"FP8 E4M3 per-tensor Q/DQ on {layers} block Linear layers"
    kept += f" and {len(attention)} attentions (q, k, v, softmax)" if attention else ""
    kept += f"; kept in {base_dtype}: "
    exported = replace(exported, notes=(kept + ", ".join(kept_layers), *exported.notes))
    quantization = {"format": "fp8_e4m3", "layers": layers, "calibration": calibration_path.name}
    if attention:
        quantization["attention"] = {"modules": list(attention), "tensors": ["q", "k", "v", "softmax"]}
    return replace(graph_record(spec, exported, opset, base_dtype, quantization=quantization), dtype="fp8")


def export_quantized(
    source: ModelSource,
    out_dir: Path,
    calibration: Calibration,
    calibration_path: Path,
    base_dtype: str = "bf16",
    opset: int = DEFAULT_OPSET,
    bounds: ExportBounds | None = None,
    external_data: bool | None = None,
    on_bytes: Callable[[str, int, int], None] | None = None,
    components: Sequence[str] | None = None,
) -> GraphRecord:
    """Export `out_dir/transformer.fp8.onnx` as an FP8 Q/DQ graph with `calibration`'s scales; no model runs.
    It is recorded in the manifest's `fp8` section beside the base transformer, which stays: one folder
    builds both bf16 and FP8 engines. `components` (default `fp8_components`: the transformer and the parts
    the folder holds) says which graphs: each part gets `<part>.fp8.onnx` with the very same scales, since the
    parts are the transformer's modules cut differently. Returns the first graph's record (the transformer's).

    The graphs keep their contracts; their non-quantized math is in `base_dtype` (bf16 for TensorRT, fp32 to
    run them in ONNX Runtime on CPU). The export streams: the fake-quantized transformer is traced on fake
    weights, then each weight is read, quantized to FP8 and written in turn. `on_bytes(component, done, total)`
    follows the writing. A calibration with attention amax (`--fp8-attention`) makes the block attentions FP8 too."""
    check_quantize_options(base_dtype, opset)
    out_dir, bounds = Path(out_dir), bounds or ExportBounds.for_model(source)
    names = quantized_components(source, out_dir, components)
    amax, weight_amax = calibration.input_amax, calibrated_weight_amax(source, calibration, base_dtype)
    specs, folder = component_specs(source, bounds), open_folder_for(source, out_dir, base_dtype, bounds)
    for name in names:
        progress = (lambda done, total, name=name: on_bytes(name, done, total)) if on_bytes else None
        scales = (amax, weight_amax, calibration.attention_amax)
        exported = _export_fp8_graph(source, specs[name], out_dir, scales, base_dtype, opset, external_data, progress)
        record = _fp8_record(
            specs[name], exported, opset, base_dtype, calibration_path, kept_high_precision(source),
            attention_record(calibration.attention_amax),
        )  # fmt: skip
        folder.fp8[name] = record  # beside the base
        folder.write()
    return folder.fp8[names[0]]


def check_quantize_options(base_dtype: str, opset: int) -> None:
    if base_dtype not in ("bf16", "fp32", "fp16"):
        raise FluxExportError(f"unknown base dtype {base_dtype!r}: choose bf16, fp16 or fp32 (--dtype)")
    if opset < MIN_QDQ_OPSET:
        raise FluxExportError(f"FP8 Q/DQ needs opset ≥ {MIN_QDQ_OPSET}, got {opset} (--opset)")


def quantize_transformer(
    source: ModelSource,
    out_dir: Path,
    settings: CalibrationSettings | None = None,
    base_dtype: str = "bf16",
    opset: int = DEFAULT_OPSET,
    bounds: ExportBounds | None = None,
    external_data: bool | None = None,
    calibration_device: str | None = None,
    calibration_file: Path | None = None,
    sequential: bool | None = None,
    log: Callable[[str], None] = lambda _: None,
    calibration_progress: Callable[[str], AbstractContextManager[Callable[[int, int], None]]] | None = None,
    on_bytes: Callable[[str, int, int], None] | None = None,
    components: Sequence[str] | None = None,
    fp8_attention: bool = False,
) -> GraphRecord:
    """Calibrate (or reuse `calibration_file`, an earlier `calibration.json` of the same checkpoint: no model
    runs), save the calibration beside the graph, then export the FP8 Q/DQ transformer and, by default, the parts
    the folder holds (`export_quantized`'s `components`).
    `sequential=None` holds one block at a time when the float32 model does not fit (`choose_sequential`).
    `log` hears what was decided; `calibration_progress(title)` gives the calibration's progress callback
    (done, total) for the duration of a `with`; `on_bytes(component, done, total)` follows the graphs' writing.
    `fp8_attention` quantizes the block attentions too (query, key, value, softmax output), calibrated on the
    same trajectories; without it a calibration's attention amax is left out of the graph."""
    check_quantize_options(base_dtype, opset)
    if components is not None:  # refused before calibration runs
        _check_fp8_components(components, source)
    settings = settings or CalibrationSettings()
    out_dir = Path(out_dir)
    if calibration_file is not None:
        calibration, _ = read_calibration(calibration_file, source)
        if fp8_attention and not calibration.attention_amax:
            raise FluxExportError(
                f"{calibration_file} has no attention scales: calibrate again with --fp8-attention (drop --calibration)"
            )
        path = keep_calibration(out_dir, calibration_file)
        log(f"reusing the scales of {calibration_file}: no calibration run")
    else:
        if sequential is None:
            sequential, why = choose_sequential(source, calibration_device)
            log(why)
        unit = "block passes" if sequential else "steps"
        title = f"calibrate {source.name} on {len(settings.prompts)} prompts ({unit})"
        with calibration_progress(title) if calibration_progress else nullcontext(None) as advance:
            calibration = calibrate_transformer(
                source, settings, calibration_device, sequential, on_progress=advance, attention=fp8_attention
            )
        path = write_calibration(out_dir, source, settings, calibration)
        log(f"calibration saved to {path} (reuse it with --calibration)")
    if not fp8_attention:
        calibration = replace(calibration, attention_amax={})
    return export_quantized(
        source, out_dir, calibration, path, base_dtype, opset, bounds, external_data, on_bytes, components
    )
