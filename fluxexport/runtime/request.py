"""A generation request: what a user asks for, checked and completed with the model's defaults; its result."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.runtime.latents import check_image_size
from fluxexport.runtime.references import reference_size
from fluxexport.runtime.schedule import check_steps

MIN_REFERENCE_SIDE = 64  # FLUX.2 reference images: diffusers' limits
MAX_REFERENCE_ASPECT = 8

T5_MAX_SEQUENCE_LENGTH = 512
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerationRequest:
    """What a user asks for, in diffusers' vocabulary; None means the model's default."""

    prompt: str | Sequence[str]
    prompt_2: str | Sequence[str] | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    num_images_per_prompt: int = 1
    max_sequence_length: int | None = None
    image: Image.Image | Sequence[Image.Image] | None = None  # FLUX.1 Kontext: one; FLUX.2: one or more
    auto_resize_reference: bool = True
    negative_prompt: str | Sequence[str] | None = None  # FLUX.2 base models (true CFG); diffusers uses ""


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with every default filled in and every value checked."""

    prompts: list[str]
    prompts_2: list[str]
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    num_images_per_prompt: int
    max_sequence_length: int
    image: Image.Image | None
    auto_resize_reference: bool
    references: tuple[Image.Image, ...] = ()  # FLUX.2 reference images, in order
    negative_prompts: list[str] | None = None  # FLUX.2 base models: one per prompt

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt


@dataclass
class GenerationResult:
    images: np.ndarray  # uint8 [B,H,W,3]
    request: ResolvedRequest
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    warnings: list[str] = field(default_factory=list)
    computed_steps: int | None = None  # full transformer evaluations (fewer than the steps with a step cache)
    cache: str = "none"

    @property
    def cache_summary(self) -> str:
        """`transformer: computed 9 of 12 steps (taylorseer:interval=5,order=1,warmup=3)`."""
        computed = self.request.steps if self.computed_steps is None else self.computed_steps
        return f"transformer: computed {computed} of {self.request.steps} steps ({self.cache})"


def _as_list(prompt: str | Sequence[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


def resolve_request(source: ModelSource, request: GenerationRequest) -> ResolvedRequest:
    """Fill in model-aware defaults and refuse bad input with a one-line error naming the fix."""
    prompts = _as_list(request.prompt)
    if not prompts or any(not p.strip() for p in prompts):
        raise FluxExportError("prompt is empty: pass the text to draw with --prompt")
    prompts_2 = _as_list(request.prompt_2) if request.prompt_2 is not None else prompts
    if len(prompts_2) != len(prompts):
        raise FluxExportError(f"got {len(prompts)} prompts but {len(prompts_2)} prompt_2 values: give one per prompt")
    if request.prompt_2 is not None and source.is_flux2:
        raise FluxExportError(f"{source.name} is FLUX.2, which has one text encoder: drop --prompt-2")
    references = _references(source, request.image)
    kontext_image = None if source.is_flux2 or not references else references[0]
    references = references if source.is_flux2 else ()
    height, width = request.height, request.width
    if references:  # diffusers: the first reference's size (capped to ~1 MP), floored to the packing multiple
        first_width, first_height = reference_size(references[0], 2 * source.vae_scale_factor)
        height, width = height or first_height, width or first_width
    height, width = height or source.default_size, width or source.default_size
    check_image_size(height, width, 2 * source.vae_scale_factor)
    steps = check_steps(source.default_steps if request.num_inference_steps is None else request.num_inference_steps)
    if request.num_images_per_prompt < 1:
        raise FluxExportError(f"num-images must be at least 1, got {request.num_images_per_prompt} (--num-images)")
    length = request.max_sequence_length or source.default_max_sequence_length
    if not 1 <= length <= T5_MAX_SEQUENCE_LENGTH:
        raise FluxExportError(
            f"max-sequence-length must be in 1..{T5_MAX_SEQUENCE_LENGTH}, got {length} (--max-sequence-length)"
        )
    guidance = source.default_guidance if request.guidance_scale is None else request.guidance_scale
    negatives = _negative_prompts(source, request.negative_prompt, len(prompts))
    return ResolvedRequest(
        prompts, prompts_2, height, width, steps, float(guidance), request.seed, request.num_images_per_prompt,
        length, kontext_image, request.auto_resize_reference, references, negatives,
    )  # fmt: skip


def _references(source: ModelSource, image) -> tuple[Image.Image, ...]:
    """FLUX.2's reference images (checked as diffusers checks them); FLUX.1 takes one, on Kontext only."""
    if image is None:
        return ()
    images = (image,) if isinstance(image, Image.Image) else tuple(image)
    if not source.is_flux2:
        if not source.is_kontext:
            raise FluxExportError(
                f"--image is a Kontext reference but {source.name} is a {source.pipeline_class}: "
                "use a FLUX.1 Kontext model or drop --image"
            )
        if len(images) != 1:
            raise FluxExportError(f"FLUX.1 Kontext takes one reference image, got {len(images)}: pass one --image")
        return images
    for index, reference in enumerate(images):
        width, height = reference.size
        if min(width, height) < MIN_REFERENCE_SIDE:
            raise FluxExportError(
                f"reference image {index + 1} is {width}×{height}: both sides must be at least "
                f"{MIN_REFERENCE_SIDE} px (--image)"
            )
        if max(width / height, height / width) > MAX_REFERENCE_ASPECT:
            raise FluxExportError(
                f"reference image {index + 1} is {width}×{height}: its aspect ratio must be at most "
                f"{MAX_REFERENCE_ASPECT}:1 (--image)"
            )
    return images


def _negative_prompts(source: ModelSource, negative, count: int) -> list[str] | None:
    """One negative prompt per prompt where the model runs true CFG (diffusers' "" by default)."""
    if not source.uses_true_cfg:
        if negative is not None:
            raise FluxExportError(
                f"{source.name} runs without true CFG (a distilled or guidance-embedded model): drop --negative-prompt"
            )
        return None
    negatives = [""] * count if negative is None else _as_list(negative)
    if len(negatives) == 1 and count > 1:
        negatives = negatives * count
    if len(negatives) != count:
        raise FluxExportError(f"got {count} prompts but {len(negatives)} negative prompts: give one, or one per prompt")
    return negatives


def tokenize(tokenizer, prompts: list[str], max_length: int, label: str) -> tuple[torch.Tensor, list[str]]:
    """Token ids [B,max_length] int32, padded and truncated as diffusers does, and a warning if truncated."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    warnings = []
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > max_length:
        removed = tokenizer.batch_decode(full[:, max_length - 1 : -1])
        warnings.append(f"{label} prompt was truncated to {max_length} tokens; dropped: {removed}")
    return ids.input_ids.to(torch.int32), warnings


def stage_end(device: torch.device) -> float:
    """perf_counter at the end of a stage: on CUDA, after the queued work finished (once per stage)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
