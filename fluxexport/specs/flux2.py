"""FLUX.2's component specs: one text encoder, the 128-channel transformer with 4-axis ids (whole, and in the three
parts the step caches run), and VAE graphs that take and give the normalised, patchified latent (16 px per latent
pixel)."""

from __future__ import annotations

from fluxexport.dtypes import COMPUTE
from fluxexport.models.source import ModelSource
from fluxexport.specs.core import (
    Axis,
    ComponentSpec,
    ExportBounds,
    TensorSpec,
    image_tokens,
    transformer_part_specs,
    vae_specs,
)

ROPE_AXES = 4  # (t, h, w, l)
# Engines serve one reference image of up to ~1 megapixel (the pipeline's cap) beside the target: 64² tokens.
REFERENCE_TOKENS = image_tokens(1024)
REFERENCE_MIN_SIDE = 64  # diffusers refuses smaller references


def flux2_specs(source: ModelSource, bounds: ExportBounds) -> dict[str, ComponentSpec]:
    """The four FLUX.2 component specs and the transformer's parts, with widths read from the checkpoint's
    configs."""
    batch = Axis(*bounds.batch)
    text = Axis(*bounds.text_length)
    language = source.text_encoder.get("text_config", source.text_encoder)
    layers = len(source.text_encoder_layers)
    embedding_width = layers * int(language["hidden_size"])
    channels = int(source.transformer.get("in_channels", 128))
    scale = 2 * source.vae_scale_factor  # pixels per latent token side
    low, opt, high = bounds.resolution
    tokens = Axis(image_tokens(low), image_tokens(opt), image_tokens(high) + REFERENCE_TOKENS)
    transformer_inputs = [
        TensorSpec("hidden_states", COMPUTE, ("B", "N", channels), (-3.0, 3.0)),
        TensorSpec("encoder_hidden_states", COMPUTE, ("B", "L", embedding_width)),
        TensorSpec("timestep", COMPUTE, ("B",), (0.0, 1.0)),
        TensorSpec("img_ids", "float32", ("N", ROPE_AXES), (0.0, 64.0)),
        TensorSpec("txt_ids", "float32", ("L", ROPE_AXES), (0.0, 64.0)),
    ]
    if source.guidance_embeds:
        transformer_inputs.append(TensorSpec("guidance", "float32", ("B",), (1.0, 5.0)))
    transformer_axes = {"B": batch, "N": tokens, "L": text}
    transformer_sizes = {"B": 2, "N": 24, "L": 13}
    latent_axis = Axis(low // scale, opt // scale, high // scale)
    pixel_axis = Axis(min(low, REFERENCE_MIN_SIDE), opt, max(high, 1024), multiple=scale)
    vocabulary = int(language["vocab_size"])
    parts = flux2_part_specs(source, tuple(transformer_inputs), transformer_axes, transformer_sizes)
    return (
        {
            "text_encoder": ComponentSpec(
                "text_encoder",
                inputs=(
                    TensorSpec("input_ids", "int32", ("B", "L"), (0, vocabulary - 1)),
                    TensorSpec("attention_mask", "int32", ("B", "L"), (1, 1)),  # padding is tested with real prompts
                ),
                outputs=(TensorSpec("text_embeddings", COMPUTE, ("B", "L", embedding_width)),),
                axes={"B": batch, "L": text},
                export_sizes={"B": 2, "L": 11},
            ),
            "transformer": ComponentSpec(
                "transformer",
                inputs=tuple(transformer_inputs),
                outputs=(TensorSpec("latent", COMPUTE, ("B", "N", channels)),),
                axes=transformer_axes,
                export_sizes=transformer_sizes,
            ),
        }
        | vae_specs(batch, channels, latent_axis, pixel_axis, scale, (3, 5))
        | parts
    )


def flux2_part_specs(
    source: ModelSource, transformer_inputs: tuple[TensorSpec, ...], axes: dict[str, Axis], sizes: dict[str, int]
) -> dict[str, ComponentSpec]:
    """The transformer in three parts (`--cache first-block`/`magcache`; `adapters.flux2` says what each holds):
    FLUX.1's parts, with the double blocks' modulation vectors carried from the head (which computes them for its
    block) to the tail's double blocks."""
    config = source.transformer
    width = int(config.get("num_attention_heads", 48)) * int(config.get("attention_head_dim", 128))
    # shift, scale and gate of attention and MLP: 6 vectors of `width` per stream, as Flux2Modulation returns them
    modulations = tuple(
        TensorSpec(f"{stream}_modulation", COMPUTE, ("B", 6 * width), (-1.0, 1.0)) for stream in ("image", "text")
    )
    channels = int(config.get("in_channels", 128))
    return transformer_part_specs(transformer_inputs, width, channels, axes, sizes, carried=modulations)
