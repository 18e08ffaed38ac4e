"""`fluxexport validate`: exported graphs or built engines against PyTorch, per component and end to end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxexport.commands.common import ModelOptions, Progress, no_progress, open_source
from fluxexport.errors import FluxExportError


@dataclass(frozen=True)
class ValidateOptions:
    """`fluxexport validate`'s options; None means the default (engines/<model>/onnx, thresholds per dtype)."""

    model: ModelOptions = field(default_factory=ModelOptions)
    engines: Path | None = None
    components: list[str] | None = None
    steps: int = 4
    report: Path | None = None
    max_rel_l2: float | None = None
    min_psnr: float | None = None
    fp8: bool | None = None
    optimized: bool | None = None
    cache: str | None = None
    redux: str | None = None  # --redux: `engines` holds that FLUX.1 Redux prior's graphs (`export --redux`)


@dataclass(frozen=True)
class ValidateResult:
    """The comparison (`validate.ValidationReport`), the PyTorch reference's dtype, the folder compared, the
    JSON report written, and the one-line refusal when a threshold was missed (None when everything passed)."""

    report: Any
    reference_dtype: str
    engines: Path
    path: Path
    failure: str | None


def validate_folder(options: ValidateOptions, progress: Progress = no_progress) -> ValidateResult:
    """Compare the graphs or engines of `options.engines` (default the export folder of the model) with
    PyTorch, write the JSON report, and say whether they match within the thresholds."""
    from fluxexport.artifacts.files import default_folder
    from fluxexport.runtime.cache import parse_cache
    from fluxexport.runtime.schedule import check_steps
    from fluxexport.validate import check_validation_host, validate_any

    cache = parse_cache(options.cache)
    check_steps(options.steps)  # the request values first, before any folder or weight is read
    check_thresholds(options.max_rel_l2, options.min_psnr)
    if options.report is not None and options.report.is_dir():
        raise FluxExportError(f"--report {options.report} is a folder: name the JSON file to write")
    if options.report is not None and not options.report.parent.is_dir():
        raise FluxExportError(f"--report {options.report}: folder {options.report.parent} does not exist")
    if options.redux is not None:
        return validate_redux_folder(options, progress)
    refuse_report_into_published(options.engines, options.report)
    source = open_source(options.model)
    engines = options.engines
    if engines is None:
        engines = default_folder(source.name)
        if not engines.is_dir():
            raise FluxExportError(
                f"{engines} does not exist: export the graphs first (fluxexport export --model "
                f"{options.model.model}) or pass --engines"
            )
    check_validation_host(engines, options.fp8)  # refuse before the progress bar
    with progress(f"validate {engines}", 1) as advance:
        report, dtype = validate_any(
            source, engines, options.components, options.steps, options.max_rel_l2, options.min_psnr, advance,
            options.fp8, options.optimized, cache,
        )  # fmt: skip
    path = report.write(options.report or Path(engines) / "validation.json")
    failure = None
    if not report.passed:
        failure = f"{engines} does not match PyTorch within the {report.dtype} thresholds (see {path})"
    return ValidateResult(report, dtype, Path(engines), path, failure)


def validate_redux_folder(options: ValidateOptions, progress: Progress = no_progress) -> ValidateResult:
    """`validate --redux PRIOR --engines DIR`: the prior's graphs in DIR against its PyTorch modules (no images: the
    prior makes embeddings; `run --redux --redux-engines` makes the images)."""
    from fluxexport.models.redux import resolve_redux
    from fluxexport.validate.redux import validate_redux

    if options.engines is None:
        raise FluxExportError("validate --redux compares the prior's graphs: add --engines DIR (`export --redux`'s)")
    redux = resolve_redux(options.redux)  # type: ignore[arg-type]
    with progress(f"validate {options.engines}", 1):
        report = validate_redux(redux, options.engines, options.max_rel_l2)
    path = report.write(options.report or Path(options.engines) / "validation.json")
    failure = None
    if not report.passed:
        failure = f"{options.engines} does not match PyTorch within the {report.dtype} thresholds (see {path})"
    return ValidateResult(report, "fp32", Path(options.engines), path, failure)


def refuse_report_into_published(engines: Path | None, report: Path | None) -> None:
    """A published ONNX folder is read as it is: the report goes where --report names, never into it (refused
    in one line before anything runs)."""
    from fluxexport.artifacts.published import is_published

    if engines is not None and report is None and is_published(engines):
        raise FluxExportError(
            f"{engines} is a published ONNX folder, read as it is: name the JSON report to write with --report FILE"
        )


def check_thresholds(max_rel_l2: float | None, min_psnr: float | None) -> None:
    """A threshold given is a finite number, rel-L2's not negative (fuzzing found NaN running the whole
    comparison only to fail it)."""
    import math

    if max_rel_l2 is not None and not (math.isfinite(max_rel_l2) and max_rel_l2 >= 0):
        raise FluxExportError(f"--max-rel-l2 must be a finite number at least 0, got {max_rel_l2}")
    if min_psnr is not None and not math.isfinite(min_psnr):
        raise FluxExportError(f"--min-psnr must be a finite number of dB, got {min_psnr}")
