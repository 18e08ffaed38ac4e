"""Whether `export` or `quantize` may write into a folder: the graphs of one folder are always one export (one
checkpoint, one dtype, one set of bounds), so its manifest stays true for every graph in it.

An export into a folder that holds graphs of another checkpoint, dtype or bounds is refused in one line; with
`replace`, the folder's recorded graphs (and its manifest) are removed first, so it ends up holding this export
alone, never a mix. `quantize` adds FP8 graphs beside the base ones: it takes the folder's bounds and is
refused only for a folder of another checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from fluxexport.artifacts.files import MANIFEST
from fluxexport.artifacts.folders import ExportFolder, open_export
from fluxexport.dtypes import component_precision
from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.specs import ExportBounds

CALIBRATION_FILE = "calibration.json"  # quantize's scales (quantize/qdq_export.py writes it; a layer above)
REPLACE_HINT = "choose another --out, or add --replace (the folder's graphs are then removed first)"


def existing_export(out: Path) -> ExportFolder | None:
    """The export folder at `out`, or None when there is no manifest there yet."""
    return open_export(out) if (Path(out) / MANIFEST).is_file() else None


def _listed(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")


def checkpoint_conflict(folder: ExportFolder, source: ModelSource) -> str | None:
    """Why `folder`'s graphs are not `source`'s (a phrase), or None."""
    if folder.every_graph() and not folder.model.is_of(source):
        return f"holds graphs exported from {folder.model.made_from(source)}"
    return None


def dtype_conflict(folder: ExportFolder, dtype: str) -> str | None:
    """Why `folder`'s portable graphs are not what an export in `dtype` writes (a phrase), or None."""
    other = {name: graph.dtype for name, graph in folder.components.items()
             if graph.dtype != component_precision(name, dtype)[0]}  # fmt: skip
    if not other:
        return None
    dtypes = "/".join(sorted(set(other.values())))
    return f"holds {dtypes} graphs ({_listed(other)}), not {dtype}"


def bounds_conflict(folder: ExportFolder, bounds: ExportBounds) -> str | None:
    """Why `folder`'s bounds are not `bounds` (a phrase naming the first that differs), or None. The manifest is
    read as `ExportBounds`: a bound it predates (FLUX.2's reference budget) is the default it was exported with."""
    if not folder.every_graph():
        return None
    held, wanted = vars(ExportBounds.from_json(folder.bounds)), vars(bounds)
    key = next((key for key in wanted if held[key] != wanted[key]), None)
    return None if key is None else f"holds graphs exported for {key} {_bound(held[key])}, not {_bound(wanted[key])}"


def _bound(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)  # an aspect ratio 2.0 as 2


def export_conflict(folder: ExportFolder, source: ModelSource, dtype: str, bounds: ExportBounds) -> str | None:
    """Why an export of `source` in `dtype` for `bounds` would mix with `folder`'s graphs, or None."""
    return checkpoint_conflict(folder, source) or dtype_conflict(folder, dtype) or bounds_conflict(folder, bounds)


def remove_graphs(folder: ExportFolder, calibration: bool = True) -> None:
    """Delete every graph `folder`'s manifest records (portable, FP8, optimized, with their weight files), the
    manifest itself and, with `calibration`, quantize's calibration.json; files it does not record stay."""
    for graph in folder.every_graph().values():
        path = folder.path / graph.file
        path.unlink(missing_ok=True)
        if graph.external_data:
            (folder.path / graph.external_data).unlink(missing_ok=True)
            path.with_name(Path(graph.external_data).name).unlink(missing_ok=True)
    if calibration:
        (folder.path / CALIBRATION_FILE).unlink(missing_ok=True)
    (folder.path / MANIFEST).unlink(missing_ok=True)


def prepare_export_folder(
    out: Path, source: ModelSource, dtype: str, bounds: ExportBounds, replace: bool = False
) -> None:
    """Refuse, in one line, an export into `out` that would leave graphs of another checkpoint, dtype or bounds
    beside its own; with `replace`, remove the folder's graphs first (the folder then holds this export only)."""
    folder = existing_export(out)
    if folder is None:
        return
    if replace:
        remove_graphs(folder, calibration=not folder.model.is_of(source))
        return
    conflict = export_conflict(folder, source, dtype, bounds)
    if conflict:
        raise FluxExportError(f"{out} {conflict}: {REPLACE_HINT}")


def prepare_quantize_folder(out: Path, source: ModelSource, replace: bool = False) -> ExportBounds | None:
    """The bounds `quantize` must export for in `out` (the folder's, so its manifest stays true; None for a new
    folder); refused in one line when `out` holds another checkpoint's graphs, which `replace` removes first."""
    folder = existing_export(out)
    if folder is None:
        return None
    conflict = checkpoint_conflict(folder, source)
    if conflict and not replace:
        raise FluxExportError(f"{out} {conflict}: {REPLACE_HINT}")
    if conflict:
        remove_graphs(folder)
        return None
    return ExportBounds.from_json(folder.bounds) if folder.every_graph() else None
