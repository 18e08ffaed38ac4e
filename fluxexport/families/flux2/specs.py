"""FLUX.2's component specs: one text encoder, the 128-channel transformer with 4-axis ids (whole, and in the three
parts the step caches run), and VAE graphs that take and give the normalised, patchified latent (16 px per latent
pixel)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from fluxexport.dtypes import COMPUTE
from fluxexport.errors import FluxExportError
from fluxexport.families.flux2.runtime import MIN_REFERENCE_SIDE, reference_size
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

ROPE_AXES = 4  # (t, h, w, l)


def reference_tokens(bounds: ExportBounds, scale: int) -> int:
    """Tokens of the whole reference budget: a reference of at most `max_reference_area` px gives at most
    area / `scale`² tokens however it is shaped (its sides are floored to `scale` px)."""
    return bounds.max_references * (bounds.max_reference_area // scale**2)


def reference_side(bounds: ExportBounds, scale: int) -> int:
    """The longest side a reference within the budget is encoded at: √(area · aspect), floored to `scale` px
    (diffusers' 1 MP scaling truncates each side, and the crop floors it)."""
    return math.isqrt(int(bounds.max_reference_area * bounds.max_reference_aspect)) // scale * scale


def component_specs(source: ModelSource, bounds: ExportBounds) -> dict[str, ComponentSpec]:
    """The four FLUX.2 component specs and the transformer's parts, with widths read from the checkpoint's
    configs."""
    batch = Axis(*bounds.batch)
    text = Axis(*bounds.text_length)
    language = source.language
    layers = len(source.text_encoder_layers)
    embedding_width = layers * int(language["hidden_size"])
    channels = int(source.transformer["in_channels"])
    scale = 2 * source.vae_scale_factor  # pixels per latent token side
    low, opt, high = bounds.resolution
    tokens = Axis(image_tokens(low), image_tokens(opt), image_tokens(high) + reference_tokens(bounds, scale))
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
    # the VAE encoder sees the references (any side from diffusers' smallest to the budget's longest)
    pixel_axis = Axis(min(low, MIN_REFERENCE_SIDE), opt, max(high, reference_side(bounds, scale)), multiple=scale)
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
    """The transformer in three parts (`--cache first-block`/`magcache`; `families/flux2/adapters.py` says what each holds):
    FLUX.1's parts, with the double blocks' modulation vectors carried from the head (which computes them for its
    block) to the tail's double blocks."""
    config = source.transformer
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    # shift, scale and gate of attention and MLP: 6 vectors of `width` per stream, as Flux2Modulation returns them
    modulations = tuple(
        TensorSpec(f"{stream}_modulation", COMPUTE, ("B", 6 * width), (-1.0, 1.0)) for stream in ("image", "text")
    )
    channels = int(config["in_channels"])
    return transformer_part_specs(transformer_inputs, width, channels, axes, sizes, carried=modulations)


def budget_text(bounds: ExportBounds) -> str:
    """`1 reference of up to 1048576 px at up to 2:1 beside targets up to 1360 px`."""
    count = bounds.max_references
    return (
        f"{count} reference{'s' if count != 1 else ''} of up to {bounds.max_reference_area} px at up to "
        f"{bounds.max_reference_aspect:g}:1 beside targets up to {bounds.max_resolution} px"
    )


def aspect_for(side: int, area: int) -> float:
    """The smallest `--max-reference-aspect` (in hundredths) whose budget of `area` px encodes a `side` px side."""
    aspect = math.ceil(side * side * 100 / area) / 100
    while math.isqrt(int(area * aspect)) < side:  # float rounding of the product
        aspect = round(aspect + 0.01, 2)
    return aspect


def check_references_served(
    source: ModelSource, bounds: ExportBounds, height: int, width: int, references: Sequence[tuple[int, int]],
    built_for: str = "the engines were built for", rebuild: str = "rebuild them with",
) -> None:  # fmt: skip
    """Refuse, in one line naming the option that serves it, a FLUX.2 request whose references (each (width,
    height) as it is encoded) beside a `width`×`height` target exceed what `bounds` were built for: the
    transformer's tokens (the target's and every reference's) and the VAE encoder's longest side. `built_for` and
    `rebuild` word the refusal for engines or an export."""
    if not references:
        return
    scale = 2 * source.vae_scale_factor
    specs = component_specs(source, bounds)
    tokens, sides = specs["transformer"].axes["N"], specs["vae_encoder"].axes["H"]
    needed = (height // scale) * (width // scale) + sum((w // scale) * (h // scale) for w, h in references)
    count = len(references)
    if needed > tokens.max:
        largest = max(w * h for w, h in references)
        fixes = [f"--max-references {count}" if count > bounds.max_references else "",
                 f"--max-reference-area {largest}" if largest > bounds.max_reference_area else "",
                 f"--max-resolution {max(height, width)}" if max(height, width) > bounds.max_resolution else ""]  # fmt: skip
        raise FluxExportError(
            f"{count} reference image{'s' if count != 1 else ''} beside a {width}×{height} target need {needed} "
            f"transformer tokens, past the {tokens.max} {built_for} ({budget_text(bounds)}): {rebuild} "
            + " ".join(fix for fix in fixes if fix)
        )
    for index, (w, h) in enumerate(references):
        side = max(w, h)
        if side > sides.max:
            area = max(bounds.max_reference_area, w * h)
            fix = f"--max-reference-area {area} " if area > bounds.max_reference_area else ""
            raise FluxExportError(
                f"reference image {index + 1} is encoded at {w}×{h}: its {side} px side is past the {sides.max} px "
                f"{built_for} ({budget_text(bounds)}): {rebuild} {fix}--max-reference-aspect {aspect_for(side, area):g}"
            )


def check_request_within(
    source: ModelSource, bounds: ExportBounds, resolved: ResolvedRequest, built_for: str, rebuild: str
) -> None:
    """Refuse a request whose references, sized as the pipeline encodes them, exceed `bounds`' reference budget
    beside its target (`check_references_served`, worded with `built_for` and `rebuild`)."""
    sizes = [reference_size(image, 2 * source.vae_scale_factor) for image in resolved.references]
    check_references_served(source, bounds, resolved.height, resolved.width, sizes, built_for, rebuild)
