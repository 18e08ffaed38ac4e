"""`fluxexport quantize`: FP8 scales calibrated on denoising trajectories, the transformer (and its parts)
exported as Q/DQ graphs beside the export's own, each linted for TensorRT."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fluxexport.commands.common import Log, ModelOptions, Progress, no_log, no_progress, open_source
from fluxexport.commands.export import CheckResult, OnBytes, ignore_bytes
from fluxexport.errors import FluxExportError

WEIGHT_ONLY_LAYOUTS = ("fp8r",)  # published FP8 layouts without activation scales (black-forest-labs' fp8r)


@dataclass(frozen=True)
class QuantizeOptions:
    """`fluxexport quantize`'s options; None means the model's (or the folder's) default."""

    model: ModelOptions = field(default_factory=ModelOptions)
    out: Path | None = None
    dtype: str = "bf16"
    calib_prompts: Path | None = None
    calib_size: int | None = None
    calib_steps: int | None = None
    calib_resolution: int | None = None
    calibration_file: Path | None = None
    sequential: bool | None = None
    opset: int | None = None
    external_data: bool | None = None
    transformer_parts: bool = False
    replace: bool = False
    fp8_attention: bool = False  # the attention matmuls in FP8 too (q, k, v, softmax output)
    precision: str = "fp8"  # or nvfp4: FP4 blocks for TensorRT on Blackwell (`quantize/nvfp4.py`)


@dataclass(frozen=True)
class QuantizedGraph:
    """One FP8 graph written: its path and the note saying what it holds."""

    path: Path
    note: str


@dataclass(frozen=True)
class QuantizeResult:
    out: Path
    graphs: list[QuantizedGraph]
    check: CheckResult


def _ignored_with_saved_scales(options: QuantizeOptions) -> str | None:
    """The first calibration option a --calibration file would make pointless (None when there is none)."""
    given = [flag for flag, value in (("--calib-prompts", options.calib_prompts), ("--calib-size", options.calib_size),
             ("--calib-steps", options.calib_steps), ("--calib-resolution", options.calib_resolution),
             ("--sequential/--whole-model", options.sequential)) if value is not None]  # fmt: skip
    return given[0] if given else None


def quantize_fp8(
    options: QuantizeOptions, progress: Progress = no_progress, log: Log = no_log, on_bytes: OnBytes = ignore_bytes
) -> QuantizeResult:
    """Calibrate (or read `options.calibration_file`'s scales), write the FP8 graphs into `options.out` (default
    engines/<model>/onnx) at the folder's bounds, and lint each for TensorRT."""
    from fluxexport.artifacts.files import default_folder
    from fluxexport.artifacts.folders import open_export
    from fluxexport.export.onnx_export import DEFAULT_OPSET
    from fluxexport.export.target_folder import prepare_quantize_folder
    from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings, read_prompts
    from fluxexport.quantize.qdq_export import fp8_components, quantize_transformer
    from fluxexport.specs import TRANSFORMER_PARTS

    _check_precision(options)
    source = open_source(options.model)
    prompts = read_prompts(options.calib_prompts) if options.calib_prompts else CALIBRATION_PROMPTS
    if options.calib_size is not None:
        if options.calib_size < 1:
            raise FluxExportError(f"calib-size must be at least 1, got {options.calib_size} (--calib-size)")
        prompts = prompts[: options.calib_size]
    settings = CalibrationSettings(prompts, options.calib_steps, options.calib_resolution, options.calib_resolution)
    out = options.out or default_folder(source.name)
    ignored = _ignored_with_saved_scales(options) if options.calibration_file is not None else None
    if ignored:
        raise FluxExportError(f"--calibration reuses saved scales, so {ignored} would be ignored: drop one of them")
    if source.quantized_layout is not None:  # a published checkpoint: its own scales
        return _quantize_from_checkpoint(options, source, settings, progress, log, on_bytes)
    bounds = prepare_quantize_folder(out, source, options.replace)  # the folder's bounds: its manifest stays true
    names = fp8_components(out, TRANSFORMER_PARTS if options.transformer_parts else ())
    if options.precision == "nvfp4":
        return _quantize_nvfp4(options, source, out, settings, bounds, names, progress, log, on_bytes)
    quantize_transformer(
        source, out, settings, options.dtype, options.opset or DEFAULT_OPSET, bounds,
        external_data=options.external_data, calibration_file=options.calibration_file,
        sequential=options.sequential, log=log, calibration_progress=lambda title: progress(title, 1),
        on_bytes=on_bytes, components=names, fp8_attention=options.fp8_attention,
    )  # fmt: skip
    records = [open_export(out).fp8[name] for name in names]
    return _checked(out, records)


def _quantize_from_checkpoint(
    options: QuantizeOptions, source, settings, progress: Progress, log: Log, on_bytes: OnBytes
) -> QuantizeResult:
    """`quantize` of a published FP8 or NVFP4 checkpoint (`models/quantized_checkpoint.py`): the graphs with the
    checkpoint's own scales (`quantize/from_checkpoint.py`). Calibration's options are refused where the file has
    activation scales; a weight-only FP8 file (BFL's fp8r) takes them, for activation scales beside its own
    weight scales (an FP8 GEMM graph instead of a weight-only one)."""
    import onnx

    from fluxexport.artifacts.files import default_folder
    from fluxexport.artifacts.folders import open_export
    from fluxexport.export.onnx_export import DEFAULT_OPSET
    from fluxexport.export.target_folder import prepare_quantize_folder
    from fluxexport.quantize.from_checkpoint import export_checkpoint_fp8, export_checkpoint_nvfp4
    from fluxexport.quantize.qdq_export import fp8_components
    from fluxexport.specs import TRANSFORMER_PARTS

    layout = source.quantized_layout
    precision = "nvfp4" if layout == "nvfp4" else "fp8"  # the checkpoint's own: its scales make no other graph
    if layout == "nvfp4" and options.precision != "nvfp4":
        raise FluxExportError(
            f"{source.name} is an NVFP4 checkpoint: quantize it with --precision nvfp4 (FP8 graphs come from FP8 or "
            "bf16 releases)"
        )
    calibrating = _ignored_with_saved_scales(options)
    weight_only = layout in WEIGHT_ONLY_LAYOUTS  # no activation scales: a calibration adds them
    given = [flag for flag, value in ((f"--precision {options.precision}", options.precision != precision),
             ("--calibration", options.calibration_file is not None and not weight_only),
             ("--fp8-attention", options.fp8_attention),
             (calibrating, calibrating is not None and not weight_only)) if value]  # fmt: skip
    if given:
        raise FluxExportError(
            f"{source.name} is an {precision.upper()} checkpoint ({layout}) quantized with its own scales: drop {given[0]}"
        )
    out = options.out or default_folder(source.name)
    bounds = prepare_quantize_folder(out, source, options.replace)
    names = fp8_components(out, TRANSFORMER_PARTS if options.transformer_parts else ())
    opset = options.opset or DEFAULT_OPSET
    if weight_only and (options.calibration_file is not None or calibrating is not None):
        amax = _checkpoint_activations(options, source, out, settings, progress, log)
        export_checkpoint_fp8(
            source, out, options.dtype, opset, bounds, options.external_data, on_bytes, names, input_amax=amax
        )  # fmt: skip
        return _checked(out, [open_export(out).fp8[name] for name in names])
    log(f"{source.name} is an {precision.upper()} checkpoint ({layout}): its own scales, no calibration")
    export = export_checkpoint_nvfp4 if precision == "nvfp4" else export_checkpoint_fp8
    export(source, out, options.dtype, opset, bounds, options.external_data, on_bytes, names)
    if precision == "nvfp4":  # checked as `quantize --precision nvfp4`'s graphs are
        records = [open_export(out).nvfp4[name] for name in names]
        for record in records:
            onnx.checker.check_model(str(out / record.file))
        return _checked(out, records, nvfp4_check_version())
    records = [open_export(out).fp8[name] for name in names]
    return _checked(out, records)


def _checkpoint_activations(options: QuantizeOptions, source, out: Path, settings, progress: Progress, log: Log):
    """The input amax of a weight-only FP8 checkpoint's Linears: `options.calibration_file`'s (kept in `out`), or
    calibrated on the checkpoint as it computes (its dequantized weights) and saved in `out` for --calibration."""
    from fluxexport.quantize.qdq_export import (
        calibrate_transformer,
        choose_sequential,
        keep_calibration,
        read_calibration,
        write_calibration,
    )

    if options.calibration_file is not None:
        calibration, _ = read_calibration(options.calibration_file, source)
        keep_calibration(out, options.calibration_file)
        log(f"{source.name}: its own weight scales, activation scales from {options.calibration_file}")
        return calibration.input_amax
    sequential = options.sequential
    if sequential is None:
        sequential, why = choose_sequential(source)
        log(why)
    with progress(f"calibrate {source.name}'s activations on {len(settings.prompts)} prompts", 1) as advance:
        calibration = calibrate_transformer(source, settings, None, sequential, on_progress=advance)
    path = write_calibration(out, source, settings, calibration)
    log(f"{source.name}: its own weight scales, activation scales calibrated (saved to {path})")
    return calibration.input_amax


def _check_precision(options: QuantizeOptions) -> None:
    from fluxexport.dtypes import QUANTIZED_PRECISIONS

    if options.precision not in QUANTIZED_PRECISIONS:
        raise FluxExportError(
            f"quantize makes {' or '.join(QUANTIZED_PRECISIONS)} graphs, not {options.precision} (--precision)"
        )
    if options.precision == "nvfp4" and options.fp8_attention:
        raise FluxExportError("--fp8-attention is FP8's: NVFP4 quantizes the block Linears only (drop one of them)")


def _quantize_nvfp4(options, source, out, settings, bounds, names, progress, log, on_bytes) -> QuantizeResult:
    """`quantize --precision nvfp4`: the same calibration, NVFP4 graphs (`transformer.nvfp4.onnx`, …); checked
    as ONNX and linted for the TensorRT that parses them (`nvfp4_check_version`)."""
    import onnx

    from fluxexport.artifacts.folders import open_export
    from fluxexport.quantize.nvfp4_export import quantize_nvfp4

    quantize_nvfp4(
        source, out, settings, options.dtype, options.opset, bounds, external_data=options.external_data,
        calibration_file=options.calibration_file, sequential=options.sequential, log=log,
        calibration_progress=lambda title: progress(title, 1), on_bytes=on_bytes, components=names,
    )  # fmt: skip
    records = [open_export(out).nvfp4[name] for name in names]
    for record in records:
        onnx.checker.check_model(str(out / record.file))
    return _checked(out, records, nvfp4_check_version())


def nvfp4_check_version() -> str:
    """The TensorRT whose ONNX parser an NVFP4 graph is checked against: the first with an operator list for its
    opset 23 (`export.check.tensorrt_support`), which parses trt::TRT_FP4DynamicQuantize too (since 10.8)."""
    from fluxexport.tensorrt.environment import NATIVE_OPS, TENSORRT_DOMAIN_OPS, tensorrt_for, version_text

    return version_text(max([*(needed for needed, _ in TENSORRT_DOMAIN_OPS.values()), tensorrt_for(NATIVE_OPS)]))


def _checked(out: Path, records: list, tensorrt: str | None = None) -> QuantizeResult:
    """The result of writing `records`' graphs into `out`: each linted for TensorRT `tensorrt` (default: the
    bundled operator list's), the first failure as the refusal."""
    from fluxexport.export.check import check_graph

    reports = [check_graph(out / record.file, record, tensorrt) for record in records]
    failed = next((report.path for report in reports if not report.ok), None)
    check = CheckResult(reports, f"{failed} fails the TensorRT check (see the table above)" if failed else None)
    return QuantizeResult(out, [QuantizedGraph(out / record.file, record.notes[0]) for record in records], check)
