"""Optimization profiles from the component specs: min/opt/max shapes per input, per resolution bucket."""

from __future__ import annotations

from dataclasses import dataclass

from fluxexport.errors import FluxExportError
from fluxexport.specs import ComponentSpec, image_tokens, kontext_encoder_sides, kontext_tokens

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise FluxExportError(f"a profile range needs 1 ≤ min ≤ opt ≤ max, got {self.min}/{self.opt}/{self.max}")

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max


@dataclass(frozen=True)
class ProfileRequest:
    """What one optimization profile serves: batch, image side in pixels, T5 length."""

    batch: Range
    resolution: Range
    text: Range
    kontext: bool = False


@dataclass(frozen=True)
class Profile:
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # input → (min, opt, max)

    def contains(self, shapes: dict[str, Shape]) -> bool:
        return all(
            len(shape) == len(low) and all(a <= s <= b for a, s, b in zip(low, shape, high, strict=True))
            for name, shape in shapes.items()
            for low, _, high in [self.shapes[name]]
        )


def resolution_buckets(low: int, opt: int, high: int, count: int) -> list[Range]:
    """Split [low, high] px into `count` buckets whose edges (multiples of 16) touch; each bucket's optimum is
    `opt` clamped into it. A narrower profile lets TensorRT pick kernels for the sizes it will see."""
    if count < 1:
        raise FluxExportError(f"need at least one resolution bucket, got {count}")
    edges = [low + round((high - low) * i / count / 16) * 16 for i in range(count)] + [high]
    return [Range(start, min(max(opt, start), end), end) for start, end in zip(edges, edges[1:], strict=False)]


def axis_ranges(spec: ComponentSpec, request: ProfileRequest, vae_scale_factor: int = 8) -> dict[str, Range]:
    """The range of every symbolic axis of `spec` under `request`."""
    b, r, t = request.batch, request.resolution, request.text
    ranges = {"B": b, "L": t}
    sides = (r.min, r.opt, r.max)
    ranges["N"] = Range(*(kontext_tokens(*sides) if request.kontext else (image_tokens(s) for s in sides)))
    ranges["h"] = ranges["w"] = Range(r.min // vae_scale_factor, r.opt // vae_scale_factor, r.max // vae_scale_factor)
    ranges["H"] = ranges["W"] = Range(*kontext_encoder_sides(*sides)) if request.kontext else r
    return {axis: ranges[axis] for axis in spec.axes}


def build_profile(spec: ComponentSpec, request: ProfileRequest, vae_scale_factor: int = 8) -> Profile:
    ranges = axis_ranges(spec, request, vae_scale_factor)
    shapes = {}
    for tensor in spec.inputs:
        shapes[tensor.name] = tuple(
            tuple(dim if isinstance(dim, int) else getattr(ranges[dim], which) for dim in tensor.dims)
            for which in ("min", "opt", "max")
        )
    return Profile(shapes)


def build_profiles(spec: ComponentSpec, requests: list[ProfileRequest], vae_scale_factor: int = 8) -> list[Profile]:
    """One profile per request (e.g. per resolution bucket); components without image axes need only one."""
    image_axes = {"N", "h", "w", "H", "W"} & set(spec.axes)
    if not image_axes:
        requests = requests[:1]
    return [build_profile(spec, request, vae_scale_factor) for request in requests]


def select_profile(profiles: list[Profile], shapes: dict[str, Shape], component: str) -> int:
    """Index of the first profile that serves `shapes`, or a clear refusal naming the served range."""
    for index, profile in enumerate(profiles):
        if profile.contains(shapes):
            return index
    ranges = "; ".join(
        ", ".join(f"{name} {low}…{high}" for name, (low, _, high) in profile.shapes.items()) for profile in profiles
    )
    given = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
    raise FluxExportError(
        f"{component}: shapes {given} are outside the engine's profiles ({ranges}): rebuild with a wider "
        "--min/--max-resolution, --batch or --text-len"
    )
