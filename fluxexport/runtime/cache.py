"""Step caching: skip transformer evaluations that the last computed ones predict well, decided by the runtime
around any backend's transformer (a skipped step never reaches the engine).

`taylorseer` is diffusers' `TaylorSeerCacheConfig(use_lite_mode=True)`: the whole transformer output is computed
during `warmup` steps and then every `interval`-th step, and in between predicted by a Taylor expansion of order
`order` from the last computed outputs (divided differences over the step distance, stored in bfloat16 as
diffusers stores them). `--cache NAME[:key=value,…]` is parsed by `parse_cache`; knob names and defaults follow
diffusers' configs (`cache_interval` → interval, `max_order` → order, `disable_cache_before_step` → warmup).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fluxexport.errors import FluxExportError

Output = dict[str, torch.Tensor]

# name → its knobs and their defaults (diffusers' defaults)
CACHES: dict[str, dict[str, int | float]] = {
    "none": {},
    "taylorseer": {"interval": 5, "order": 1, "warmup": 3},
}


@dataclass(frozen=True)
class CacheSettings:
    """A step cache by name, with its knobs (missing ones take diffusers' defaults)."""

    name: str = "none"
    knobs: dict[str, int | float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in CACHES:
            raise FluxExportError(f"unknown cache {self.name!r}: choose one of {', '.join(CACHES)} (--cache)")
        unknown = sorted(set(self.knobs) - set(CACHES[self.name]))
        if unknown:
            takes = ", ".join(CACHES[self.name]) or "no keys"
            raise FluxExportError(f"{self.name} has no key {unknown[0]!r}: it takes {takes} (--cache)")
        object.__setattr__(self, "knobs", CACHES[self.name] | dict(self.knobs))
        for key, value in self.knobs.items():
            low = 1 if key in ("interval", "order") else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise FluxExportError(f"{self.name} {key} must be an integer ≥ {low}, got {value!r} (--cache)")

    def __str__(self) -> str:
        knobs = ",".join(f"{key}={value}" for key, value in self.knobs.items())
        return f"{self.name}:{knobs}" if knobs else self.name

    def new_state(self) -> StepCache:
        """A fresh cache for one generation (state never carries over between generations)."""
        if self.name == "taylorseer":
            return TaylorSeer(**self.knobs)  # type: ignore[arg-type]
        return NoCache()


def parse_cache(text: str | None) -> CacheSettings:
    """`taylorseer:interval=3,order=1,warmup=2`, `taylorseer`, `none` (or nothing) → CacheSettings."""
    if not text:
        return CacheSettings()
    name, _, rest = text.strip().partition(":")
    knobs: dict[str, int | float] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not value.strip():
            raise FluxExportError(f"{item!r} is not key=value: write --cache {name}:key=value,… (--cache)")
        knobs[key.strip()] = _number(value.strip())
    return CacheSettings(name.strip(), knobs)


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


class StepCache:
    """Decides, step by step, whether the transformer runs; counts the steps it computed."""

    def __init__(self) -> None:
        self.steps = 0  # transformer calls asked for
        self.computed = 0  # of them, full evaluations

    def __call__(self, compute: Callable[[], Output]) -> Output:
        raise NotImplementedError

    def summary(self) -> str:
        return f"transformer: computed {self.computed} of {self.steps} steps"


class NoCache(StepCache):
    def __call__(self, compute: Callable[[], Output]) -> Output:
        self.steps += 1
        self.computed += 1
        return compute()


class TaylorSeer(StepCache):
    """TaylorSeer on the transformer's whole output (diffusers' lite mode), step by step."""

    def __init__(self, interval: int = 5, order: int = 1, warmup: int = 3, factors_dtype=torch.bfloat16) -> None:
        super().__init__()
        self.interval, self.order, self.warmup, self.factors_dtype = interval, order, warmup, factors_dtype
        self.last_update: int | None = None
        self.factors: dict[str, list[torch.Tensor]] = {}  # output name → its Taylor factors, order 0 first
        self.dtypes: dict[str, torch.dtype] = {}

    def computes(self, step: int) -> bool:
        """diffusers' schedule: every step of the warm-up, then every `interval`-th one after it."""
        return step < self.warmup or (step - self.warmup - 1) % self.interval == 0

    def __call__(self, compute: Callable[[], Output]) -> Output:
        step = self.steps
        self.steps += 1
        if self.computes(step) or self.last_update is None:
            outputs = compute()
            self.computed += 1
            self._update(step, outputs)
            return outputs
        return self._predict(step)

    def _update(self, step: int, outputs: Output) -> None:
        for name, value in outputs.items():
            new = [value]
            previous = self.factors.get(name, [])
            if self.last_update is not None:
                distance = step - self.last_update
                for order in range(self.order):
                    if order >= len(previous) or previous[order].shape != new[order].shape:
                        break
                    new.append((new[order] - previous[order].to(value.dtype)) / distance)
            self.factors[name] = [factor.to(self.factors_dtype) for factor in new]
            self.dtypes[name] = value.dtype
        self.last_update = step

    def _predict(self, step: int) -> Output:
        assert self.last_update is not None
        offset = step - self.last_update
        predicted = {}
        for name, factors in self.factors.items():
            dtype = self.dtypes[name]
            output = torch.zeros_like(factors[0], dtype=dtype)
            for order, factor in enumerate(factors):
                output = output + factor.to(dtype) * ((offset**order) / math.factorial(order))
            predicted[name] = output
        return predicted
