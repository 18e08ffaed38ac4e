"""The one interface every backend implements: components by name, each a callable on a dict of tensors.

Feeds and outputs use the ONNX tensor names of the component specs (`fluxexport.specs`) and are float32 /
int32 torch tensors on the backend's `device`: the runtime keeps its denoising state there, so a GPU backend
never syncs with the host between steps. What a backend does inside (dtype, engine) is its own affair.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from fluxexport.errors import FluxExportError

if TYPE_CHECKING:
    from fluxexport.runtime.request import ResolvedRequest

Feeds = dict[str, torch.Tensor]
Component = Callable[[Feeds], Feeds]


class Backend(Protocol):
    """Runs FLUX components. `component(name)` loads lazily and returns the same callable each time;
    `close()` releases whatever was loaded (modules, sessions, engines). A backend that serves only some requests
    (a folder's graphs or engines, within the bounds they were made for) also has `check_request(resolved)`,
    which refuses one in a line before any work (`check_request` below calls it)."""

    name: str
    device: torch.device

    def component(self, name: str) -> Component: ...

    def close(self) -> None: ...


def check_request(backend: Backend, resolved: ResolvedRequest) -> None:
    """Let `backend` refuse `resolved` before any component runs: its `check_request`, where it has one (the
    ONNX Runtime and TensorRT backends refuse FLUX.2 references past their folder's reference budget)."""
    check = getattr(backend, "check_request", None)
    if check is not None:
        check(resolved)


def refuse_unknown_feeds(component: str, feeds: Feeds, inputs) -> None:
    """A feed the component does not take is an error (engines would drop it or say only "invalid input")."""
    unknown = sorted(set(feeds) - set(inputs))
    if unknown:
        raise FluxExportError(f"{component} has no input {unknown[0]!r}: it takes {', '.join(inputs)}")


class LoadedComponents:
    """What the backends share: components loaded once by `_load(name)`, released by `close()` or `with`."""

    def __init__(self) -> None:
        self._components: dict[str, Component] = {}

    def _load(self, name: str) -> Component:
        raise NotImplementedError

    def component(self, name: str) -> Component:
        if name not in self._components:
            self._components[name] = self._load(name)
        return self._components[name]

    def close(self) -> None:
        """Drop every loaded component (and with it its weights, session or engine)."""
        self._components.clear()

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
