"""`fluxexport optimize`: ONNX Runtime's transformer optimizer over exported graphs, written to ENGINES/ort/."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fluxexport.commands.common import ModelOptions, open_source


def optimize_folder(
    model: ModelOptions, engines: Path, provider: str = "cpu", components: list[str] | None = None,
    on_component: Callable[[Any], None] | None = None,
) -> Path:  # fmt: skip
    """Fuse the float32 graphs of `engines` (default every one) for ONNX Runtime on `provider`; `on_component`
    hears each component's fusions and parity (`onnxruntime.optimize.Optimized`). Returns ENGINES/ort."""
    from fluxexport.onnxruntime.optimize import optimize_graphs

    optimize_graphs(open_source(model), engines, provider, components, on_component=on_component)
    return Path(engines) / "ort"
