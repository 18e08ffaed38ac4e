"""A generation request: what a user asks for, checked and completed with the model's defaults; its result."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from fluxexport.errors import RequestError
from fluxexport.families.family import CONTROL_CONDITION, FILL_CONDITION, KONTEXT_REFERENCE, REFERENCE_BUDGET
from fluxexport.models.source import ModelSource
from fluxexport.runtime.latents import check_image_size
from fluxexport.runtime.schedule import check_steps

T5_MAX_SEQUENCE_LENGTH = 512
# What one request may ask for, checked before any model loads (steps: schedule.MAX_STEPS). A side: a stated cap of
# 4× the model's default side (FLUX.1 and FLUX.2: 4096 px, 65536 image tokens, 16× the 1024² they are made for;
# tiny models: 1024 px, the largest side their exports serve): neither diffusers nor the RoPE nor the VAE has a hard
# limit, and attention grows with the square of the tokens, so a larger side only starts a run that cannot end.
# Text: the encoders read at most 512 tokens, and a longer prompt only costs tokenizer time. Seeds: what
# torch.Generator.manual_seed takes. Images per prompt: a stated cap per request.
MAX_SIDE_OVER_DEFAULT = 4
MAX_IMAGES_PER_PROMPT = 64
MAX_PROMPTS = 64
MAX_PROMPT_CHARACTERS = 32 * T5_MAX_SEQUENCE_LENGTH
SEED_RANGE = (-(2**63), 2**64 - 1)
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerationRequest:
    """What a user asks for, in diffusers' vocabulary; None means the model's default."""

    prompt: str | Sequence[str] | None
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
    mask: Image.Image | None = None  # FLUX.1 Fill: white where `image` is repainted (diffusers' `mask_image`)
    control_image: Image.Image | None = None  # FLUX.1 Canny/Depth: the edge or depth map to follow
    # Text embeddings given instead of a prompt (diffusers' names; FLUX.1 Redux's prior gives them): T5's
    # sequence [B,L,D] and CLIP's pooled embedding [B,P], repeated per image as diffusers repeats them
    prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None


@dataclass(frozen=True)
class RequestReferences:
    """A request's reference images as its family takes them: FLUX.1 Kontext's one `image`, or FLUX.2's
    `references` (in order); `size` is the (height, width) they imply when the request gives none."""

    image: Image.Image | None = None
    references: tuple[Image.Image, ...] = ()
    size: tuple[int, int] | None = None


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
    mask: Image.Image | None = None  # FLUX.1 Fill's mask (its image is `image`)
    control_image: Image.Image | None = None  # FLUX.1 Canny/Depth's control image
    prompt_embeds: torch.Tensor | None = None  # given instead of prompts (FLUX.1 Redux): [B,L,D]
    pooled_prompt_embeds: torch.Tensor | None = None  # [B,P]

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
    embeddings = _prompt_embeddings(source, request)
    if embeddings is not None:  # no text to encode: one empty prompt per embedding, for the batch
        prompts = [""] * embeddings[0].shape[0]
    else:
        prompts = _texts("prompt", request.prompt)
        if not prompts or any(not p.strip() for p in prompts):
            raise RequestError("prompt", "prompt is empty", "pass the text to draw {given}", pointer=False)
    prompts_2 = _texts("prompt_2", request.prompt_2) if request.prompt_2 is not None else prompts
    if len(prompts_2) != len(prompts):
        raise RequestError(
            "prompt_2", f"got {len(prompts)} prompts but {len(prompts_2)} prompt_2 values", "give one per prompt",
            pointer=False,
        )  # fmt: skip
    if request.prompt_2 is not None and not source.family.takes_prompt_2:
        raise RequestError(
            "prompt_2", f"{source.name} is {source.family.title}, which has one text encoder", "{drop}", pointer=False
        )
    taken = _references(source, request.image)
    kontext_image, references = taken.image, taken.references
    _check_reference_resizing(source, request.auto_resize_reference, kontext_image)
    mask, control_image, control_size = _conditions(source, request.mask, request.control_image)
    height, width = request.height, request.width
    size = taken.size or control_size
    if size is not None:  # FLUX.2's first reference, Fill's or Control's image: its size when the request gives none
        height, width = height or size[0], width or size[1]
    height = source.default_size if height is None else height
    width = source.default_size if width is None else width
    check_image_size(height, width, 2 * source.vae_scale_factor, MAX_SIDE_OVER_DEFAULT * source.default_size)
    steps = check_steps(source.default_steps if request.num_inference_steps is None else request.num_inference_steps)
    count = _integer("num_images_per_prompt", request.num_images_per_prompt)
    if count < 1:
        raise RequestError("num_images_per_prompt", f"{{name}} must be at least 1, got {count}")
    if count > MAX_IMAGES_PER_PROMPT:
        raise RequestError("num_images_per_prompt", f"{{name}} must be at most {MAX_IMAGES_PER_PROMPT}, got {count}")
    length = request.max_sequence_length
    length = source.default_max_sequence_length if length is None else _integer("max_sequence_length", length)
    if not 1 <= length <= T5_MAX_SEQUENCE_LENGTH:
        raise RequestError("max_sequence_length", f"{{name}} must be in 1..{T5_MAX_SEQUENCE_LENGTH}, got {length}")
    seed = _integer("seed", request.seed)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise RequestError("seed", f"{{name}} must be in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got {seed}")
    guidance = (
        source.default_guidance if request.guidance_scale is None else _finite("guidance_scale", request.guidance_scale)
    )
    negatives = _negative_prompts(source, request.negative_prompt, len(prompts))
    return ResolvedRequest(
        prompts, prompts_2, height, width, steps, float(guidance), seed, count, length, kontext_image,
        request.auto_resize_reference, references, negatives, mask, control_image,
        *(embeddings or (None, None)),
    )  # fmt: skip


def _prompt_embeddings(source: ModelSource, request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The request's `prompt_embeds` and `pooled_prompt_embeds` (both or neither; no prompt beside them), checked
    against the transformer's text and pooled widths; None when it gives a prompt."""
    embeds, pooled = request.prompt_embeds, request.pooled_prompt_embeds
    if embeds is None and pooled is None:
        return None
    if embeds is None or pooled is None:
        missing = "prompt_embeds" if embeds is None else "pooled_prompt_embeds"
        raise RequestError(missing, "{name} is missing: text embeddings are given as a pair", pointer=False)
    if request.prompt is not None or request.prompt_2 is not None:
        raise RequestError(
            "prompt", "a prompt and prompt embeddings were both given", "give one of the two", pointer=False
        )
    if "pooled_projection_dim" not in source.transformer:
        raise RequestError(
            "prompt_embeds", f"{source.name}'s transformer takes no pooled text embedding (a {source.pipeline_class})",
            "pass a prompt instead", pointer=False,
        )  # fmt: skip
    widths = (int(source.transformer["joint_attention_dim"]), int(source.transformer["pooled_projection_dim"]))
    if embeds.ndim != 3 or pooled.ndim != 2 or embeds.shape[0] != pooled.shape[0] or embeds.shape[0] < 1:
        raise RequestError(
            "prompt_embeds", f"text embeddings must be [B,L,{widths[0]}] and [B,{widths[1]}], got "
            f"{list(embeds.shape)} and {list(pooled.shape)}", pointer=False,
        )  # fmt: skip
    if (embeds.shape[-1], pooled.shape[-1]) != widths:
        raise RequestError(
            "prompt_embeds", f"text embeddings are {embeds.shape[-1]} and {pooled.shape[-1]} wide but "
            f"{source.name} takes {widths[0]} and {widths[1]}", "use embeddings made for this model", pointer=False,
        )  # fmt: skip
    return embeds.to(torch.float32), pooled.to(torch.float32)


def _texts(name: str, text: object) -> list[str]:
    """A prompt (one text, or one per image) as a list, each text within MAX_PROMPT_CHARACTERS."""
    texts = [text] if isinstance(text, str) else list(text) if isinstance(text, list | tuple) else None
    if texts is None or not all(isinstance(t, str) for t in texts):
        raise RequestError(name, f"{{name}} must be text, got {type(text).__name__}", pointer=False)
    if len(texts) > MAX_PROMPTS:
        raise RequestError(name, f"{{name}} holds {len(texts)} texts, at most {MAX_PROMPTS}", pointer=False)
    longest = max((len(t) for t in texts), default=0)
    if longest > MAX_PROMPT_CHARACTERS:
        raise RequestError(
            name, f"{{name}} holds {longest} characters, at most {MAX_PROMPT_CHARACTERS}",
            f"the text encoders read {T5_MAX_SEQUENCE_LENGTH} tokens at most; shorten it", pointer=False,
        )  # fmt: skip
    return texts


def _integer(name: str, value: object) -> int:
    """`value` as an int, refused in one line if it is not a whole number."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise RequestError(name, f"{{name}} must be a whole number, got {value!r}")
    return int(value)


def _finite(name: str, value: object) -> float:
    """`value` as a float, refused in one line unless it is a finite number."""
    number = None
    if not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating):
        try:
            number = float(value)
        except OverflowError:  # an int past float's range
            number = None
    if number is None or not math.isfinite(number):
        raise RequestError(name, f"{{name}} must be a finite number, got {value!r}")
    return number


def _references(source: ModelSource, image) -> RequestReferences:
    """The request's reference images as its family takes them (`families/<f>/runtime.py`, checked there as the
    family's diffusers pipeline checks them)."""
    images = None if image is None else (image,) if isinstance(image, Image.Image) else tuple(image)
    return source.family.part("runtime").request_references(source, images)


def _check_reference_resizing(source: ModelSource, auto_resize: bool, image: Image.Image | None) -> None:
    """Keeping a reference at its own size (`auto_resize_reference=False`, run's --keep-reference-size) means
    something for a FLUX.1 Kontext reference only (otherwise resized to a preferred Kontext size): refused in one
    line, not ignored, without one (Fill's image is resized to the output, which takes its size by default; FLUX.2's
    references are always capped to ~1 MP, as diffusers does; the other pipelines take none)."""
    if auto_resize or (source.reference_mode == KONTEXT_REFERENCE and image is not None):
        return
    if source.reference_mode == KONTEXT_REFERENCE:
        raise RequestError(
            "auto_resize_reference", "{option} keeps a Kontext reference at its own size, but no reference was given",
            "pass it with --image or {drop}", pointer=False,
        )  # fmt: skip
    why = {
        FILL_CONDITION: "its image is resized to the output size, which is the image's own unless you set one",
        CONTROL_CONDITION: "its control image is resized to the output size, which is the map's own unless you set one",
        REFERENCE_BUDGET: "its references are capped to about 1 megapixel, as diffusers does, and kept otherwise",
    }.get(source.reference_mode, "it takes no Kontext reference")
    raise RequestError(
        "auto_resize_reference", f"{{option}} is for FLUX.1 Kontext references, but {source.name} is a "
        f"{source.pipeline_class} ({why})", "{drop}", pointer=False,
    )  # fmt: skip


def _conditions(
    source: ModelSource, mask: object, control_image: object
) -> tuple[Image.Image | None, Image.Image | None, tuple[int, int] | None]:
    """FLUX.1 Fill's mask and Canny/Depth's control image, each refused where its pipeline takes none and required
    where it does; the size a control image implies (its own, floored to /16)."""
    mode = source.reference_mode
    conditions = (
        ("mask", mask, FILL_CONDITION, "FLUX.1 Fill"),
        ("control_image", control_image, CONTROL_CONDITION, "FLUX.1 Canny/Depth"),
    )
    for name, given, wanted, kind in conditions:
        if given is not None and not isinstance(given, Image.Image):
            raise RequestError(name, f"{{name}} must be an image, got {type(given).__name__}", pointer=False)
        if given is not None and mode != wanted:
            raise RequestError(
                name, f"{{option}} is for {kind} models but {source.name} is a {source.pipeline_class}",
                f"use a {kind} model or {{drop}}", pointer=False,
            )  # fmt: skip
    if mode == FILL_CONDITION and mask is None:
        raise RequestError(
            "mask", f"{source.name} is a FLUX.1 Fill model: it repaints its image where a mask is white",
            "pass the mask with {option}", pointer=False,
        )  # fmt: skip
    if mode != CONTROL_CONDITION:
        return mask, None, None  # type: ignore[return-value]
    if control_image is None:
        raise RequestError(
            "control_image", f"{source.name} is a FLUX.1 Canny/Depth model: it follows an edge or depth map",
            "pass the map with {option}", pointer=False,
        )  # fmt: skip
    multiple, (width, height) = 2 * source.vae_scale_factor, control_image.size  # type: ignore[attr-defined]
    if min(width, height) < multiple:
        raise RequestError(
            "control_image", f"the {{name}} is {width}×{height}", f"both sides must be at least {multiple} px"
        )
    return None, control_image, (height - height % multiple, width - width % multiple)  # type: ignore[return-value]


def sample_conditions(source: ModelSource, height: int, width: int) -> dict[str, Image.Image]:
    """The image conditions a tool's own requests give a pipeline that needs them (`validate`, `bench`): FLUX.1
    Fill's `image` and `mask` (a gradient picture, its right third repainted), Canny/Depth's `control_image` (a
    ring's edges); none for the others. A side the request refuses (under 16 px) draws them at 16 px."""
    if source.reference_mode not in (FILL_CONDITION, CONTROL_CONDITION):
        return {}
    height, width = max(int(height), 16), max(int(width), 16)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if source.reference_mode == FILL_CONDITION:
        picture = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 9) * np.cos(y / 7)], axis=-1)
        image = Image.fromarray((picture * 255).astype(np.uint8))
        return {"image": image, "mask": Image.fromarray(((x >= 2 * width / 3) * 255).astype(np.uint8))}
    radius = np.hypot(x - width / 2, y - height / 2) / min(height, width)
    edges = (np.abs(radius - 0.3) < 0.02) | (np.abs(radius - 0.15) < 0.02)
    return {"control_image": Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")}


def _negative_prompts(source: ModelSource, negative, count: int) -> list[str] | None:
    """One negative prompt per prompt where the model runs true CFG (diffusers' "" by default)."""
    if not source.uses_true_cfg:
        if negative is not None:
            raise RequestError(
                "negative_prompt", f"{source.name} runs without true CFG (a distilled or guidance-embedded model)",
                "{drop}", pointer=False,
            )  # fmt: skip
        return None
    negatives = [""] * count if negative is None else _texts("negative_prompt", negative)
    if len(negatives) == 1 and count > 1:
        negatives = negatives * count
    if len(negatives) != count:
        raise RequestError(
            "negative_prompt", f"got {count} prompts but {len(negatives)} negative prompts", "give one, or one per prompt",
            pointer=False,
        )  # fmt: skip
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
