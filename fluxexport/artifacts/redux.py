"""A folder of FLUX.1 Redux graphs (`export --redux`): its manifest (`redux_manifest.json`) names the prior the
graphs came from and holds each graph's record (its contract), as a typed record."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fluxexport.artifacts.records import EngineRecord, GraphRecord
from fluxexport.atomic import atomic_file
from fluxexport.errors import FluxExportError

REDUX_MANIFEST = "redux_manifest.json"
REDUX_ENGINES_MANIFEST = "redux_engines.json"  # `build --redux`: the prior's TensorRT engines


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


@dataclass(frozen=True)
class ReduxEngines:
    """A folder of Redux engines (`build --redux`) as its manifest records it."""

    folder: Path
    redux: str
    tensorrt: str  # the TensorRT version that built them
    engines: dict[str, EngineRecord]


def write_redux_engines(folder: Path, redux: str, tensorrt: str, engines: dict[str, EngineRecord]) -> ReduxEngines:
    """The engines' manifest, written atomically once every engine is there."""
    manifest = {
        "kind": "redux-engines", "redux": redux, "tensorrt": tensorrt,
        "engines": {name: record.to_json() for name, record in engines.items()},
    }  # fmt: skip
    with atomic_file(Path(folder) / REDUX_ENGINES_MANIFEST) as temporary:
        temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    return ReduxEngines(Path(folder), redux, tensorrt, engines)


def open_redux_engines(folder: Path, made_from: str | None = None) -> ReduxEngines:
    """A folder `build --redux` wrote (from the prior named `made_from`, where given), refused in one line when it
    is not one."""
    path = Path(folder) / REDUX_ENGINES_MANIFEST
    if not path.is_file():
        raise FluxExportError(
            f"{folder} holds no {REDUX_ENGINES_MANIFEST}: build the Redux engines with `build --redux`"
        )
    try:
        data = json.loads(path.read_text())
        engines = {name: EngineRecord.from_json(record) for name, record in data["engines"].items()}
        found = ReduxEngines(Path(folder), str(data["redux"]), str(data["tensorrt"]), engines)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise FluxExportError(f"{path} is damaged ({error}): build the Redux engines again") from None
    if made_from is not None and found.redux != made_from:
        raise FluxExportError(
            f"{folder} holds the Redux engines of {found.redux!r}, not of {made_from!r}: build {made_from} there "
            "(`fluxexport build --redux`) or pass its own folder"
        )
    return found


def is_redux_engines(folder: Path) -> bool:
    """Whether `folder` holds Redux engines (`build --redux`), not graphs (`export --redux`)."""
    return (Path(folder) / REDUX_ENGINES_MANIFEST).is_file()
