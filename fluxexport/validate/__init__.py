"""Validation against PyTorch: exported graphs (`graphs.py`, in ONNX Runtime) and TensorRT engines
(`engines.py`, also against ONNX Runtime on their own graphs); the metrics and thresholds are
`fluxexport.compare`'s. `validate_any` picks by what the folder holds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fluxexport.artifacts.folders import EngineFolder, open_folder
from fluxexport.compare import ValidationReport
from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.runtime.cache import CacheSettings


def check_validation_host(folder: Path, fp8: bool | None = None) -> bool:
    """Refuse, before anything runs, what cannot validate `folder`: engines without TensorRT here, or a graph
    choice (`fp8`) for engines, whose precision is fixed. True when the folder holds engines."""
    if not isinstance(open_folder(folder), EngineFolder):
        return False
    from fluxexport.tensorrt.environment import import_tensorrt

    import_tensorrt()
    if fp8 is not None:
        raise FluxExportError("--fp8/--no-fp8 picks a graph; an engine folder's precision is fixed: drop it")
    return True


def validate_any(
    source: ModelSource,
    folder: Path,
    components: list[str] | None = None,
    steps: int = 4,
    max_rel_l2: float | None = None,
    min_psnr: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    fp8: bool | None = None,
    optimized: bool | None = None,
    cache: CacheSettings | None = None,
) -> tuple[ValidationReport, str]:
    """Validate the graphs or engines in `folder`: (report, PyTorch reference dtype). `fp8` and `optimized`
    pick graphs, so an engine folder (whose precision is fixed) refuses `fp8`; `cache` is the step cache both
    sides generate the end-to-end images with."""
    if check_validation_host(folder, fp8):
        from fluxexport.validate.engines import validate_engines

        return validate_engines(source, folder, components, steps, max_rel_l2, min_psnr, on_progress, cache=cache)
    from fluxexport.validate.graphs import validate_folder

    return validate_folder(source, folder, components, steps, max_rel_l2, min_psnr, on_progress, fp8, optimized, cache)
