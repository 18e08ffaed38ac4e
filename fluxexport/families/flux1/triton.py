"""FLUX.1's flux_pipeline model in a Triton repository: the inputs its config declares, and how the repository's
README describes them."""

from __future__ import annotations

from fluxexport.models.source import ModelSource
from fluxexport.triton.config import TensorConfig, lora_and_cache_inputs, reference_inputs, settings_inputs
from fluxexport.triton.repository import lora_inputs_text, lora_swap_text


def pipeline_inputs(source: ModelSource | None = None) -> tuple[TensorConfig, ...]:
    """`prompt` and `prompt_2` (CLIP's and T5's), the settings, LoRAs and step cache, and on Kontext (or, without a
    `source`, for any FLUX.1 model) the one reference `image`."""
    kontext = source is None or source.is_kontext
    return (
        TensorConfig("prompt", "TYPE_STRING", (1,)),
        TensorConfig("prompt_2", "TYPE_STRING", (1,), optional=True),
        *settings_inputs(),
        *lora_and_cache_inputs(),
        *reference_inputs(1 if kontext else 0),
    )


def inputs_text(source: ModelSource, loras: list[str]) -> str:
    """What the repository's README says flux_pipeline takes and returns."""
    kontext = " and `image` (uint8 [H,W,3], the Kontext reference)" if source.is_kontext else ""
    return f"""takes `prompt` (BYTES [1]) and optional `prompt_2`, `height`, `width`,
`num_inference_steps`, `guidance_scale`, `seed`, `num_images`{kontext}, {lora_inputs_text(loras)}
and `cache` (BYTES [1], a step cache as `fluxexport run --cache` takes it: `taylorseer:interval=3,warmup=2`), and
returns `images` (UINT8 [B,H,W,3]), calling the components through BLS with fluxexport's runtime.
{lora_swap_text("transformer and CLIP components")}
`magcache` reads `ratios=flux-dev` or a .json file inside this folder, named relative to it
(`magcache:ratios=flux_pipeline/1/magcache/mine.json`); any other path is refused."""
