"""`--weight-streaming-budget BYTES|PERCENT|auto`: how much of an engine's weights stay on the GPU.

An engine built with `--weight-streaming` streams the weights that do not fit its budget from host memory on
each launch. TensorRT's default budget streams nothing, so the build flag alone changes nothing: the budget is
set at run time, per engine, before any execution context exists."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fluxexport.errors import FluxExportError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
AUTO_HEADROOM = 2**30  # GPU memory `auto` leaves free beyond an engine's scratch: I/O buffers, CUDA graphs, torch
_HELP = (
    "--weight-streaming-budget takes BYTES (e.g. 12GiB, 8000MB), PERCENT of the streamable weights (e.g. 50%) or auto"
)


@dataclass(frozen=True)
class WeightBudget:
    """`auto` (what fits in the GPU's free memory), a percentage of the streamable weights, or bytes."""

    kind: str  # "auto" | "percent" | "bytes"
    value: float = 0.0

    def bytes_for(self, streamable: int, available: int) -> int:
        """The budget in bytes for an engine with `streamable` bytes of streamable weights; `auto` keeps on the
        GPU as much as `available` bytes hold (`automatic_budget`)."""
        if self.kind == "auto":
            return max(0, min(int(available), streamable))
        if self.kind == "percent":
            return int(streamable * self.value / 100)
        return int(min(self.value, streamable))

    def __str__(self) -> str:
        if self.kind == "auto":
            return "auto"
        return f"{self.value:g}%" if self.kind == "percent" else f"{int(self.value)} bytes"


def automatic_budget(free: int, scratch: int, headroom: int = AUTO_HEADROOM) -> int:
    """GPU memory the weights of an engine may keep (`auto`): what is free (cudaMemGetInfo) less the scratch memory
    its context will still allocate and a margin for buffers; never negative (then everything streams)."""
    return max(0, free - scratch - headroom)


def parse_budget(text: str) -> WeightBudget:
    """`auto`, `50%`, `12GiB`, `8000MB`, `123456789`; anything else is a one-line refusal."""
    value = text.strip().lower()
    if value == "auto":
        return WeightBudget("auto")
    percent = re.fullmatch(r"(\d+(?:\.\d+)?)%", value)
    if percent:
        share = float(percent.group(1))
        if not 0 <= share <= 100:
            raise FluxExportError(f"{_HELP}; a percentage lies in 0–100, not {text}")
        return WeightBudget("percent", share)
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", value)
    if size:
        return WeightBudget("bytes", float(size.group(1)) * _UNITS[size.group(2) or ""])
    raise FluxExportError(f"{_HELP}, not {text!r}")
