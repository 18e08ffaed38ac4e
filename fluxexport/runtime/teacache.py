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

The polynomial is fitted per model, as ali-vilab fit theirs: over uncached runs, each step's relative L1 change of
the modulated input (x) against the relative L1 change of the transformer's output (y), both from the previous
step, fitted y ≈ P(x) with numpy.polyfit of degree 4 (`TeaCalibration`, `fit_polynomial`; `fluxexport
calibrate-teacache` writes them with their provenance, `coefficients=FILE` reads them). ali-vilab's FLUX.1-dev set
is the default; a model of another transformer class run with it gets one warning line. NVIDIA's published FLUX.2
set (TensorRT-LLM `_torch/visual_gen`, FLUX2_TEACACHE_COEFFICIENTS) rescales the change of the timestep embedding,
not of the modulated input, so it is not offered here: applied to our input it would be another polynomial's.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fluxexport.atomic import write_text_atomic
from fluxexport.errors import FluxExportError, RequestError
from fluxexport.runtime.magcache import ResidualReuse
from fluxexport.runtime.step_cache import PARTS, Components, Output, StepCache, tail_feeds

# name → (the rescaling polynomial's coefficients, highest power first, as np.poly1d takes them; where they come from)
COEFFICIENTS: dict[str, tuple[tuple[float, ...], str]] = {
    "flux1-dev": (
        (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
        "ali-vilab/TeaCache, TeaCache4FLUX/teacache_flux.py (fitted on FLUX.1-dev's first-block modulated input)",
    ),
}
FITTED_ON = {"flux1-dev": "FluxTransformer2DModel"}  # a published set → the diffusers transformer class it fits
MODULATED = "first_block_modulated"  # the head output TeaCache compares
DEGREE = 4  # ali-vilab's polynomial degree
CALIBRATE = "fluxexport calibrate-teacache --model {model} --out FILE"


def coefficients(spec: str) -> tuple[float, ...]:
    """A published coefficient set by name, or the polynomial in a file `write_coefficients` wrote; refused in one
    line when neither."""
    return read_coefficients(spec)[0]


def read_coefficients(spec: str) -> tuple[tuple[float, ...], dict[str, object]]:
    """(the polynomial, highest power first; what its file records beside it: model, steps, prompts, …) for a
    published set's name (provenance: its source and transformer class) or a `calibrate-teacache` file."""
    if spec in COEFFICIENTS:
        polynomial, origin = COEFFICIENTS[spec]
        return polynomial, {"source": origin, "transformer_class": FITTED_ON[spec]}
    path = Path(spec)
    if not path.is_file():
        raise RequestError(
            "cache", f"teacache has no coefficients {spec!r} (no such set or file)",
            f"choose one of {', '.join(COEFFICIENTS)}, or a file written by {CALIBRATE.format(model='MODEL')}",
        )  # fmt: skip
    try:
        data = json.loads(path.read_text())
        polynomial = data["coefficients"]
    except (ValueError, KeyError, TypeError, OSError):
        polynomial, data = None, {}
    if not _is_polynomial(polynomial):
        raise RequestError(
            "cache", f"teacache coefficients file {path} holds no polynomial",
            f'it needs {{"coefficients": [{DEGREE + 1} finite numbers, highest power first], …}} as '
            "fluxexport calibrate-teacache writes it",
            literal=True,
        )  # fmt: skip
    return tuple(float(c) for c in polynomial), {key: value for key, value in data.items() if key != "coefficients"}


def _is_polynomial(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == DEGREE + 1
        and all(isinstance(c, int | float) and not isinstance(c, bool) and np.isfinite(c) for c in value)
    )


def check_coefficients_for(spec: str, model: str) -> None:
    """Refuse, in one line, a coefficients file calibrated on another model than `model`."""
    calibrated = read_coefficients(spec)[1].get("model")
    if calibrated is not None and calibrated != model:
        raise RequestError(
            "cache", f"teacache coefficients file {spec} was calibrated on {calibrated}, not {model}",
            f"fit {model}'s own with {CALIBRATE.format(model=model)} and pass coefficients=FILE",
        )  # fmt: skip


def coefficients_warning(spec: str, model: str, transformer_class: str) -> str | None:
    """One line when a published set fitted on another transformer class serves `model` (FLUX.2 with FLUX.1-dev's
    polynomial), else None."""
    fitted = read_coefficients(spec)[1].get("transformer_class")
    if spec not in COEFFICIENTS or fitted == transformer_class:
        return None
    return (
        f"teacache: {model} ({transformer_class}) runs with {spec}'s polynomial (fitted on {fitted}); fit its own "
        f"with {CALIBRATE.format(model=model)} and pass --cache teacache:coefficients=FILE"
    )


def check_enough_pairs(steps: int, runs: int) -> None:
    """Refuse, in one line before any run, calibration runs too short to fit the polynomial: each run of `steps`
    steps gives steps − 1 pairs, and a degree-4 fit needs 5."""
    if runs * (steps - 1) < DEGREE + 1:
        raise RequestError(
            "steps", f"{runs} run(s) of {steps} steps give {runs * max(steps - 1, 0)} step pairs, too few to fit a "
            f"degree-{DEGREE} polynomial", f"calibrate with at least {DEGREE + 2} steps, or more --seed runs",
        )  # fmt: skip


def fit_polynomial(pairs: Sequence[tuple[float, float]]) -> tuple[float, ...]:
    """ali-vilab's fit: numpy.polyfit of degree 4, output change against input change, highest power first."""
    if len(pairs) < DEGREE + 1:
        raise FluxExportError(f"{len(pairs)} step pairs cannot fit a degree-{DEGREE} polynomial")
    inputs, outputs = zip(*pairs, strict=True)
    return tuple(float(c) for c in np.polyfit(np.asarray(inputs, float), np.asarray(outputs, float), DEGREE))


def write_coefficients(path: str | Path, polynomial: Sequence[float], **provenance: object) -> Path:
    """`{"coefficients": [...], …provenance, "date": UTC now}` as JSON (atomically): what
    `--cache teacache:coefficients=FILE` reads."""
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    data = {"coefficients": list(polynomial), **provenance, "date": date}
    return write_text_atomic(Path(path), json.dumps(data, indent=2) + "\n")


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """TeaCache's distance: mean |current − previous| / mean |previous| over every element, on the host."""
    return ((current - previous).abs().mean() / previous.abs().mean()).item()


def rescale(polynomial: tuple[float, ...], distance: float) -> float:
    """The rescaled distance: the polynomial at `distance`, in float64 as np.poly1d evaluates it."""
    return float(np.poly1d(polynomial)(distance))


def check_head(head: Output | Sequence[str]) -> None:
    """Refuse, in one line, a head (its outputs, or their names) without the modulated input: a graph exported
    before TeaCache."""
    if MODULATED not in head:
        raise FluxExportError(
            f"the transformer_head graph has no {MODULATED} output (exported before TeaCache): export the "
            "transformer's parts again (fluxexport export --components transformer_head,transformer_tail,"
            "transformer_out) or use another cache"
        )


def check_head_component(component: Components) -> None:
    """`check_head` on the outputs a backend's head declares (`output_names`), where it declares them (PyTorch's
    head module always gives the modulated input)."""
    names = getattr(component("transformer_head"), "output_names", None)
    if names is not None:
        check_head(list(names))


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


class TeaCache(ResidualReuse):
    """TeaCache on the transformer in parts: the tail (every other block) runs on the steps `TeaCacheDecisions`
    computes from the head's modulated input."""

    name = "teacache"

    def __init__(self, threshold: float, steps: int, polynomial: tuple[float, ...]) -> None:
        super().__init__()
        self.decide = TeaCacheDecisions(threshold, steps, polynomial)

    def check_components(self, component: Components) -> None:
        """Refuse a head graph without the modulated input before the first step, where the backend says what its
        head gives (`output_names`: ONNX Runtime's sessions, TensorRT's engines, Triton's models)."""
        check_head_component(component)

    def computes(self, step: int, head: Output) -> bool:
        check_head(head)
        return self.decide.computes(head[MODULATED])


class TeaCalibration(StepCache):
    """TeaCache's calibration run: every step computed through the parts; from the second step on, each step's
    (relative L1 change of the modulated input, relative L1 change of the transformer's output) against the
    previous step's, the pairs ali-vilab fit their polynomial to."""

    name, components = "teacache-calibration", PARTS

    def __init__(self) -> None:
        super().__init__()
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pairs: list[tuple[float, float]] = []

    def check_components(self, component: Components) -> None:
        check_head_component(component)

    def __call__(self, feeds: Output, component: Components) -> Output:
        self.steps += 1
        head = component("transformer_head")(feeds)
        check_head(head)
        image = component("transformer_tail")(tail_feeds(head, feeds))["tail_hidden"]
        outputs = component("transformer_out")({"image_hidden": image, "temb": head["temb"]})
        modulated, output = head[MODULATED], outputs["latent"]
        if self.previous is not None:
            self.pairs.append((relative_l1(modulated, self.previous[0]), relative_l1(output, self.previous[1])))
        self.previous = (modulated, output)
        self.computed += 1
        self.decisions.append(True)
        return outputs
