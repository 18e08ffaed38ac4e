"""A folder of FLUX.1 Redux graphs (`export --redux`): its manifest (`redux_manifest.json`) names the prior the
graphs came from and holds each graph's record (its contract), as a typed record."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fluxexport.artifacts.records import GraphRecord
from fluxexport.atomic import atomic_file
from fluxexport.errors import FluxExportError

REDUX_MANIFEST = "redux_manifest.json"


@dataclass(frozen=True)
class ReduxExport:
    """A folder of Redux graphs as its manifest records it."""

    folder: Path
    redux: str  # the prior's name (`ReduxSource.name`)
    graphs: dict[str, GraphRecord]


def write_redux_manifest(folder: Path, redux: str, graphs: dict[str, GraphRecord]) -> ReduxExport:
    """The manifest, written atomically (last: a folder with one is whole)."""
    manifest = {"kind": "redux", "redux": redux, "graphs": {name: g.to_json() for name, g in graphs.items()}}
    with atomic_file(Path(folder) / REDUX_MANIFEST) as temporary:
        temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    return ReduxExport(Path(folder), redux, graphs)


def open_redux_export(folder: Path, made_from: str | None = None) -> ReduxExport:
    """A folder `export --redux` wrote (from the prior named `made_from`, where given), refused in one line when it
    is not one."""
    path = Path(folder) / REDUX_MANIFEST
    if not path.is_file():
        raise FluxExportError(
            f"{folder} holds no {REDUX_MANIFEST}: export the Redux prior there with `fluxexport export --redux`"
        )
    try:
        data = json.loads(path.read_text())
        graphs = {name: GraphRecord.from_json(record) for name, record in data["graphs"].items()}
        export = ReduxExport(Path(folder), str(data["redux"]), graphs)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise FluxExportError(f"{path} is damaged ({error}): export the Redux prior again") from None
    if made_from is not None and export.redux != made_from:
        raise FluxExportError(
            f"{folder} holds the Redux graphs of {export.redux!r}, not of {made_from!r}: export {made_from} there "
            "(`fluxexport export --redux`) or pass its own folder"
        )
    return export
