"""FLUX.1's flux_pipeline model in a Triton repository: the inputs its config declares, and how the repository's
README describes them."""

from __future__ import annotations

from fluxexport.families.family import CONTROL_CONDITION, FILL_CONDITION
from fluxexport.models.source import ModelSource
from fluxexport.triton.config import TensorConfig, lora_and_cache_inputs, reference_inputs, settings_inputs
from fluxexport.triton.repository import lora_inputs_text, lora_swap_text

# Fill's mask and Canny/Depth's control image, each uint8 [H,W,3] as the reference `image` is sent
CONDITION_INPUTS = {FILL_CONDITION: "mask", CONTROL_CONDITION: "control_image"}


def pipeline_inputs(source: ModelSource | None = None) -> tuple[TensorConfig, ...]:
    """`prompt` and `prompt_2` (CLIP's and T5's), the settings, LoRAs and step cache, on Kontext the one reference
    `image`, on Fill its `image` and `mask`, on Canny/Depth the `control_image` (without a `source`, every input
    any FLUX.1 model takes)."""
    mode = None if source is None else source.reference_mode
    takes_image = source is None or source.is_kontext or mode == FILL_CONDITION
    conditions = [name for kind, name in CONDITION_INPUTS.items() if source is None or kind == mode]
    return (
        TensorConfig("prompt", "TYPE_STRING", (1,)),
        TensorConfig("prompt_2", "TYPE_STRING", (1,), optional=True),
        *settings_inputs(),
        *lora_and_cache_inputs(),
        *reference_inputs(1 if takes_image else 0),
        *(TensorConfig(name, "TYPE_UINT8", (-1, -1, 3), optional=True) for name in conditions),
    )


def inputs_text(source: ModelSource, loras: list[str]) -> str:
    """What the repository's README says flux_pipeline takes and returns."""
    images = {
        FILL_CONDITION: " and `image`, `mask` (uint8 [H,W,3]: the image to repaint, white where it is repainted)",
        CONTROL_CONDITION: " and `control_image` (uint8 [H,W,3], the edge or depth map to follow)",
    }
    kontext = " and `image` (uint8 [H,W,3], the Kontext reference)" if source.is_kontext else ""
    kontext = images.get(source.reference_mode, kontext)
    return f"""takes `prompt` (BYTES [1]) and optional `prompt_2`, `height`, `width`,
`num_inference_steps`, `guidance_scale`, `seed`, `num_images`{kontext}, {lora_inputs_text(loras)}
and `cache` (BYTES [1], a step cache as `fluxexport run --cache` takes it: `taylorseer:interval=3,warmup=2`), and
returns `images` (UINT8 [B,H,W,3]), calling the components through BLS with fluxexport's runtime.
{lora_swap_text("transformer and CLIP components")}
`magcache` reads `ratios=flux-dev` or a .json file inside this folder, named relative to it
(`magcache:ratios=flux_pipeline/1/magcache/mine.json`); any other path is refused."""
