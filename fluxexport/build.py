"""`fluxexport build` as a library call: export or quantize whatever graph the engines need and the folder lacks
(`build --precision fp8` implies `quantize`), then build the engines (`tensorrt.builder`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fluxexport.artifacts.files import MANIFEST
from fluxexport.artifacts.folders import EngineFolder, ExportFolder, open_export
from fluxexport.artifacts.published import is_published
from fluxexport.export.onnx_export import export_model
from fluxexport.models.source import ModelSource
from fluxexport.quantize.qdq_export import CALIBRATION_FILE, fp8_components, quantize_transformer
from fluxexport.tensorrt.builder import BuildOptions, build_engines, check_build_host, release_torch_memory
from fluxexport.tensorrt.environment import Gpu
from fluxexport.tensorrt.precision import engine_graphs, graph_dtypes


def export_missing_graphs(
    source: ModelSource, onnx_dir: Path, precision: str, components: Sequence[str], calibration=None, log=print
) -> ExportFolder:
    """Export (or calibrate and quantize) into `onnx_dir` each graph `precision`'s engines of `components` need
    and the folder lacks or holds in another dtype, by the same code as `export` and `quantize`; graphs already
    of the right dtype are kept. Returns the folder afterwards."""
    onnx_dir = Path(onnx_dir)
    if is_published(onnx_dir):  # read as it is: nothing is exported into a published folder
        return open_export(onnx_dir, source)
    wanted = graph_dtypes(precision, components)
    present = engine_graphs(open_export(onnx_dir, source), wanted) if (onnx_dir / MANIFEST).is_file() else {}
    stale = {name: dtype for name, dtype in wanted.items() if name not in present or present[name].dtype != dtype}
    exports: dict[str, list[str]] = {}
    for name, dtype in stale.items():
        if dtype not in ("fp8", "nvfp4"):  # the FP8 (NVFP4) transformer and parts come from quantize, below
            exports.setdefault(dtype, []).append(name)
    for dtype, names in exports.items():
        log(f"exporting {', '.join(names)} as {dtype} into {onnx_dir}")
        export_model(source, onnx_dir, names, dtype)
    quantize_missing(source, onnx_dir, [name for name, dtype in stale.items() if dtype == "fp8"], calibration, log)
    quantize_missing_nvfp4(source, onnx_dir, [name for name, dtype in stale.items() if dtype == "nvfp4"], log)
    return open_export(onnx_dir)


def quantize_missing_nvfp4(source: ModelSource, onnx_dir: Path, missing: list[str], log=print) -> None:
    """Quantize the `missing` NVFP4 graphs into `onnx_dir`, with the folder's calibration.json when it has one (FP8
    and NVFP4 share a calibration), else calibrating anew."""
    if not missing:
        return
    from fluxexport.quantize.nvfp4_export import quantize_nvfp4

    saved = onnx_dir / CALIBRATION_FILE
    names = missing if saved.is_file() else fp8_components(onnx_dir, missing)
    how = f"with the scales of {saved}" if saved.is_file() else "calibrating first"
    log(f"quantizing {', '.join(names)} to NVFP4 into {onnx_dir}, {how}")
    quantize_nvfp4(source, onnx_dir, base_dtype="bf16", calibration_file=saved if saved.is_file() else None,
                   components=names)  # fmt: skip


def quantize_missing(source: ModelSource, onnx_dir: Path, missing: list[str], calibration=None, log=print) -> None:
    """Quantize the `missing` FP8 graphs into `onnx_dir`. Parts beside an FP8 transformer are quantized with its
    scales (the folder's calibration.json: the parts then compute what it computes); otherwise calibrate anew
    and quantize the transformer with every part the folder holds, so that all share the new scales."""
    if not missing:
        return
    saved = onnx_dir / CALIBRATION_FILE
    if "transformer" not in missing and saved.is_file():
        log(f"quantizing {', '.join(missing)} to FP8 into {onnx_dir} with the scales of {saved}")
        quantize_transformer(source, onnx_dir, base_dtype="bf16", calibration_file=saved, components=missing)
        return
    names = fp8_components(onnx_dir, missing)
    what = "the transformer" if names == ["transformer"] else ", ".join(names)
    log(f"calibrating and quantizing {what} to FP8 into {onnx_dir}")
    quantize_transformer(source, onnx_dir, calibration, base_dtype="bf16", components=names)


def build(
    source: ModelSource,
    onnx_dir: Path,
    out_dir: Path,
    options: BuildOptions,
    components: Sequence[str],
    on_component: Callable[[str, float | None], None] | None = None,
    export_missing: bool = True,
    log: Callable[[str], None] = print,
    device_gpu: Callable[[], Gpu] | None = None,
) -> EngineFolder:
    """Engines of `components` in `out_dir` from `onnx_dir`'s graphs; with `export_missing`, the graphs they
    need are exported or quantized first. The host is checked before anything is exported."""
    check_build_host(options, device_gpu)
    if export_missing:
        export_missing_graphs(source, onnx_dir, options.precision, components, log=log)
        release_torch_memory()  # calibration ran PyTorch on this GPU: give its cache back before TensorRT builds
    return build_engines(source, Path(onnx_dir), Path(out_dir), options, components, on_component, device_gpu)
