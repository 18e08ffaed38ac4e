"""`fluxexport build`: TensorRT engines from an export folder, exporting or quantizing first what they need."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fluxexport.commands.common import Log, ModelOptions, Progress, no_log, no_progress, open_source

Range = tuple[int, int, int]  # MIN, OPT, MAX


@dataclass(frozen=True)
class BuildCommandOptions:
    """`fluxexport build`'s options; None means the export's bounds (or the default folder)."""

    model: ModelOptions = field(default_factory=ModelOptions)
    precision: str = "bf16"
    onnx_dir: Path | None = None
    out: Path | None = None
    components: list[str] | None = None
    batch: Range | None = None
    min_resolution: int | None = None
    opt_resolution: int | None = None
    max_resolution: int | None = None
    resolution_buckets: int = 1
    text_len: Range | None = None
    optimization_level: int = 3
    refittable: bool = False
    weight_streaming: bool = False
    prepare: bool = True
    max_references: int | None = None
    max_reference_area: int | None = None
    max_reference_aspect: float | None = None


@dataclass(frozen=True)
class BuildResult:
    """The engine folder written and the seconds each component's engines took to build."""

    out: Path
    seconds: dict[str, float]


def build_engines_folder(
    options: BuildCommandOptions, progress: Progress = no_progress, log: Log = no_log
) -> BuildResult:
    """Refuse a host without TensorRT first, then build `options.components` (default: every graph the export
    holds) into `options.out` (default engines/<model>/trt-<precision>) from `options.onnx_dir` (default
    engines/<model>/onnx), exporting or quantizing the graphs the engines need when `options.prepare`."""
    from fluxexport.artifacts.files import default_folder
    from fluxexport.build import build
    from fluxexport.tensorrt.builder import BuildOptions, build_bounds, engine_components
    from fluxexport.tensorrt.environment import import_tensorrt

    import_tensorrt()  # refuse before anything else happens
    source = open_source(options.model)
    onnx_dir = options.onnx_dir or default_folder(source.name)
    out = options.out or default_folder(source.name, f"trt-{options.precision}")
    batch = options.batch or (None, None, None)
    text = options.text_len or (None, None, None)
    bounds = build_bounds(
        source, onnx_dir, min_batch=batch[0], opt_batch=batch[1], max_batch=batch[2],
        min_resolution=options.min_resolution, opt_resolution=options.opt_resolution,
        max_resolution=options.max_resolution, min_text_length=text[0], opt_text_length=text[1],
        max_text_length=text[2], max_references=options.max_references,
        max_reference_area=options.max_reference_area, max_reference_aspect=options.max_reference_aspect,
    )  # fmt: skip
    settings = BuildOptions(
        options.precision, bounds, options.resolution_buckets, options.optimization_level, options.refittable,
        options.weight_streaming,
    )  # fmt: skip
    names = options.components or engine_components(source, onnx_dir)
    seconds: dict[str, float] = {}
    with progress(f"build {options.precision} engines → {out}", len(names)) as advance:

        def on_component(name: str, took: float | None) -> None:
            if took is not None:
                seconds[name] = took
                advance(len(seconds), len(names))

        build(source, onnx_dir, out, settings, names, on_component, options.prepare, log=log)
    return BuildResult(out, seconds)


@dataclass(frozen=True)
class RefitResult:
    """The engine folder refitted: per component, its plan file and how many weights were refitted (None:
    the base plan)."""

    engines: Path
    plans: dict[str, tuple[str, int | None]]


def refit_folder(model: ModelOptions, engines: Path, reset: bool = False) -> RefitResult:
    """Refit `engines` with `model`'s LoRAs (no rebuild), or with `reset` go back to the base weights."""
    from fluxexport.errors import FluxExportError
    from fluxexport.tensorrt.environment import import_tensorrt
    from fluxexport.tensorrt.refit import refit_engines

    source = open_source(model)
    if reset and source.loras:
        raise FluxExportError("--reset goes back to the base weights: drop the --lora options")
    import_tensorrt()  # refuse before anything else happens
    folder = refit_engines(source, engines, reset)
    plans = {name: (plan.file, plan.refitted_weights if plan.is_refitted else None)
             for name, plan in folder.components.items()}  # fmt: skip
    return RefitResult(Path(engines), plans)


def build_redux_folder(
    reference: str, onnx_dir: Path | None = None, out: Path | None = None, batch: Range | None = None,
    optimization_level: int = 3, progress: Progress = no_progress,
) -> BuildResult:  # fmt: skip
    """`fluxexport build --redux`: a FLUX.1 Redux prior's engines from its graphs (`export --redux`; default
    engines/<prior>/onnx) into `out` (default engines/<prior>/trt-fp32), one profile over `batch` (images)."""
    from fluxexport.artifacts.files import default_folder
    from fluxexport.models.redux import REDUX_COMPONENTS, resolve_redux
    from fluxexport.specs.core import Axis
    from fluxexport.specs.redux import REDUX_BATCH
    from fluxexport.tensorrt.builder import BuildOptions
    from fluxexport.tensorrt.environment import import_tensorrt
    from fluxexport.tensorrt.redux import build_redux_engines

    import_tensorrt()  # refuse before anything else happens
    redux = resolve_redux(reference)
    onnx_dir = onnx_dir or default_folder(redux.name)
    out = out or default_folder(redux.name, "trt-fp32")
    axis = Axis(*batch) if batch is not None else REDUX_BATCH
    options = BuildOptions(precision="fp32", optimization_level=optimization_level)
    with progress(f"build Redux engines → {out}", len(REDUX_COMPONENTS)):
        engines = build_redux_engines(redux, onnx_dir, out, options, axis)
    seconds = {name: float(record.extra["build_seconds"]) for name, record in engines.engines.items()}
    return BuildResult(out, seconds)
