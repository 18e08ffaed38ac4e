"""FLUX.2's component specs: one text encoder, the 128-channel transformer with 4-axis ids, and VAE graphs that
take and give the normalised, patchified latent (16 px per latent pixel)."""

from __future__ import annotations

from fluxexport.dtypes import COMPUTE
from fluxexport.models.source import ModelSource
from fluxexport.specs.core import Axis, ComponentSpec, ExportBounds, TensorSpec, image_tokens, vae_specs

ROPE_AXES = 4  # (t, h, w, l)
# Engines serve one reference image of up to ~1 megapixel (the pipeline's cap) beside the target: 64² tokens.
REFERENCE_TOKENS = image_tokens(1024)
REFERENCE_MIN_SIDE = 64  # diffusers refuses smaller references


def flux2_specs(source: ModelSource, bounds: ExportBounds) -> dict[str, ComponentSpec]:
    """The four FLUX.2 component specs, with widths read from the checkpoint's configs."""
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
    latent_axis = Axis(low // scale, opt // scale, high // scale)
    pixel_axis = Axis(min(low, REFERENCE_MIN_SIDE), opt, max(high, 1024), multiple=scale)
    vocabulary = int(language["vocab_size"])
    return {
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
            axes={"B": batch, "N": tokens, "L": text},
            export_sizes={"B": 2, "N": 24, "L": 13},
        ),
    } | vae_specs(batch, channels, latent_axis, pixel_axis, scale, (3, 5))
