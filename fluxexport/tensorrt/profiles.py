"""Optimization profiles from the component specs: min/opt/max shapes per input, per resolution bucket.

No axis is computed here: each bucket is an `ExportBounds`, and its shapes are the specs' axes for it."""

from __future__ import annotations

from dataclasses import dataclass

from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.specs import ComponentSpec, ExportBounds, component_specs

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # input → (min, opt, max)

    def contains(self, shapes: dict[str, Shape]) -> bool:
        return all(
            len(shape) == len(low) and all(a <= s <= b for a, s, b in zip(low, shape, high, strict=True))
            for name, shape in shapes.items()
            for low, _, high in [self.shapes[name]]
        )


def resolution_buckets(low: int, opt: int, high: int, count: int) -> list[tuple[int, int, int]]:
    """Split [low, high] px into `count` (min, opt, max) buckets whose edges (multiples of 16) touch; each
    bucket's optimum is `opt` clamped into it. A narrower profile lets TensorRT pick kernels for the sizes it
    will see."""
    if count < 1:
        raise FluxExportError(f"need at least one resolution bucket, got {count}")
    edges = [low + round((high - low) * i / count / 16) * 16 for i in range(count)] + [high]
    return [(start, min(max(opt, start), end), end) for start, end in zip(edges, edges[1:], strict=False)]


def profile_bounds(bounds: ExportBounds, buckets: int) -> list[ExportBounds]:
    """The bounds of each profile: `bounds` with its resolution range split into `buckets`."""
    return [bounds.with_resolution(*bucket) for bucket in resolution_buckets(*bounds.resolution, buckets)]


def build_profile(spec: ComponentSpec) -> Profile:
    """Every input's (min, opt, max) shape, from the spec's axes."""
    return Profile({tensor.name: spec.shape_range(tensor) for tensor in spec.inputs})


def build_profiles(source: ModelSource, component: str, bounds: list[ExportBounds]) -> list[Profile]:
    """One profile per bucket's bounds, each from `component_specs(source, bucket)`; a component without image
    axes (the text encoders) needs only one."""
    profiles = [build_profile(component_specs(source, bucket)[component]) for bucket in bounds]
    return [profile for index, profile in enumerate(profiles) if profile not in profiles[:index]]


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
