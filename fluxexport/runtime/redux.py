"""FLUX.1 Redux's prior, number for number as diffusers' `FluxPriorReduxPipeline`: each image through the folder's
SigLIP image processor (resized to its one size), the SigLIP encoder's last hidden state, the Redux embedder's
projection to the base's text width; those tokens after the prompt's T5 sequence (read at 512 tokens, or zeros of
that length without a prompt), the CLIP pooled embedding (or zeros) beside it, each image's pair scaled by its
`prompt_embeds_scale` / `pooled_prompt_embeds_scale`, then summed over the images into one conditioning (batch 1).
The base pipeline then takes it as `prompt_embeds` / `pooled_prompt_embeds` (`GenerationRequest`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from fluxexport.errors import RequestError
from fluxexport.models.redux import REDUX_TEXT_LENGTH, ReduxSource
from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Backend
from fluxexport.runtime.request import GenerationRequest, stage_end, tokenize


@dataclass(frozen=True)
class ReduxRequest:
    """What the prior takes: the images (several are summed into one conditioning), an optional prompt (diffusers'
    experimental prompt: one per image, CLIP and T5 of the base model) and the per-image scales (one value for
    every image, or one per image)."""

    images: tuple[Image.Image, ...]
    prompt: str | None = None
    prompt_2: str | None = None
    prompt_embeds_scale: tuple[float, ...] = (1.0,)
    pooled_prompt_embeds_scale: tuple[float, ...] = (1.0,)
    keep_image_size: bool = False  # run's --keep-reference-size: refused (the processor has one size)


@dataclass(frozen=True)
class ReduxConditioning:
    """The prior's output, diffusers' `FluxPriorReduxPipelineOutput`: [1, 512+M·…, D] and [1, P]; and the seconds
    of its stages (`redux_image_encode`: processor, SigLIP encoder and Redux embedder; `redux_text_encode`: the
    prompt's encoders, with a prompt only), each synced once as the pipeline's stages are."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def per_image(name: str, values: Sequence[float], count: int) -> list[float]:
    """One scale per image: a single value repeated, or exactly one per image (diffusers' check)."""
    values = [float(value) for value in values]
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise RequestError(
            name, f"{{option}} gives {len(values)} weights for {count} image{'s' if count > 1 else ''}",
            "give one, or one per image",
            pointer=False,
        )  # fmt: skip
    return values


def check_redux_request(redux: ReduxSource, request: ReduxRequest) -> tuple[list[float], list[float]]:
    """Refuse a request the prior cannot take (no image, a scale count that fits no image count) in one line;
    the per-image scales."""
    if not request.images:
        raise RequestError(
            "image", f"{redux.name} is a FLUX.1 Redux prior: it makes variations of an image, got none",
            "pass one or more with {option}", pointer=False,
        )  # fmt: skip
    count = len(request.images)
    if request.keep_image_size:
        raise RequestError(
            "auto_resize_reference", f"{{option}} is for FLUX.1 Kontext references, but {redux.name} resizes its "
            f"images to {redux.image_size}×{redux.image_size} (its SigLIP processor's one size)", "{drop}",
            pointer=False,
        )  # fmt: skip
    if request.prompt is not None and not request.prompt.strip():
        raise RequestError("prompt", "prompt is empty", "drop it (Redux runs without one) or pass text", pointer=False)
    if request.prompt_2 is not None and request.prompt is None:
        raise RequestError(
            "prompt_2", "{option} is T5's text beside a prompt, and there is none", "give a prompt too or {drop}",
            pointer=False,
        )  # fmt: skip
    return (
        per_image("prompt_embeds_scale", request.prompt_embeds_scale, count),
        per_image("pooled_prompt_embeds_scale", request.pooled_prompt_embeds_scale, count),
    )


def placeholder_conditioning(redux: ReduxSource, base: ModelSource) -> ReduxConditioning:
    """Empty tensors of the prior's output shapes (for checking the base request before any weight loads)."""
    tokens = REDUX_TEXT_LENGTH + redux.image_tokens
    pooled = int(base.transformer["pooled_projection_dim"])
    return ReduxConditioning(torch.zeros(1, tokens, redux.text_width), torch.zeros(1, pooled))


def image_pixels(redux: ReduxSource, images: Sequence[Image.Image]) -> torch.Tensor:
    """[B,3,S,S] float32: the folder's SigLIP processor as diffusers calls it (resize, RGB, rescale, normalize)."""
    processed = redux.feature_extractor.preprocess(
        images=list(images), do_resize=True, return_tensors="pt", do_convert_rgb=True
    )  # fmt: skip
    return processed["pixel_values"].to(torch.float32)


def image_embeds(prior: Backend, redux: ReduxSource, images: Sequence[Image.Image]) -> torch.Tensor:
    """[B,M,D]: SigLIP's last hidden state of each image, projected by the Redux embedder."""
    pixels = image_pixels(redux, images).to(prior.device)
    hidden = prior.component("image_encoder")({"pixel_values": pixels})["image_hidden_states"]
    return prior.component("image_embedder")({"image_hidden_states": hidden})["image_embeds"]


def text_conditioning(
    base: Backend, source: ModelSource, request: ReduxRequest, count: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """T5's sequence [B,512,D] and CLIP's pooled [B,P] of the prompt, once per image (its zeros without one)."""
    if request.prompt is None:
        pooled = int(source.transformer["pooled_projection_dim"])
        zeros = torch.zeros(count, REDUX_TEXT_LENGTH, width, device=base.device)
        return zeros, torch.zeros(count, pooled, device=base.device), []
    clip_tokenizer, t5_tokenizer = source.tokenizers
    prompts = [request.prompt] * count
    prompts_2 = [request.prompt_2 or request.prompt] * count
    clip_ids, clip_warnings = tokenize(clip_tokenizer, prompts, clip_tokenizer.model_max_length, "CLIP")
    t5_ids, t5_warnings = tokenize(t5_tokenizer, prompts_2, REDUX_TEXT_LENGTH, "T5")
    pooled = base.component("clip")({"input_ids": clip_ids.to(base.device)})["pooled_embeddings"]
    text = base.component("t5")({"input_ids": t5_ids.to(base.device)})["text_embeddings"]
    return text, pooled, clip_warnings + t5_warnings


def redux_conditioning(
    prior: Backend, base: Backend, source: ModelSource, redux: ReduxSource, request: ReduxRequest
) -> ReduxConditioning:
    """FluxPriorReduxPipeline's `prompt_embeds` and `pooled_prompt_embeds` for `request`'s images (the prompt's
    encoders run on the base model's backend, as diffusers' prior borrows the base pipeline's encoders)."""
    scales, pooled_scales = check_redux_request(redux, request)
    count = len(request.images)
    start = time.perf_counter()
    embeds = image_embeds(prior, redux, request.images)
    timings = {"redux_image_encode": stage_end(prior.device) - start}
    embeds = embeds.to(base.device)
    tick = time.perf_counter()
    text, pooled, warnings = text_conditioning(base, source, request, count, embeds.shape[-1])
    if request.prompt is not None:
        timings["redux_text_encode"] = stage_end(base.device) - tick
    joined = torch.cat([text.to(embeds.dtype), embeds], dim=1)
    joined = joined * torch.tensor(scales, dtype=embeds.dtype, device=embeds.device)[:, None, None]
    pooled = pooled.to(embeds.dtype) * torch.tensor(pooled_scales, dtype=embeds.dtype, device=embeds.device)[:, None]
    return ReduxConditioning(joined.sum(dim=0, keepdim=True), pooled.sum(dim=0, keepdim=True), warnings, timings)


def sample_redux_image(height: int, width: int) -> Image.Image:
    """The picture a tool's own Redux request varies (`bench --redux`): colour gradients under a ring, `height` ×
    `width` (at least 16 px a side), resized by the prior's processor as a user's picture is."""
    height, width = max(int(height), 16), max(int(width), 16)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    ring = np.abs(np.hypot(x - width / 2, y - height / 2) / min(height, width) - 0.3) < 0.05
    picture = np.stack([y / height, np.where(ring, 1.0, 0.2), x / width], axis=-1)
    return Image.fromarray((picture * 255).astype(np.uint8))


def with_conditioning(request: GenerationRequest, conditioning: ReduxConditioning) -> GenerationRequest:
    """`request` for the base model behind a Redux prior: the prior's embeddings instead of a prompt and images
    (diffusers' `FluxPipeline(**prior_output)`)."""
    return replace(
        request, prompt=None, prompt_2=None, image=None, prompt_embeds=conditioning.prompt_embeds,
        pooled_prompt_embeds=conditioning.pooled_prompt_embeds,
    )  # fmt: skip
