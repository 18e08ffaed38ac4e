"""FLUX.1's component specs: CLIP, T5, the 64-channel transformer with 3-axis ids (whole, and in the three parts the
step caches run), and the 16-channel VAE at 1/8 of the pixels; Kontext's transformer and VAE encoder also serve its
reference image, which its pipeline resizes to one of the preferred Kontext sizes."""

from __future__ import annotations

import dataclasses

from fluxexport.dtypes import COMPUTE
from fluxexport.families.family import KONTEXT_REFERENCE
from fluxexport.families.flux1.models import output_channels
from fluxexport.families.flux1.runtime import PREFERRED_KONTEXT_RESOLUTIONS
from fluxexport.models.source import ModelSource
from fluxexport.runtime.request import ResolvedRequest
from fluxexport.specs.core import (
    Axis,
    ComponentSpec,
    ExportBounds,
    TensorSpec,
    image_tokens,
    transformer_part_specs,
    vae_specs,
)

# Token count of the largest preferred Kontext reference (1568×672 → 98·42 packed tokens).
KONTEXT_REFERENCE_TOKENS = max((w // 16) * (h // 16) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
KONTEXT_REFERENCE_SIDE = max(max(size) for size in PREFERRED_KONTEXT_RESOLUTIONS)
KONTEXT_REFERENCE_MIN_SIDE = min(min(size) for size in PREFERRED_KONTEXT_RESOLUTIONS)


def kontext_tokens(low: int, opt: int, high: int) -> tuple[int, int, int]:
    """Transformer tokens for Kontext targets of low/opt/high px: the noise tokens plus the reference's,
    which is a preferred Kontext size (auto-resize) or at most as large as the target (--keep-reference-size)."""
    largest = max(KONTEXT_REFERENCE_TOKENS, image_tokens(high))
    return image_tokens(low), image_tokens(opt) + KONTEXT_REFERENCE_TOKENS, image_tokens(high) + largest


def kontext_encoder_sides(low: int, opt: int, high: int) -> tuple[int, int, int]:
    """Pixel sides the VAE encoder sees for Kontext: the targets' range widened to every preferred size."""
    return min(low, KONTEXT_REFERENCE_MIN_SIDE), opt, max(high, KONTEXT_REFERENCE_SIDE)


def component_specs(source: ModelSource, bounds: ExportBounds) -> dict[str, ComponentSpec]:
    """The five FLUX.1 component specs and the transformer's parts, with widths read from the checkpoint's
    configs."""
    batch = Axis(*bounds.batch)
    clip_length = int(source.clip["max_position_embeddings"])
    clip_width = int(source.clip["hidden_size"])
    t5_width = int(source.t5["d_model"])
    packed = int(source.transformer["in_channels"])  # Fill, Control: the condition's channels beside the latents'
    out_channels = output_channels(source)
    channels = int(source.vae["latent_channels"])
    scale = source.vae_scale_factor
    min_side, opt_side, max_side = bounds.min_resolution, bounds.opt_resolution, bounds.max_resolution
    text = Axis(*bounds.text_length)

    sides = (min_side, opt_side, max_side)
    if source.reference_mode == KONTEXT_REFERENCE:
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
    parts = transformer_part_specs(tuple(transformer_inputs), width, out_channels, transformer_axes, transformer_sizes)

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
                outputs=(TensorSpec("latent", COMPUTE, ("B", "N", out_channels)),),
                axes={"B": batch, "N": tokens, "L": text},
                export_sizes={"B": 2, "N": 24, "L": 13},
            ),
        }
        | posterior_encoder(vae_specs(batch, channels, latent_axis, pixel_axis, scale, (6, 10)), channels)
        | parts
    )


def posterior_encoder(specs: dict[str, ComponentSpec], channels: int) -> dict[str, ComponentSpec]:
    """The VAE encoder giving its posterior: `latent` (the mean, what Kontext encodes its reference with) and
    `latent_std` (what Fill and Canny/Depth sample their conditions with: mean + std · noise, as diffusers'
    `latent_dist.sample(generator)`)."""
    encoder = specs["vae_encoder"]
    std = TensorSpec("latent_std", COMPUTE, ("B", channels, "h", "w"))
    return specs | {"vae_encoder": dataclasses.replace(encoder, outputs=(*encoder.outputs, std))}


def check_request_within(
    source: ModelSource, bounds: ExportBounds, resolved: ResolvedRequest, built_for: str, rebuild: str
) -> None:
    """Nothing to refuse: FLUX.1 has no reference budget (Kontext's pipeline resizes its one reference to a
    preferred Kontext size, which every Kontext export's bounds serve: `kontext_tokens`)."""
