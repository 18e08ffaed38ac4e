"""Text → image around any Backend: tokenize, encode, sample, denoise, decode. No backend knowledge here."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from fluxexport.models.source import ModelSource
from fluxexport.runtime import flux2
from fluxexport.runtime.backend import Backend, check_request
from fluxexport.runtime.cache import CacheSettings, MagCalibration, StepCache
from fluxexport.runtime.images import from_vae_latents, images_to_uint8, to_vae_latents
from fluxexport.runtime.kontext import prepare_reference
from fluxexport.runtime.latents import (
    image_ids,
    latent_grid,
    noise,
    pack_latents,
    text_ids,
    unpack_latents,
)
from fluxexport.runtime.request import (
    GenerationRequest,
    GenerationResult,
    ResolvedRequest,
    StepCallback,
    resolve_request,
    stage_end,
    tokenize,
)
from fluxexport.runtime.schedule import euler_step, flow_match_sigmas, model_timestep

__all__ = ["GenerationRequest", "GenerationResult", "ResolvedRequest", "denoise", "generate", "resolve_request"]


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
    latents = from_vae_latents(mean, source.vae["scaling_factor"], source.vae["shift_factor"] or 0.0)
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
        unpack_latents(latents, h, w), source.vae["scaling_factor"], source.vae["shift_factor"] or 0.0
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


def generate(
    backend: Backend,
    source: ModelSource,
    request: GenerationRequest,
    on_step: StepCallback | None = None,
    cache: CacheSettings | StepCache | None = None,
) -> GenerationResult:
    """Run the whole pipeline; the same seed and settings give diffusers' image (with `cache`, diffusers' image
    with the same cache hook). FLUX.2 checkpoints run FLUX.2's pipeline (`runtime.flux2`)."""
    if source.is_flux2:
        return flux2.generate(backend, source, request, on_step, cache)
    resolved = resolve_request(source, request)
    check_request(backend, resolved)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    embeddings, pooled, warnings = encode_prompts(backend, source, resolved)
    timings["text_encode"] = stage_end(backend.device) - start

    batch, device = resolved.batch, backend.device
    tick = time.perf_counter()
    reference, ids = None, image_ids(*latent_grid(resolved.height, resolved.width, source.vae_scale_factor)).to(device)
    if resolved.image is not None:
        reference, reference_ids = encode_reference(
            backend, source, resolved.image, batch, resolved.auto_resize_reference
        )
        ids = torch.cat([ids, reference_ids], dim=0)
        timings["reference_encode"] = stage_end(device) - tick

    # noise is drawn on the CPU generator (diffusers' images for a seed), then lives on the backend's device
    latents = pack_latents(
        noise(batch, source.latent_channels, resolved.height, resolved.width, resolved.seed, source.vae_scale_factor)
    ).to(device)
    sigmas = flow_match_sigmas(resolved.steps, latents.shape[1], source.scheduler).to(device)
    conditioning = transformer_conditioning(source, embeddings, pooled, ids, resolved.guidance_scale)

    cache = cache or CacheSettings()
    for name in cache.components:  # load before the clock starts, as the transformer always was
        backend.component(name)
    state = cache if isinstance(cache, StepCache) else cache.new_state(resolved.steps)
    tick = time.perf_counter()
    latents = denoise(backend.component, latents, sigmas, conditioning, reference, on_step, state)
    timings["denoise"] = stage_end(device) - tick
    timings["denoise_per_step"] = timings["denoise"] / resolved.steps

    tick = time.perf_counter()
    images = decode(backend, source, latents, resolved.height, resolved.width)
    timings["decode"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start
    return GenerationResult(images, resolved, timings, warnings, state.computed, str(cache))


def calibrate_mag_ratios(
    backend: Backend, source: ModelSource, request: GenerationRequest, on_step: StepCallback | None = None
) -> list[float]:
    """MagCache's magnitude ratios of `request`'s run (every prompt in one batch, every step computed through the
    transformer's parts), as diffusers' calibrate mode measures them on the same request: one per step, to store
    with `magcache.write_ratios`."""
    calibration = MagCalibration()
    generate(backend, source, request, on_step, calibration)
    return calibration.ratios
