"""The FLUX.1 Redux prior's exported graphs (`export --redux`) on ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from fluxexport.artifacts.redux import open_redux_export
from fluxexport.errors import FluxExportError
from fluxexport.models.redux import REDUX_COMPONENTS, ReduxSource
from fluxexport.onnxruntime.backend import create_session, session_runner
from fluxexport.runtime.backend import Component, LoadedComponents


class OnnxReduxBackend(LoadedComponents):
    """`image_encoder` and `image_embedder` as ONNX Runtime sessions over a Redux export folder made from
    `redux` (a folder made from another prior is refused in one line)."""

    name = "onnxruntime"
    device = torch.device("cpu")

    def __init__(self, redux: ReduxSource, folder: Path):
        super().__init__()
        self.export = open_redux_export(folder, redux.name)
        missing = [name for name in REDUX_COMPONENTS if name not in self.export.graphs]
        if missing:
            raise FluxExportError(f"{folder} lacks the Redux graph {missing[0]}: export the Redux prior again")

    def _load(self, name: str) -> Component:
        if name not in self.export.graphs:
            raise FluxExportError(f"unknown Redux component {name!r}: choose one of {', '.join(REDUX_COMPONENTS)}")
        graph = self.export.graphs[name]
        return session_runner(create_session(self.export.folder / graph.file), graph, name)
