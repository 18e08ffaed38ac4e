"""Text → image around any Backend: encode, sample, denoise, decode. No backend knowledge here, and no family's:
what differs between FLUX.1 and FLUX.2 (prompt encoding, references, noise, schedule, transformer inputs, decoding)
is each family's runtime part (`families/<f>/runtime.py`, `runtime.family_part.FamilyRuntime`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Backend, check_request
from fluxexport.runtime.cache import CacheSettings, MagCalibration, NoCache, StepCache
from fluxexport.runtime.family_part import FamilyRuntime
from fluxexport.runtime.request import (
    GenerationRequest,
    GenerationResult,
    ResolvedRequest,
    StepCallback,
    resolve_request,
    stage_end,
)
from fluxexport.runtime.schedule import euler_step, model_timestep

__all__ = ["GenerationRequest", "GenerationResult", "ResolvedRequest", "denoise", "generate", "resolve_request"]


def family_runtime(source: ModelSource) -> FamilyRuntime:
    """The runtime part of `source`'s family (`families/<f>/runtime.py`)."""
    return source.family.part("runtime")  # type: ignore[return-value]


def denoise(
    transformer: Callable | Callable[[str], Callable],
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    conditioning: dict[str, torch.Tensor],
    negative: dict[str, torch.Tensor] | None = None,
    guidance_scale: float = 1.0,
    reference: torch.Tensor | None = None,
    on_step: StepCallback | None = None,
    cache: StepCache | None = None,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Euler loop: `conditioning` holds every transformer input except hidden_states and timestep; with
    `negative` (true CFG) a second transformer run per step, combined as diffusers does. Without a `cache`,
    `transformer` is the transformer component; with one (a step cache's state for this generation), it gives the
    transformer components the cache runs by name (a Backend's `component`), and the unconditional run caches in a
    state of its own (`cache.branch()`), as diffusers' "uncond" cache context. `reference` tokens follow the noise
    tokens (Kontext, FLUX.2); a `condition` [B,N,·] widens each noise token's channels (FLUX.1 Fill, Canny/Depth)."""
    batch, tokens, _ = latents.shape
    steps = len(sigmas) - 1
    if cache is None:
        cache, component = NoCache(), {"transformer": transformer}.__getitem__
    else:
        component = transformer
    runs = [(conditioning, cache)] + ([(negative, cache.branch())] if negative is not None else [])
    for index in range(steps):
        hidden = latents if condition is None else torch.cat([latents, condition], dim=2)
        hidden = hidden if reference is None else torch.cat([hidden, reference], dim=1)
        step = {"hidden_states": hidden, "timestep": model_timestep(sigmas[index], batch)}
        velocity, *unconditional = (run(step | inputs, component)["latent"][:, :tokens] for inputs, run in runs)
        if unconditional:
            velocity = unconditional[0] + guidance_scale * (velocity - unconditional[0])
        latents = euler_step(latents, velocity, sigmas[index], sigmas[index + 1])
        if on_step is not None:
            on_step(index + 1, steps)
    return latents


def generate(
    backend: Backend,
    source: ModelSource,
    request: GenerationRequest,
    on_step: StepCallback | None = None,
    cache: CacheSettings | StepCache | None = None,
) -> GenerationResult:
    """Run the whole pipeline; the same seed and settings give diffusers' image (with `cache`, diffusers' image
    with the same cache hook). With true CFG (FLUX.2 base models) each of the two transformer runs of a step keeps
    its own cache state, and the result's computed steps are the conditional run's."""
    family = family_runtime(source)
    cache = cache or CacheSettings()
    family.check_cache(source, cache)
    resolved = resolve_request(source, request)
    check_request(backend, resolved)  # e.g. references past the engines' budget, before any component runs
    timings: dict[str, float] = {}
    start = time.perf_counter()
    device = backend.device
    prompts = family.encode_prompts(backend, source, resolved, resolved.num_images_per_prompt)
    timings["text_encode"] = stage_end(device) - start

    batch, grid = resolved.batch, family.latent_grid(source, resolved)
    ids, reference, condition = family.image_ids(grid).to(device), None, None
    tick = time.perf_counter()
    encoded = family.encode_references(backend, source, resolved, batch)
    if encoded is not None:  # reference tokens with their ids, or a condition beside each token's channels (no ids)
        reference, reference_ids = encoded
        if reference_ids is None:
            reference, condition = None, reference
        else:
            ids = torch.cat([ids, reference_ids], dim=0)
        timings["reference_encode"] = stage_end(device) - tick

    # noise is drawn on the CPU generator (diffusers' images for a seed), then lives on the backend's device
    latents = family.noise_tokens(source, resolved, batch, resolved.seed).to(device)
    sigmas = family.sigmas(source, resolved.steps, latents.shape[1]).to(device)
    positive, negative = family.transformer_inputs(source, prompts, ids, resolved.guidance_scale)

    for name in cache.components:  # load before the clock starts, as the transformer always was
        backend.component(name)
    state = cache if isinstance(cache, StepCache) else cache.new_state(resolved.steps)
    state.check_components(backend.component)  # e.g. a head exported before TeaCache, before any step runs
    tick = time.perf_counter()
    latents = denoise(
        backend.component, latents, sigmas, positive, negative, resolved.guidance_scale, reference, on_step, state,
        condition,
    )  # fmt: skip
    timings["denoise"] = stage_end(device) - tick
    timings["denoise_per_step"] = timings["denoise"] / resolved.steps

    tick = time.perf_counter()
    images = family.decode(backend, source, latents, grid)
    timings["decode"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start
    warnings = list(prompts.warnings)
    if isinstance(cache, CacheSettings):
        warnings += cache.warnings(source.name, source.family.transformer_class)
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
