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
from fluxexport.families import FLUX2
from fluxexport.models.source import ModelSource
from fluxexport.runtime.kontext import PREFERRED_KONTEXT_RESOLUTIONS
from fluxexport.runtime.references import reference_size
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
    transformer_part_specs,
    vae_specs,
)
from fluxexport.specs.flux2 import check_references_served, flux2_specs

__all__ = [
    "REFERENCE_OPTIONS",
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

COMPONENTS = ("clip", "t5", "transformer", "vae_decoder", "vae_encoder")
# The transformer in three parts, for the step caches that skip blocks (`--cache first-block`, `magcache`): the head
# (embedders and the first double block), the tail (every other block) and the output layers; both families have
# them (FLUX.2's in `specs.flux2`), exported on demand (`--transformer-parts`)
TRANSFORMER_PARTS = ("transformer_head", "transformer_tail", "transformer_out")
KNOWN_COMPONENTS = COMPONENTS + TRANSFORMER_PARTS + ("text_encoder",)  # FLUX.2's one text encoder
# Token count of the largest preferred Kontext reference (1568×672 → 98·42 packed tokens).
KONTEXT_REFERENCE_TOKENS = max((w // 16) * (h // 16) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
KONTEXT_REFERENCE_SIDE = max(max(size) for size in PREFERRED_KONTEXT_RESOLUTIONS)
KONTEXT_REFERENCE_MIN_SIDE = min(min(size) for size in PREFERRED_KONTEXT_RESOLUTIONS)


def pipeline_components(source: ModelSource) -> tuple[str, ...]:
    """The components a text-to-image run needs: all but the VAE encoder, which Kontext's and FLUX.2's reference
    images need too."""
    return tuple(name for name in source.components if name != "vae_encoder" or source.is_kontext or source.is_flux2)


def kontext_tokens(low: int, opt: int, high: int) -> tuple[int, int, int]:
    """Transformer tokens for Kontext targets of low/opt/high px: the noise tokens plus the reference's,
    which is a preferred Kontext size (auto-resize) or at most as large as the target (--keep-reference-size)."""
    largest = max(KONTEXT_REFERENCE_TOKENS, image_tokens(high))
    return image_tokens(low), image_tokens(opt) + KONTEXT_REFERENCE_TOKENS, image_tokens(high) + largest


def kontext_encoder_sides(low: int, opt: int, high: int) -> tuple[int, int, int]:
    """Pixel sides the VAE encoder sees for Kontext: the targets' range widened to every preferred size."""
    return min(low, KONTEXT_REFERENCE_MIN_SIDE), opt, max(high, KONTEXT_REFERENCE_SIDE)


def component_specs(source: ModelSource, bounds: ExportBounds | None = None) -> dict[str, ComponentSpec]:
    """The component specs of a checkpoint's family, with widths read from its configs (FLUX.1: the five and the
    transformer's parts; FLUX.2: its four and the transformer's parts, `specs.flux2`)."""
    bounds = bounds or ExportBounds.for_model(source)
    if source.family is FLUX2:
        return flux2_specs(source, bounds)
    batch = Axis(*bounds.batch)
    clip_length = int(source.clip["max_position_embeddings"])
    clip_width = int(source.clip["hidden_size"])
    t5_width = int(source.t5["d_model"])
    packed = int(source.transformer["in_channels"])
    channels = source.latent_channels
    scale = source.vae_scale_factor
    min_side, opt_side, max_side = bounds.min_resolution, bounds.opt_resolution, bounds.max_resolution
    text = Axis(*bounds.text_length)

    sides = (min_side, opt_side, max_side)
    if source.is_kontext:
        tokens, encoder_sides = Axis(*kontext_tokens(*sides)), kontext_encoder_sides(*sides)
    else:
        tokens, encoder_sides = Axis(*(image_tokens(side) for side in sides)), sides

    transformer_inputs = [
        TensorSpec("hidden_states", COMPUTE, ("B", "N", packed), (-3.0, 3.0)),
        TensorSpec("encoder_hidden_states", COMPUTE, ("B", "L", t5_width)),
        TensorSpec("pooled_projections", COMPUTE, ("B", clip_width)),
        TensorSpec("timestep", COMPUTE, ("B",), (0.0, 1.0)),
        TensorSpec("img_ids", "float32", ("N", 3), (0.0, 64.0)),
        TensorSpec("txt_ids", "float32", ("L", 3), (0.0, 0.0)),
    ]
    if source.guidance_embeds:
        transformer_inputs.append(TensorSpec("guidance", "float32", ("B",), (1.0, 5.0)))

    width = int(source.transformer["num_attention_heads"]) * int(source.transformer["attention_head_dim"])
    transformer_axes = {"B": batch, "N": tokens, "L": text}
    transformer_sizes = {"B": 2, "N": 24, "L": 13}
    parts = transformer_part_specs(tuple(transformer_inputs), width, packed, transformer_axes, transformer_sizes)

    latent_axis = Axis(min_side // scale, opt_side // scale, max_side // scale)
    pixel_axis = Axis(*encoder_sides, multiple=scale)
    return (
        {
            "clip": ComponentSpec(
                "clip",
                inputs=(TensorSpec("input_ids", "int32", ("B", clip_length), (0, int(source.clip["vocab_size"]) - 1)),),
                outputs=(
                    TensorSpec("text_embeddings", COMPUTE, ("B", clip_length, clip_width)),
                    TensorSpec("pooled_embeddings", COMPUTE, ("B", clip_width)),
                ),
                axes={"B": batch},
                export_sizes={"B": 2},
            ),
            "t5": ComponentSpec(
                "t5",
                inputs=(TensorSpec("input_ids", "int32", ("B", "L"), (0, int(source.t5["vocab_size"]) - 1)),),
                outputs=(TensorSpec("text_embeddings", COMPUTE, ("B", "L", t5_width)),),
                axes={"B": batch, "L": text},
                export_sizes={"B": 2, "L": 11},
            ),
            "transformer": ComponentSpec(
                "transformer",
                inputs=tuple(transformer_inputs),
                outputs=(TensorSpec("latent", COMPUTE, ("B", "N", packed)),),
                axes={"B": batch, "N": tokens, "L": text},
                export_sizes={"B": 2, "N": 24, "L": 13},
            ),
        }
        | vae_specs(batch, channels, latent_axis, pixel_axis, scale, (6, 10))
        | parts
    )


ENGINE_WORDING = ("the engines were built for", "rebuild them with")
EXPORT_WORDING = ("the export was made for", "export again with")


def check_served(source: ModelSource, backend: str, engines: Path | None, resolved: ResolvedRequest) -> None:
    """Refuse, before any work, a FLUX.2 request whose references exceed the budget `engines` serves: an engine
    folder's build bounds (`tensorrt`) or an ONNX folder's manifest bounds (`onnxruntime`)."""
    if backend == "torch" or engines is None or not source.is_flux2 or not resolved.references:
        return
    if not (Path(engines) / MANIFEST).is_file():
        return  # the backend says what is missing
    check_folder_serves(source, open_folder(Path(engines)), resolved)


def check_folder_serves(source: ModelSource, folder: Folder, resolved: ResolvedRequest) -> None:
    """`check_served` for an opened folder (what the ONNX Runtime and TensorRT backends' `check_request` ask)."""
    if not source.is_flux2 or not resolved.references:
        return  # nothing to read the bounds for
    built = folder.kind == TENSORRT
    bounds = ExportBounds.from_json(folder.bounds, built=built)
    check_request_within(source, bounds, resolved, *(ENGINE_WORDING if built else EXPORT_WORDING))


def check_request_within(
    source: ModelSource, bounds: ExportBounds, resolved: ResolvedRequest, built_for: str, rebuild: str
) -> None:
    """Refuse a FLUX.2 request whose references, sized as the pipeline encodes them, exceed `bounds`' reference
    budget beside its target (`check_references_served`, worded with `built_for` and `rebuild`)."""
    if not source.is_flux2 or not resolved.references:
        return
    sizes = [reference_size(image, 2 * source.vae_scale_factor) for image in resolved.references]
    check_references_served(source, bounds, resolved.height, resolved.width, sizes, built_for, rebuild)


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
