"""What the commands share: the checkpoint a command reads, output files checked before any work, the
progress and log callbacks the caller passes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from fluxexport.errors import FluxExportError
from fluxexport.models.lora import LoraFile
from fluxexport.models.meta import weightless_module
from fluxexport.models.source import ModelSource, resolve_model
from fluxexport.runtime.backend import Backend

TINY_DEFAULT = "tiny-schnell"

Advance = Callable[[int, int], None]  # advance(done, total)
Progress = Callable[[str, int], AbstractContextManager[Advance]]  # progress(title, total) as a context manager
Log = Callable[[str], None]


@contextmanager
def no_progress(_title: str, _total: int) -> Iterator[Advance]:
    """A `Progress` that shows nothing (the default when a caller passes none)."""
    yield lambda _done, _total: None


def no_log(_line: str) -> None:
    """A `Log` that drops every line."""


@dataclass(frozen=True)
class ModelOptions:
    """The checkpoint a command reads: --model, --base-model, --lora, --text-encoder-layers."""

    model: str = TINY_DEFAULT
    base_model: str | None = None
    loras: tuple[LoraFile, ...] = ()
    text_encoder_layers: tuple[int, ...] | None = None


def open_source(options: ModelOptions) -> ModelSource:
    """The checkpoint `options` name, with its LoRAs merged into it and its text-encoder layers."""
    source = resolve_model(options.model, options.base_model).with_loras(options.loras)
    source = source.with_text_encoder_layers(options.text_encoder_layers)
    check_loras_fit(source)
    return source


def check_loras_fit(source: ModelSource) -> None:
    """Refuse, before any weight is read, LoRAs whose layers the model lacks or has in another shape: each module
    they adapt is built from its config on the meta device (nothing allocated) and checked."""
    if source.lora_set is None:
        return
    for module in source.lora_set.layers:
        weightless_module(source, module)


@dataclass(frozen=True)
class BackendOptions:
    """Which backend runs the model and how: --backend (None: follows --engines, else torch), --engines and the
    backend-specific settings."""

    backend: str | None = None
    engines: Path | None = None
    dtype: str = "fp32"
    device: str | None = None
    low_vram: bool = False
    cuda_graphs: bool = True
    weight_streaming_budget: str | None = None
    fp8: bool | None = None
    optimized: bool | None = None


def open_backend(options: BackendOptions, source: ModelSource, backend: str, log: Log) -> Backend:
    """The backend named `backend` (`choose_backend`'s answer) over `source`, saying which transformer graph it
    runs when it has one."""
    from fluxexport.backend_factory import create_backend

    engine = create_backend(
        backend, source, dtype=options.dtype, device=options.device, engines=options.engines,
        low_vram=options.low_vram, fp8=options.fp8, optimized=options.optimized, cuda_graphs=options.cuda_graphs,
        weight_streaming_budget=options.weight_streaming_budget,
    )  # fmt: skip
    if getattr(engine, "transformer_graph", None):
        log(f"transformer: {engine.transformer_graph}")
    return engine


def component_list(value: str | None) -> list[str] | None:
    """`a, b` → ['a', 'b']; None or empty → None (the command's default set)."""
    if not value:
        return None
    return [part.strip() for part in value.split(",") if part.strip()] or None


def check_output_paths(output: Path, count: int) -> list[Path]:
    """The PNG paths `count` images go to (`runtime.images.output_paths`), refused in one line when their
    folder cannot be written."""
    from fluxexport.runtime.images import output_paths

    paths = output_paths(output, count)
    parent = paths[0].parent
    if not parent.exists():
        raise FluxExportError(f"output folder {parent} does not exist: create it or choose another --output")
    if not parent.is_dir():
        raise FluxExportError(f"cannot write {paths[0]}: {parent} is not a folder (--output)")
    if not os.access(parent, os.W_OK):
        raise FluxExportError(f"cannot write to {parent}: permission denied (--output)")
    return paths


def check_out_file(out: Path) -> None:
    """Refuse an --out file that cannot be written, before anything runs."""
    parent = out.parent
    if out.is_dir():
        raise FluxExportError(f"cannot write {out}: it is a folder (--out)")
    if not parent.exists():
        raise FluxExportError(f"folder {parent} does not exist: create it or choose another --out")
    if not parent.is_dir():
        raise FluxExportError(f"cannot write {out}: {parent} is not a folder (--out)")
    if not os.access(parent, os.W_OK):
        raise FluxExportError(f"cannot write to {parent}: permission denied (--out)")
