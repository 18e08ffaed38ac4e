"""TeaCache (ali-vilab/TeaCache, `TeaCache4FLUX/teacache_flux.py`): skip the transformer's blocks while the first
block's modulated input changes little from step to step, and add their residual from the last computed step
instead.

Each step the head gives the first block's modulated image input (its `norm1` of the embedded image stream with
the time modulation, the head's `first_block_modulated` output). Its relative L1 change from the previous step's,
mean |x_t − x_{t−1}| / mean |x_{t−1}| (one number for the whole batch), is rescaled by a polynomial fitted to the
model (`COEFFICIENTS`) and accumulated; a step computes when the accumulation reaches `threshold` (which resets
it), and the first and the last step always compute. On the other steps the blocks' residual from the last
computed step (the image stream after the last block minus the embedded stream) is added to the embedded stream,
as MagCache does. The decision needs one number on the host per step: the only synchronisation a step has.
"""

from __future__ import annotations

import numpy as np
import torch

from fluxexport.errors import FluxExportError, RequestError
from fluxexport.runtime.magcache import embedded_image
from fluxexport.runtime.step_cache import PARTS, Components, Output, StepCache, tail_feeds

# name → (the rescaling polynomial's coefficients, highest power first, as np.poly1d takes them; where they come from)
COEFFICIENTS: dict[str, tuple[tuple[float, ...], str]] = {
    "flux1-dev": (
        (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
        "ali-vilab/TeaCache, TeaCache4FLUX/teacache_flux.py (fitted on FLUX.1-dev's first-block modulated input)",
    ),
}
MODULATED = "first_block_modulated"  # the head output TeaCache compares


def coefficients(name: str) -> tuple[float, ...]:
    """A published coefficient set by name; refused in one line when unknown."""
    if name not in COEFFICIENTS:
        raise RequestError(
            "cache", f"teacache has no coefficients {name!r}", f"choose one of {', '.join(COEFFICIENTS)}"
        )
    return COEFFICIENTS[name][0]


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """TeaCache's distance: mean |current − previous| / mean |previous| over every element, on the host."""
    return ((current - previous).abs().mean() / previous.abs().mean()).item()


def rescale(polynomial: tuple[float, ...], distance: float) -> float:
    """The rescaled distance: the polynomial at `distance`, in float64 as np.poly1d evaluates it."""
    return float(np.poly1d(polynomial)(distance))


class TeaCacheDecisions:
    """TeaCache's step-by-step decision, apart from any tensor but the compared one: `computes(modulated)` says
    whether the step computes, and remembers the input for the next step (every step's, skipped or not)."""

    def __init__(self, threshold: float, steps: int, polynomial: tuple[float, ...]) -> None:
        self.threshold, self.steps, self.polynomial = threshold, steps, polynomial
        self.step = 0
        self.accumulated = 0.0
        self.previous: torch.Tensor | None = None

    def computes(self, modulated: torch.Tensor) -> bool:
        step, self.step = self.step, self.step + 1
        if step == 0 or step == self.steps - 1 or self.previous is None:
            compute, self.accumulated = True, 0.0
        else:
            self.accumulated += rescale(self.polynomial, relative_l1(modulated, self.previous))
            compute = self.accumulated >= self.threshold
            if compute:
                self.accumulated = 0.0
        self.previous = modulated
        return compute


class TeaCache(StepCache):
    """TeaCache on the transformer in parts: the head and the output layers run every step, the tail (every other
    block) on the steps `TeaCacheDecisions` computes."""

    name, components = "teacache", PARTS

    def __init__(self, threshold: float, steps: int, polynomial: tuple[float, ...]) -> None:
        super().__init__()
        self.decide = TeaCacheDecisions(threshold, steps, polynomial)
        self.residual: torch.Tensor | None = None  # what all blocks added to the image stream, last computed step

    def __call__(self, feeds: Output, component: Components) -> Output:
        self.steps += 1
        head = component("transformer_head")(feeds)
        if MODULATED not in head:
            raise FluxExportError(
                f"the transformer_head graph has no {MODULATED} output (exported before TeaCache): export the "
                "transformer's parts again (fluxexport export --components transformer_head,transformer_tail,"
                "transformer_out) or use another cache"
            )
        embedded = embedded_image(head)
        compute = self.decide.computes(head[MODULATED]) or self.residual is None
        if compute:
            image = component("transformer_tail")(tail_feeds(head, feeds))["tail_hidden"]
            self.residual = image - embedded
            self.computed += 1
        else:
            image = embedded + self.residual
        self.decisions.append(compute)
        return component("transformer_out")({"image_hidden": image, "temb": head["temb"]})
