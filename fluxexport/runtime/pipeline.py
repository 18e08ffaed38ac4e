"""Text → image around any Backend: tokenize, encode, sample, denoise, decode. No backend knowledge here."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Backend
from fluxexport.runtime.cache import CacheSettings, StepCache
from fluxexport.runtime.images import from_vae_latents, images_to_uint8, to_vae_latents
from fluxexport.runtime.kontext import prepare_reference
from fluxexport.runtime.latents import (
    check_image_size,
    image_ids,
    latent_grid,
    noise,
    pack_latents,
    text_ids,
    unpack_latents,
)
from fluxexport.runtime.schedule import check_steps, euler_step, flow_match_sigmas, model_timestep

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
    image: Image.Image | None = None
    auto_resize_reference: bool = True


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
    height = request.height or source.default_size
    width = request.width or source.default_size
    check_image_size(height, width, 2 * source.vae_scale_factor)
    steps = check_steps(source.default_steps if request.num_inference_steps is None else request.num_inference_steps)
    if request.num_images_per_prompt < 1:
        raise FluxExportError(f"num-images must be at least 1, got {request.num_images_per_prompt} (--num-images)")
    length = request.max_sequence_length or source.default_max_sequence_length
    if not 1 <= length <= T5_MAX_SEQUENCE_LENGTH:
        raise FluxExportError(
            f"max-sequence-length must be in 1..{T5_MAX_SEQUENCE_LENGTH}, got {length} (--max-sequence-length)"
        )
    if request.image is not None and not source.is_kontext:
        raise FluxExportError(
            f"--image is a Kontext reference but {source.name} is a {source.pipeline_class}: "
            "use a FLUX.1 Kontext model or drop --image"
        )
    guidance = source.default_guidance if request.guidance_scale is None else request.guidance_scale
    return ResolvedRequest(
        prompts, prompts_2, height, width, steps, float(guidance), request.seed,
        request.num_images_per_prompt, length, request.image, request.auto_resize_reference,
    )  # fmt: skip


def tokenize(tokenizer, prompts: list[str], max_length: int, label: str) -> tuple[torch.Tensor, list[str]]:
    """Token ids [B,max_length] int32, padded and truncated as diffusers does, and a warning if truncated."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    warnings = []
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > max_length:
        removed = tokenizer.batch_decode(full[:, max_length - 1 : -1])
        warnings.append(f"{label} prompt was truncated to {max_length} tokens; dropped: {removed}")
    return ids.input_ids.to(torch.int32), warnings


def encode_prompts(
    backend: Backend, source: ModelSource, request: ResolvedRequest
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(T5 embeddings [B,L,D], pooled CLIP embeddings [B,P]) repeated per image, and any warnings."""
    clip_tokenizer, t5_tokenizer = source.tokenizers
    clip_ids, clip_warnings = tokenize(clip_tokenizer, request.prompts, clip_tokenizer.model_max_length, "CLIP")
    t5_ids, t5_warnings = tokenize(t5_tokenizer, request.prompts_2, request.max_sequence_length, "T5")
    pooled = backend.component("clip")({"input_ids": clip_ids.to(backend.device)})["pooled_embeddings"]
    embeddings = backend.component("t5")({"input_ids": t5_ids.to(backend.device)})["text_embeddings"]
    repeats = request.num_images_per_prompt
    return (
        embeddings.repeat_interleave(repeats, dim=0),
        pooled.repeat_interleave(repeats, dim=0),
        clip_warnings + t5_warnings,
    )


def encode_reference(
    backend: Backend, source: ModelSource, image: Image.Image, batch: int, auto_resize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kontext reference → (packed tokens [B,M,4C], ids [M,3] in domain 1)."""
    pixels = prepare_reference(image, auto_resize, 2 * source.vae_scale_factor).to(backend.device)
    mean = backend.component("vae_encoder")({"images": pixels})["latent"]
    latents = from_vae_latents(mean, source.vae["scaling_factor"], source.vae.get("shift_factor") or 0.0)
    _, _, h, w = latents.shape
    return pack_latents(latents).expand(batch, -1, -1).contiguous(), image_ids(h, w, domain=1).to(backend.device)


def denoise(
    transformer: Callable | Callable[[str], Callable],
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    conditioning: dict[str, torch.Tensor],
    reference: torch.Tensor | None = None,
    on_step: StepCallback | None = None,
    cache: StepCache | None = None,
) -> torch.Tensor:
    """The Euler loop: `conditioning` holds every transformer input except hidden_states and timestep. Without a
    `cache`, `transformer` is the transformer component; with one (a step cache's state for this generation),
    it gives the transformer components the cache runs by name (a Backend's `component`)."""
    batch, tokens, _ = latents.shape
    steps = len(sigmas) - 1
    if cache is None:
        cache, component = CacheSettings().new_state(), {"transformer": transformer}.__getitem__
    else:
        component = transformer
    for index in range(steps):
        hidden = latents if reference is None else torch.cat([latents, reference], dim=1)
        feeds = {"hidden_states": hidden, "timestep": model_timestep(sigmas[index], batch), **conditioning}
        velocity = cache(feeds, component)["latent"][:, :tokens]
        latents = euler_step(latents, velocity, sigmas[index], sigmas[index + 1])
        if on_step is not None:
            on_step(index + 1, steps)
    return latents


def decode(backend: Backend, source: ModelSource, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Packed latents → uint8 images [B,H,W,3]."""
    h, w = latent_grid(height, width, source.vae_scale_factor)
    scaled = to_vae_latents(
        unpack_latents(latents, h, w), source.vae["scaling_factor"], source.vae.get("shift_factor") or 0.0
    )
    return images_to_uint8(backend.component("vae_decoder")({"latent": scaled})["images"])


def transformer_conditioning(
    source: ModelSource, embeddings: torch.Tensor, pooled: torch.Tensor, ids: torch.Tensor, guidance_scale: float
) -> dict[str, torch.Tensor]:
    """Every transformer input but hidden_states and timestep, on the embeddings' device: the same each step."""
    device = embeddings.device
    conditioning = {
        "encoder_hidden_states": embeddings,
        "pooled_projections": pooled,
        "img_ids": ids,
        "txt_ids": text_ids(embeddings.shape[1]).to(device),
    }
    if source.guidance_embeds:
        batch = embeddings.shape[0]
        conditioning["guidance"] = torch.full((batch,), guidance_scale, dtype=torch.float32, device=device)
    return conditioning


def _stage_end(device: torch.device) -> float:
    """perf_counter at the end of a stage: on CUDA, after the queued work finished (once per stage)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def generate(
    backend: Backend,
    source: ModelSource,
    request: GenerationRequest,
    on_step: StepCallback | None = None,
    cache: CacheSettings | None = None,
) -> GenerationResult:
    """Run the whole pipeline; the same seed and settings give diffusers' image (with `cache`, diffusers' image
    with the same cache hook)."""
    resolved = resolve_request(source, request)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    embeddings, pooled, warnings = encode_prompts(backend, source, resolved)
    timings["text_encode"] = _stage_end(backend.device) - start

    batch, device = resolved.batch, backend.device
    tick = time.perf_counter()
    reference, ids = None, image_ids(*latent_grid(resolved.height, resolved.width, source.vae_scale_factor)).to(device)
    if resolved.image is not None:
        reference, reference_ids = encode_reference(
            backend, source, resolved.image, batch, resolved.auto_resize_reference
        )
        ids = torch.cat([ids, reference_ids], dim=0)
        timings["reference_encode"] = _stage_end(device) - tick

    # noise is drawn on the CPU generator (diffusers' images for a seed), then lives on the backend's device
    latents = pack_latents(
        noise(batch, source.latent_channels, resolved.height, resolved.width, resolved.seed, source.vae_scale_factor)
    ).to(device)
    sigmas = flow_match_sigmas(resolved.steps, latents.shape[1], source.scheduler).to(device)
    conditioning = transformer_conditioning(source, embeddings, pooled, ids, resolved.guidance_scale)

    cache = cache or CacheSettings()
    for name in cache.components:  # load before the clock starts, as the transformer always was
        backend.component(name)
    state = cache.new_state()
    tick = time.perf_counter()
    latents = denoise(backend.component, latents, sigmas, conditioning, reference, on_step, state)
    timings["denoise"] = _stage_end(device) - tick
    timings["denoise_per_step"] = timings["denoise"] / resolved.steps

    tick = time.perf_counter()
    images = decode(backend, source, latents, resolved.height, resolved.width)
    timings["decode"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start
    return GenerationResult(images, resolved, timings, warnings, state.computed, str(cache))
