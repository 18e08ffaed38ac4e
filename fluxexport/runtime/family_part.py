"""What the generic pipeline (`runtime.pipeline`) asks of a family's runtime part (`families/<f>/runtime.py`,
reached as `source.family.part("runtime")`): how a request's prompts and references are encoded, how noise is
drawn and scheduled, which inputs the transformer takes each step, and how latents become images. The Euler loop,
the step caches, true CFG's combination and the timings are the pipeline's own, the same for every family."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from fluxexport.models.source import ModelSource
    from fluxexport.runtime.backend import Backend
    from fluxexport.runtime.cache import CacheSettings
    from fluxexport.runtime.request import RequestReferences, ResolvedRequest
    from fluxexport.runtime.step_cache import StepCache

Grid = tuple[int, int]  # the family's latent grid of a request (FLUX.1: VAE latents; FLUX.2: 2×2 patches)
TransformerInputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EncodedPrompts:
    """A request's prompts encoded, each repeated per image: the text tensors of the conditional run, those of
    the unconditional one (true CFG's negative prompts) or None, and any warnings (truncation)."""

    text: TransformerInputs
    negative: TransformerInputs | None = None
    warnings: list[str] = field(default_factory=list)


class FamilyRuntime(Protocol):
    """The names every `families/<f>/runtime.py` defines (`RUNTIME_NAMES`), as module-level functions."""

    def request_references(
        self, source: ModelSource, images: Sequence[Image.Image] | None
    ) -> RequestReferences: ...  # checked as the family's diffusers pipeline checks them

    def check_cache(self, source: ModelSource, cache: CacheSettings | StepCache) -> None: ...

    def encode_prompts(
        self, backend: Backend, source: ModelSource, resolved: ResolvedRequest, repeats: int
    ) -> EncodedPrompts: ...

    def latent_grid(self, source: ModelSource, resolved: ResolvedRequest) -> Grid: ...

    def image_ids(self, grid: Grid) -> torch.Tensor: ...

    def encode_references(
        self, backend: Backend, source: ModelSource, resolved: ResolvedRequest, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None: ...  # (tokens [B,M,D], ids) | (channels [B,N,·], None)

    def noise_tokens(self, source: ModelSource, resolved: ResolvedRequest, batch: int, seed: int) -> torch.Tensor: ...

    def sigmas(self, source: ModelSource, steps: int, tokens: int) -> torch.Tensor: ...

    def transformer_inputs(
        self, source: ModelSource, prompts: EncodedPrompts, ids: torch.Tensor, guidance_scale: float
    ) -> tuple[TransformerInputs, TransformerInputs | None]: ...  # (conditional, unconditional or None)

    def decode(self, backend: Backend, source: ModelSource, latents: torch.Tensor, grid: Grid) -> np.ndarray: ...


RUNTIME_NAMES = tuple(name for name in vars(FamilyRuntime) if not name.startswith("_"))
