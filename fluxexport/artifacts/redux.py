"""A folder of FLUX.1 Redux graphs (`export --redux`): its manifest (`redux_manifest.json`) names the prior the
graphs came from and holds each graph's record (its contract), as a typed record."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fluxexport.artifacts.records import EngineRecord, GraphRecord
from fluxexport.atomic import atomic_file
from fluxexport.errors import FluxExportError

REDUX_MANIFEST = "redux_manifest.json"
REDUX_ENGINES_MANIFEST = "redux_engines.json"  # `build --redux`: the prior's TensorRT engines
T = TypeVar("T")


@dataclass(frozen=True)
class ReduxExport:
    """A folder of Redux graphs as its manifest records it."""

    folder: Path
    redux: str  # the prior's name (`ReduxSource.name`)
    graphs: dict[str, GraphRecord]


def _write_json(path: Path, manifest: dict) -> None:
    """A manifest, written atomically (last: a folder with one is whole)."""
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(manifest, indent=2) + "\n")


def _open_manifest(folder: Path, name: str, made_from: str | None, what: str, remedy: str, parse: Callable[[dict], T]) -> T:
    """`parse` of the manifest `name` in `folder`, refused in one line when it is missing, damaged, or made from
    another prior than `made_from` (where given); `what` names its contents, `remedy` the command that writes it."""
    path = Path(folder) / name
    if not path.is_file():
        raise FluxExportError(f"{folder} holds no {name}: {remedy[0]}")
    try:
        found = parse(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise FluxExportError(f"{path} is damaged ({error}): {remedy[1]}") from None
    if made_from is not None and found.redux != made_from:
        raise FluxExportError(
            f"{folder} holds the Redux {what} of {found.redux!r}, not of {made_from!r}: {remedy[2].format(made_from)} "
            "or pass its own folder"
        )
    return found


def write_redux_manifest(folder: Path, redux: str, graphs: dict[str, GraphRecord]) -> ReduxExport:
    """The manifest, written atomically (last: a folder with one is whole)."""
    _write_json(Path(folder) / REDUX_MANIFEST,
                {"kind": "redux", "redux": redux, "graphs": {name: g.to_json() for name, g in graphs.items()}})  # fmt: skip
    return ReduxExport(Path(folder), redux, graphs)


def open_redux_export(folder: Path, made_from: str | None = None) -> ReduxExport:
    """A folder `export --redux` wrote (from the prior named `made_from`, where given), refused in one line when it
    is not one."""
    return _open_manifest(
        folder, REDUX_MANIFEST, made_from, "graphs",
        ("export the Redux prior there with `fluxexport export --redux`", "export the Redux prior again",
         "export {} there (`fluxexport export --redux`)"),
        lambda data: ReduxExport(
            Path(folder), str(data["redux"]),
            {name: GraphRecord.from_json(record) for name, record in data["graphs"].items()},
        ),
    )  # fmt: skip


@dataclass(frozen=True)
class ReduxEngines:
    """A folder of Redux engines (`build --redux`) as its manifest records it."""

    folder: Path
    redux: str
    tensorrt: str  # the TensorRT version that built them
    engines: dict[str, EngineRecord]


def write_redux_engines(folder: Path, redux: str, tensorrt: str, engines: dict[str, EngineRecord]) -> ReduxEngines:
    """The engines' manifest, written atomically once every engine is there."""
    _write_json(Path(folder) / REDUX_ENGINES_MANIFEST, {
        "kind": "redux-engines", "redux": redux, "tensorrt": tensorrt,
        "engines": {name: record.to_json() for name, record in engines.items()},
    })  # fmt: skip
    return ReduxEngines(Path(folder), redux, tensorrt, engines)


def open_redux_engines(folder: Path, made_from: str | None = None) -> ReduxEngines:
    """A folder `build --redux` wrote (from the prior named `made_from`, where given), refused in one line when it
    is not one."""
    return _open_manifest(
        folder, REDUX_ENGINES_MANIFEST, made_from, "engines",
        ("build the Redux engines with `build --redux`", "build the Redux engines again",
         "build {} there (`fluxexport build --redux`)"),
        lambda data: ReduxEngines(
            Path(folder), str(data["redux"]), str(data["tensorrt"]),
            {name: EngineRecord.from_json(record) for name, record in data["engines"].items()},
        ),
    )  # fmt: skip


def is_redux_engines(folder: Path) -> bool:
    """Whether `folder` holds Redux engines (`build --redux`), not graphs (`export --redux`)."""
    return (Path(folder) / REDUX_ENGINES_MANIFEST).is_file()
