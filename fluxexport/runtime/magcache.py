"""MagCache (diffusers' `MagCacheConfig`): skip the transformer's blocks while the magnitude of what they add to the
image stream is predicted to change little, and add their residual from the last computed step instead.

What the blocks add (the residual) is the image stream after the last block minus the stream that entered the
first one (the `x_embedder` output). Which steps skip depends on no tensor: `mag_ratios[t]`, the mean ratio of the
residual's per-token norm at step t to step t−1, is measured once per checkpoint (calibration, a run that skips
nothing) and stored; at run time the ratios multiply up while steps skip, and a step computes once the error
summed over the skipped steps, Σ |1 − Π ratios|, passes `threshold`, after `max_skip_steps` skips in a row, or in
the first `retention_ratio` of the steps. So `mag_schedule` is a pure function of the ratios and the knobs, as the
decisions of diffusers' hook are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from fluxexport.atomic import write_text_atomic
from fluxexport.errors import RequestError
from fluxexport.runtime.step_cache import PARTS, Components, Output, StepCache, tail_feeds

NAMED_RATIOS = ("flux-dev",)  # ratios=flux-dev: diffusers' FLUX_MAG_RATIOS (MagCache's, for FLUX.1-dev)


def interpolate_ratios(ratios: Sequence[float] | torch.Tensor, steps: int) -> torch.Tensor:
    """The ratios for a run of `steps` steps, float32: diffusers' `nearest_interp` where the lengths differ."""
    source = ratios if torch.is_tensor(ratios) else torch.tensor(list(ratios))
    if len(source) == steps:
        return source
    if steps == 1:
        return source[-1:]
    scale = (len(source) - 1) / (steps - 1)
    return source[torch.round(torch.arange(steps, dtype=torch.float32) * scale).long()]


def mag_schedule(
    ratios: torch.Tensor, threshold: float, max_skip_steps: int, retention_ratio: float
) -> tuple[bool, ...]:
    """Per step (one ratio each): whether it computes. The accumulators are float32 0-d tensors, as in diffusers'
    hook state, so that a sum that lands next to `threshold` decides the same way."""
    steps = len(ratios)
    retention = int(retention_ratio * steps + 0.5)
    product, error, skipped = torch.tensor(1.0), torch.tensor(0.0), 0
    computes: list[bool] = []
    for step in range(steps):
        compute = True
        if step >= retention:
            product = product * ratios[step]
            skipped += 1
            error = error + abs(1.0 - product)
            if step > 0 and bool(error <= threshold) and skipped <= max_skip_steps:  # step 0 always computes
                compute = False
            else:
                product, error, skipped = torch.tensor(1.0), torch.tensor(0.0), 0
        computes.append(compute)
    return tuple(computes)


def magnitude_ratio(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """diffusers' calibration formula: mean over batch and tokens of ‖r_t‖ / (‖r_{t−1}‖ + 1e-8), norms per token."""
    current_norm = torch.linalg.norm(residual.float(), dim=-1)
    previous_norm = torch.linalg.norm(previous.float(), dim=-1)
    return (current_norm / (previous_norm + 1e-8)).mean().item()


def named_ratios(name: str) -> list[float]:
    """A published set of ratios by name (`flux-dev`: diffusers' FLUX_MAG_RATIOS, 28 steps)."""
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    return {"flux-dev": FLUX_MAG_RATIOS}[name].tolist()


def read_ratios(path: str | Path) -> list[float]:
    """The ratios in a file `write_ratios` wrote, or a name in NAMED_RATIOS; refused in one line if unusable."""
    if str(path) in NAMED_RATIOS:
        return named_ratios(str(path))
    path = Path(path)
    if not path.is_file():
        raise RequestError(
            "cache",
            f"magcache ratios file {path} does not exist",
            f"write one with fluxexport calibrate-magcache --model MODEL --prompt TEXT --out {path}, or use "
            "ratios=flux-dev for FLUX.1-dev",
        )
    try:
        ratios = json.loads(path.read_text())["ratios"]
    except (ValueError, KeyError, TypeError):
        ratios = None
    if not _is_ratios(ratios):
        raise RequestError(
            "cache",
            f"magcache ratios file {path} holds no ratios",
            'it needs {"ratios": [positive numbers, …]} as fluxexport calibrate-magcache writes it',
            literal=True,
        )
    return [float(ratio) for ratio in ratios]


def ratios_provenance(path: str | Path) -> dict[str, object]:
    """What a ratios file records beside its ratios (`calibrate-magcache`: model, prompts, size, steps); nothing
    for a named set or a file that records nothing."""
    if str(path) in NAMED_RATIOS:
        return {}
    data = json.loads(Path(path).read_text())
    return {key: value for key, value in data.items() if key != "ratios"}


def check_calibrated_for(path: str | Path, provenance: dict[str, object], model: str | None, steps: int | None) -> None:
    """Refuse, in one line, ratios calibrated on another model or at another step count than the run's (a file
    that records neither, or a named set, is interpolated to the run's steps as diffusers does)."""
    calibrated_model, calibrated_steps = provenance.get("model"), provenance.get("steps")
    if model is not None and calibrated_model is not None and calibrated_model != model:
        raise RequestError(
            "cache", f"magcache ratios file {path} was calibrated on {calibrated_model}, not {model}",
            f"measure {model}'s own with fluxexport calibrate-magcache --model {model} --prompt TEXT --out FILE",
        )  # fmt: skip
    if steps is not None and calibrated_steps is not None and calibrated_steps != steps:
        raise RequestError(
            "cache", f"magcache ratios file {path} was calibrated at {calibrated_steps} steps, not {steps}",
            f"run {calibrated_steps} steps, or calibrate again with fluxexport calibrate-magcache --steps {steps}",
        )  # fmt: skip


def _is_ratios(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(r, int | float) and not isinstance(r, bool) and 0 < r < float("inf") for r in value)
    )


def write_ratios(path: str | Path, ratios: Sequence[float], **provenance: object) -> Path:
    """`{"ratios": [...], …provenance}` as JSON (atomically): what `--cache magcache:ratios=FILE` reads."""
    return write_text_atomic(Path(path), json.dumps({"ratios": list(ratios), **provenance}, indent=2) + "\n")


class ResidualReuse(StepCache):
    """A cache on the transformer in parts that reuses the blocks' residual: the head (embedders, first block) and
    the output layers run every step; the tail (every other block) runs where `computes` says (and while no
    residual is kept), and on the other steps the last computed step's residual is added to the embedded image
    stream. MagCache and TeaCache differ only in `computes`."""

    components = PARTS

    def __init__(self) -> None:
        super().__init__()
        self.residual: torch.Tensor | None = None  # what all blocks added to the image stream, last computed step

    def computes(self, step: int, head: Output) -> bool:
        """Whether step `step` (0-based) runs the tail, from the head's outputs."""
        raise NotImplementedError

    def __call__(self, feeds: Output, component: Components) -> Output:
        step = self.steps
        self.steps += 1
        head = component("transformer_head")(feeds)
        embedded = embedded_image(head)
        compute = self.computes(step, head) or self.residual is None
        if compute:
            image = component("transformer_tail")(tail_feeds(head, feeds))["tail_hidden"]
            self.residual = image - embedded
            self.computed += 1
        else:
            image = embedded + self.residual
        self.decisions.append(compute)
        return component("transformer_out")({"image_hidden": image, "temb": head["temb"]})


class MagCache(ResidualReuse):
    """MagCache on the transformer in parts, as diffusers' hook: the tail runs on the steps `schedule` computes."""

    name = "magcache"

    def __init__(self, schedule: Sequence[bool]) -> None:
        super().__init__()
        self.schedule = tuple(schedule)

    def computes(self, step: int, head: Output) -> bool:
        return step >= len(self.schedule) or self.schedule[step]


class MagCalibration(StepCache):
    """diffusers' `MagCacheConfig(calibrate=True)`: computes every step and records the magnitude ratio of each
    step's residual to the last one's (1.0 at the first step)."""

    name, components = "magcache-calibration", PARTS

    def __init__(self) -> None:
        super().__init__()
        self.residual: torch.Tensor | None = None
        self.ratios: list[float] = []

    def __call__(self, feeds: Output, component: Components) -> Output:
        self.steps += 1
        head = component("transformer_head")(feeds)
        image = component("transformer_tail")(tail_feeds(head, feeds))["tail_hidden"]
        residual = image - embedded_image(head)
        self.ratios.append(1.0 if self.residual is None else magnitude_ratio(residual, self.residual))
        self.residual = residual
        self.computed += 1
        self.decisions.append(True)
        return component("transformer_out")({"image_hidden": image, "temb": head["temb"]})


def embedded_image(head: Output) -> torch.Tensor:
    """The image stream that entered the first block (`x_embedder`'s output, what diffusers' hook subtracts): the
    head's `image_embedded`. Heads exported before it existed give it as image minus the first block's residual,
    which equals it up to the rounding of one subtraction."""
    if "image_embedded" in head:
        return head["image_embedded"]
    return head["image_hidden"] - head["first_block_residual"]
