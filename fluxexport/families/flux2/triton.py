"""FLUX.2's flux_pipeline model in a Triton repository: the inputs its config declares, and how the repository's
README describes them."""

from __future__ import annotations

from fluxexport.models.source import ModelSource
from fluxexport.triton.config import (
    MAX_REFERENCE_IMAGES,
    TensorConfig,
    lora_and_cache_inputs,
    reference_inputs,
    settings_inputs,
)
from fluxexport.triton.repository import lora_inputs_text, lora_swap_text


def pipeline_inputs(source: ModelSource | None = None) -> tuple[TensorConfig, ...]:
    """One text encoder (no prompt_2) and a negative prompt (base models: true CFG); FLUX.1's settings,
    per-request LoRA and step-cache inputs; the references last, `image`, `image_2`, … as Kontext's `image`."""
    return (
        TensorConfig("prompt", "TYPE_STRING", (1,)),
        TensorConfig("negative_prompt", "TYPE_STRING", (1,), optional=True),  # base models (true CFG) only
        *settings_inputs(),
        *lora_and_cache_inputs(),
        *reference_inputs(MAX_REFERENCE_IMAGES),
    )


def inputs_text(source: ModelSource, loras: list[str]) -> str:
    """What the repository's README says flux_pipeline takes and returns."""
    negative = (
        '`negative_prompt` (BYTES [1], the true-CFG branch; "" by default)'
        if source.uses_true_cfg
        else "`negative_prompt` (refused: this distilled model runs without true CFG)"
    )
    return f"""takes `prompt` (BYTES [1]) and optional {negative}, `height`,
`width`, `num_inference_steps`, `guidance_scale`, `seed`, `num_images`, {lora_inputs_text(loras)},
`cache` (BYTES [1], a step cache as `fluxexport run --cache` takes it; it runs on the transformer's parts, which
this repository serves when it was written from an export with `--transformer-parts`) and reference images
`image`, `image_2`, … `image_{MAX_REFERENCE_IMAGES}` (each uint8 [H,W,3], in order; without a size the output takes
the last one's), and returns `images` (UINT8 [B,H,W,3]), calling the components through BLS with fluxexport's
FLUX.2 runtime. {lora_swap_text("transformer component (FLUX.2 LoRAs adapt only it)")}
`magcache` reads a .json file inside this folder (`magcache:ratios=flux_pipeline/1/magcache/mine.json`, made by
`fluxexport calibrate-magcache` for this model); any other path is refused."""
