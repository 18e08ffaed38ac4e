"""The one interface every backend implements: components by name, each a callable on a dict of tensors.

Feeds and outputs use the ONNX tensor names of the component specs (`fluxexport.specs`) and are float32 /
int32 torch tensors on the backend's `device`: the runtime keeps its denoising state there, so a GPU backend
never syncs with the host between steps. What a backend does inside (dtype, engine) is its own affair.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

Feeds = dict[str, torch.Tensor]
Component = Callable[[Feeds], Feeds]


class Backend(Protocol):
    """Runs FLUX components. `component(name)` loads lazily and returns the same callable each time;
    `close()` releases whatever was loaded (modules, sessions, engines)."""

    name: str
    device: torch.device

    def component(self, name: str) -> Component: ...

    def close(self) -> None: ...
