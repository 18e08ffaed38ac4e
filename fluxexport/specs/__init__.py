"""One declarative spec per exported component: tensor names, dtypes, symbolic axes and their bounds.

Export (dynamic shapes), the ONNX Runtime backend (I/O), `check` (contract), `validate` (shapes to test)
and later TensorRT profiles and Triton dims all read these; no name or shape is written anywhere else.
Names follow NVIDIA's TensorRT diffusion demo (see ARCHITECTURE.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxexport.artifacts.files import MANIFEST
from fluxexport.artifacts.folders import TENSORRT, Folder, open_folder
from fluxexport.dtypes import COMPUTE
from fluxexport.families import FAMILIES, FLUX1
from fluxexport.families.family import NO_REFERENCE, REFERENCE_BUDGET, TRANSFORMER_PARTS
from fluxexport.models.source import ModelSource
from fluxexport.runtime.request import ResolvedRequest
from fluxexport.specs.core import (
    REFERENCE_OPTIONS,
    Axis,
    ComponentSpec,
    Dim,
    ExportBounds,
    TensorSpec,
    image_tokens,
    refuse_reference_options,
)

__all__ = [
    "REFERENCE_OPTIONS",
    "TRANSFORMER_PARTS",
    "Axis",
    "ComponentSpec",
    "Dim",
    "ExportBounds",
    "TensorSpec",
    "check_folder_serves",
    "check_request_within",
    "check_served",
    "component_specs",
    "image_tokens",
    "refuse_reference_options",
]

COMPONENTS = FLUX1.components  # FLUX.1's five (what the CLI lists before a model is read)
# Every component of every family (`Family.module_of`: FLUX.1's five, the transformer in three parts for the step
# caches that skip blocks, `--cache first-block`/`magcache`, exported on demand with `--transformer-parts`; FLUX.2's
# one text encoder), in that order
KNOWN_COMPONENTS = tuple(dict.fromkeys(name for family in FAMILIES for name in family.module_of))


def pipeline_components(source: ModelSource) -> tuple[str, ...]:
    """The components a text-to-image run needs: all but the VAE encoder, which a pipeline that takes reference
    images (Kontext's, FLUX.2's) needs too."""
    takes_references = source.reference_mode != NO_REFERENCE
    return tuple(name for name in source.components if name != "vae_encoder" or takes_references)


def component_specs(source: ModelSource, bounds: ExportBounds | None = None) -> dict[str, ComponentSpec]:
    """The component specs of a checkpoint's family (`families/<f>/specs.py`: FLUX.1's five and the transformer's
    parts; FLUX.2's four and the transformer's parts), with widths read from its configs."""
    return source.family.part("specs").component_specs(source, bounds or ExportBounds.for_model(source))


ENGINE_WORDING = ("the engines were built for", "rebuild them with")
EXPORT_WORDING = ("the export was made for", "export again with")


def check_served(source: ModelSource, backend: str, engines: Path | None, resolved: ResolvedRequest) -> None:
    """Refuse, before any work, a request whose references exceed the reference budget `engines` serves (FLUX.2):
    an engine folder's build bounds (`tensorrt`) or an ONNX folder's manifest bounds (`onnxruntime`)."""
    if backend == "torch" or engines is None or not _budgeted(source, resolved):
        return
    if not (Path(engines) / MANIFEST).is_file():
        return  # the backend says what is missing
    check_folder_serves(source, open_folder(Path(engines)), resolved)


def check_folder_serves(source: ModelSource, folder: Folder, resolved: ResolvedRequest) -> None:
    """`check_served` for an opened folder (what the ONNX Runtime and TensorRT backends' `check_request` ask)."""
    if not _budgeted(source, resolved):
        return  # nothing to read the bounds for
    built = folder.kind == TENSORRT
    bounds = ExportBounds.from_json(folder.bounds, built=built)
    check_request_within(source, bounds, resolved, *(ENGINE_WORDING if built else EXPORT_WORDING))


def check_request_within(
    source: ModelSource, bounds: ExportBounds, resolved: ResolvedRequest, built_for: str, rebuild: str
) -> None:
    """Refuse a request whose references, sized as the pipeline encodes them, exceed `bounds`' reference budget
    beside its target (the family's `check_request_within`, worded with `built_for` and `rebuild`)."""
    if _budgeted(source, resolved):
        source.family.part("specs").check_request_within(source, bounds, resolved, built_for, rebuild)


def _budgeted(source: ModelSource, resolved: ResolvedRequest) -> bool:
    """Whether the request sends reference images its pipeline sizes within an export's reference budget."""
    return source.reference_mode == REFERENCE_BUDGET and bool(resolved.references)


def sample_inputs(
    spec: ComponentSpec, sizes: dict[str, int], dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs for `spec` at axis `sizes`: int32 ids in the vocabulary, floats in each tensor's range."""
    generator = torch.Generator().manual_seed(seed)
    feeds = {}
    for tensor in spec.inputs:
        shape = spec.shape(tensor, sizes)
        low, high = tensor.value_range
        if tensor.dtype == "int32":
            feeds[tensor.name] = torch.randint(int(low), int(high) + 1, shape, generator=generator, dtype=torch.int32)
        else:
            values = torch.rand(shape, generator=generator) * (high - low) + low
            feeds[tensor.name] = values.to(dtype if tensor.dtype == COMPUTE else torch.float32)
    return feeds


def validation_sizes(spec: ComponentSpec, within_bounds: bool = False) -> list[tuple[dict[str, int], bool]]:
    """Three shapes per dynamic axis: the export sample, a small one (batch 1), a larger unseen one (batch 3, or
    the largest the spec's bounds allow). `within_bounds`: the export sample too is moved into the spec's bounds
    (engines serve only their profiles; a graph takes any size)."""

    def fit(axis: str, value: float) -> int:
        bounds = spec.axes[axis]
        value = max(bounds.min, min(bounds.max, int(value)))
        return max(bounds.multiple, value // bounds.multiple * bounds.multiple)

    small = {axis: 1 if axis == "B" else fit(axis, bounds.min) for axis, bounds in spec.axes.items()}
    large = {axis: min(3, spec.axes[axis].max) if axis == "B" else fit(axis, spec.export_sizes[axis] * 2.5 + 8)
             for axis in spec.axes}  # fmt: skip
    seen = {axis: fit(axis, size) if within_bounds else size for axis, size in spec.export_sizes.items()}
    return [(seen, True), (small, False), (large, False)]
