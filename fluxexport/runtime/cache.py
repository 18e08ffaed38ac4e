"""Step caching: skip transformer evaluations that the last computed ones predict well, decided by the runtime
around any backend's transformer (a skipped step never reaches the engine).

`first-block` is diffusers' `FirstBlockCacheConfig`: every step runs the transformer's head (embedders and the first
double block, the `transformer_head` component); when the first block's image residual changed by at most
`threshold` (mean |Δ| / mean |previous|, against the last computed step) the other blocks are skipped and their
residual from the last computed step is added instead; the output layers (`transformer_out`) always run.

`taylorseer` is diffusers' `TaylorSeerCacheConfig(use_lite_mode=True)`: the whole transformer output is computed
during `warmup` steps and then every `interval`-th step, and in between predicted by a Taylor expansion of order
`order` from the last computed outputs (divided differences over the step distance, stored in bfloat16 as
diffusers stores them). `--cache NAME[:key=value,…]` is parsed by `parse_cache`; knob names and defaults follow
diffusers' configs (`cache_interval` → interval, `max_order` → order, `disable_cache_before_step` → warmup).

`magcache` is diffusers' `MagCacheConfig` (runtime/magcache.py) on the same three parts: the head and the output
layers run every step; the other blocks run on the steps that the checkpoint's magnitude ratios (`ratios=FILE`
from a calibration run, or `ratios=flux-dev`) and `threshold`, `max_skip_steps`, `retention_ratio` compute, and
on the others the blocks' residual from the last computed step is added to the embedded image stream.

`teacache` is ali-vilab's TeaCache4FLUX (runtime/teacache.py) on the same three parts: the blocks run on the steps
where the rescaled relative L1 change of the first block's modulated input, accumulated since the last computed
step, reaches `threshold` (and on the first and last step); `coefficients` names the rescaling polynomial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fluxexport.errors import FluxExportError, RequestError
from fluxexport.runtime.magcache import (
    MagCache,
    MagCalibration,
    check_calibrated_for,
    interpolate_ratios,
    mag_schedule,
    ratios_provenance,
    read_ratios,
)
from fluxexport.runtime.step_cache import PARTS, Components, NoCache, Output, StepCache, tail_feeds
from fluxexport.runtime.teacache import TeaCache, check_coefficients_for, coefficients, coefficients_warning

__all__ = ["CACHES", "CacheSettings", "MagCalibration", "NoCache", "StepCache", "parse_cache", "tail_feeds"]


Knob = int | float | str
# name → its knobs and their defaults (diffusers' defaults; magcache's ratios have none: "" until given)
CACHES: dict[str, dict[str, Knob]] = {
    "none": {},
    "first-block": {"threshold": 0.05},
    "taylorseer": {"interval": 5, "order": 1, "warmup": 3},
    "magcache": {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2, "ratios": ""},
    "teacache": {"threshold": 0.25, "coefficients": "flux1-dev"},
}


@dataclass(frozen=True)
class CacheSettings:
    """A step cache by name, with its knobs (missing ones take diffusers' defaults). `steps` is the run's step
    count where a cache needs it before the first step (magcache: diffusers' `num_inference_steps`);
    `new_state(steps)` may give it instead."""

    name: str = "none"
    knobs: dict[str, Knob] = field(default_factory=dict)
    steps: int | None = None
    mag_ratios: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)  # magcache: as read
    mag_provenance: dict[str, object] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in CACHES:
            raise RequestError("cache", f"unknown cache {self.name!r}", f"choose one of {', '.join(CACHES)}")
        unknown = sorted(set(self.knobs) - set(CACHES[self.name]))
        if unknown:
            takes = ", ".join(CACHES[self.name]) or "no keys"
            raise RequestError("cache", f"{self.name} has no key {unknown[0]!r}", f"it takes {takes}")
        object.__setattr__(self, "knobs", CACHES[self.name] | dict(self.knobs))
        for key, value in self.knobs.items():
            _check_knob(self.name, key, value)
        if self.name == "magcache":
            object.__setattr__(self, "mag_ratios", tuple(read_ratios(str(self.knobs["ratios"]))))
            object.__setattr__(self, "mag_provenance", ratios_provenance(str(self.knobs["ratios"])))

    def __str__(self) -> str:
        knobs = ",".join(f"{key}={value}" for key, value in self.knobs.items())
        return f"{self.name}:{knobs}" if knobs else self.name

    @property
    def components(self) -> tuple[str, ...]:
        """The transformer components this cache runs."""
        return PARTS if self.name in ("first-block", "magcache", "teacache") else ("transformer",)

    def new_state(self, steps: int | None = None) -> StepCache:
        """A fresh cache for one generation of `steps` steps (state never carries over between generations)."""
        if self.name == "taylorseer":
            return TaylorSeer(**self.knobs)  # type: ignore[arg-type]
        if self.name == "first-block":
            return FirstBlockCache(float(self.knobs["threshold"]))
        if self.name == "magcache":
            return self._magcache(steps or self.steps)
        if self.name == "teacache":
            return self._teacache(steps or self.steps)
        return NoCache()

    def _teacache(self, steps: int | None) -> StepCache:
        if steps is None:
            raise FluxExportError("teacache needs the run's step count: pass new_state(steps) or CacheSettings(steps=)")
        return TeaCache(float(self.knobs["threshold"]), steps, coefficients(str(self.knobs["coefficients"])))

    def check_calibrated_for(self, model: str) -> None:
        """MagCache, TeaCache: refuse, in one line, a ratios or coefficients file calibrated on another model than
        `model`."""
        if self.name == "magcache":
            check_calibrated_for(self.knobs["ratios"], self.mag_provenance, model, None)
        if self.name == "teacache":
            check_coefficients_for(str(self.knobs["coefficients"]), model)

    def warnings(self, model: str, transformer_class: str) -> list[str]:
        """One line per thing the run should know about this cache on `model` (TeaCache: a published polynomial
        fitted on another transformer class)."""
        if self.name != "teacache":
            return []
        warning = coefficients_warning(str(self.knobs["coefficients"]), model, transformer_class)
        return [warning] if warning else []

    def _magcache(self, steps: int | None) -> StepCache:
        if steps is None:
            raise FluxExportError("magcache needs the run's step count: pass new_state(steps) or CacheSettings(steps=)")
        knobs = self.knobs
        check_calibrated_for(knobs["ratios"], self.mag_provenance, None, steps)
        schedule = mag_schedule(
            interpolate_ratios(self.mag_ratios, steps), float(knobs["threshold"]), int(knobs["max_skip_steps"]),
            float(knobs["retention_ratio"]),
        )  # fmt: skip
        return MagCache(schedule)


def _check_knob(cache: str, key: str, value: Knob) -> None:
    """Refuse a knob value in one line (`ratios` is checked by reading it)."""
    if key == "ratios":
        if value == "":
            raise RequestError(
                "cache", "magcache needs ratios",
                "pass ratios=FILE (written by fluxexport calibrate-magcache) or ratios=flux-dev (diffusers' FLUX.1-dev "
                "ratios)",
            )  # fmt: skip
        return
    if key == "coefficients":
        coefficients(str(value))
        return
    if key == "threshold":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
            raise RequestError("cache", f"{cache} threshold must be a number ≥ 0, got {value!r}")
        return
    if key == "retention_ratio":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise RequestError("cache", f"{cache} retention_ratio must be a number in [0, 1], got {value!r}")
        return
    low = 1 if key in ("interval", "order") else 0
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise RequestError("cache", f"{cache} {key} must be an integer ≥ {low}, got {value!r}")


def parse_cache(text: str | None) -> CacheSettings:
    """`taylorseer:interval=3,order=1,warmup=2`, `taylorseer`, `none` (or nothing) → CacheSettings."""
    if not text:
        return CacheSettings()
    name, _, rest = text.strip().partition(":")
    knobs: dict[str, Knob] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not value.strip():
            raise RequestError("cache", f"{item!r} is not key=value", f"write {{option}} {name}:key=value,…")
        knobs[key.strip()] = _number(value.strip())
    return CacheSettings(name.strip(), knobs)


def _number(text: str) -> Knob:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


class FirstBlockCache(StepCache):
    """First Block Cache on the transformer in parts (`transformer_head`, `_tail`, `_out`), as diffusers' hook."""

    name, components = "first-block", PARTS

    def __init__(self, threshold: float = 0.05) -> None:
        super().__init__()
        self.threshold = threshold
        self.residual: torch.Tensor | None = None  # the first block's image residual at the last computed step
        self.tail_residual: torch.Tensor | None = None  # what the other blocks added then

    def changed(self, residual: torch.Tensor) -> float:
        """diffusers' metric: mean |r − r_prev| / mean |r_prev|, one number for the whole batch."""
        assert self.residual is not None
        return ((residual - self.residual).abs().mean() / self.residual.abs().mean()).item()

    def __call__(self, feeds: Output, component: Components) -> Output:
        self.steps += 1
        head = component("transformer_head")(feeds)
        residual, image = head["first_block_residual"], head["image_hidden"]
        compute = self.residual is None or self.changed(residual) > self.threshold
        if compute:
            self.residual = residual
            image = component("transformer_tail")(tail_feeds(head, feeds))["tail_hidden"]
            self.tail_residual = image - head["image_hidden"]
            self.computed += 1
        else:
            assert self.tail_residual is not None
            image = self.tail_residual + image
        self.decisions.append(compute)
        return component("transformer_out")({"image_hidden": image, "temb": head["temb"]})


class TaylorSeer(StepCache):
    """TaylorSeer on the transformer's whole output (diffusers' lite mode), step by step."""

    name = "taylorseer"

    def __init__(self, interval: int = 5, order: int = 1, warmup: int = 3, factors_dtype=torch.bfloat16) -> None:
        super().__init__()
        self.interval, self.order, self.warmup, self.factors_dtype = interval, order, warmup, factors_dtype
        self.last_update: int | None = None
        self.factors: dict[str, list[torch.Tensor]] = {}  # output name → its Taylor factors, order 0 first
        self.dtypes: dict[str, torch.dtype] = {}

    def computes(self, step: int) -> bool:
        """diffusers' schedule: every step of the warm-up, then every `interval`-th one after it."""
        return step < self.warmup or (step - self.warmup - 1) % self.interval == 0

    def __call__(self, feeds: Output, component: Components) -> Output:
        step = self.steps
        self.steps += 1
        compute = self.computes(step) or self.last_update is None
        self.decisions.append(compute)
        if compute:
            outputs = component("transformer")(feeds)
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
