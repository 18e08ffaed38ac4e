"""FLUX.2's pipeline around any Backend, number for number as diffusers' Flux2KleinPipeline / Flux2Pipeline.

What differs from FLUX.1: one text encoder (a causal LM read at intermediate layers: Qwen3 on [klein], Mistral3
on [dev]) fed chat-templated prompts (after BFL's system message on [dev]) with an attention mask; noise drawn directly as 2×2-patchified 128-channel latents; 4-axis RoPE ids (t, h, w, l);
the empirical shift `mu`; true CFG with a negative prompt on base models; reference images as extra tokens at
RoPE times 10, 20, …. The VAE components take and give the normalised, patchified latents (the batch-norm
statistics live inside the graphs), so the runtime never reads VAE weights. The step caches (`runtime.cache`) run as
on FLUX.1, around the transformer or its parts; under true CFG each of a step's two runs caches on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Backend, check_request
from fluxexport.runtime.cache import CacheSettings, NoCache, StepCache
from fluxexport.runtime.images import images_to_uint8
from fluxexport.runtime.latents import latent_grid
from fluxexport.runtime.magcache import NAMED_RATIOS
from fluxexport.runtime.references import grid_ids, prepare_reference, reference_ids
from fluxexport.runtime.request import (
    GenerationRequest,
    GenerationResult,
    ResolvedRequest,
    StepCallback,
    resolve_request,
    stage_end,
)
from fluxexport.runtime.schedule import empirical_mu, euler_step, flow_match_sigmas, model_timestep


def system_message(source: ModelSource) -> str | None:
    """FLUX.2 [dev]'s prompts are read after BFL's system message (diffusers' `Flux2Pipeline` sends it); [klein]'s
    prompts are user turns alone."""
    if source.pipeline_class != "Flux2Pipeline":
        return None
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    return SYSTEM_MESSAGE


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as a user turn of the tokenizer's chat template, with the generation prompt, thinking off."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        for prompt in prompts
    ]


def conversations(prompts: list[str], system: str) -> list[list[dict]]:
    """FLUX.2 [dev]'s conversation per prompt: the system turn, then the prompt as a user turn of text parts (any
    "[IMG]" in it removed, as diffusers' `format_input` does)."""
    return [
        [
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
        ]
        for prompt in prompts
    ]


def tokenize_chat(
    tokenizer, prompts: list[str], max_length: int, system: str | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(input_ids and attention_mask [B,max_length] int32, warnings): padded and truncated as diffusers does —
    [klein] tokenizes the rendered user turns; [dev] (`system` given) tokenizes the system conversations in
    `apply_chat_template`, as its processor does with text-only messages."""
    if system is None:
        texts = chat_prompts(tokenizer, prompts)
        tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        full = tokenizer(texts, padding="longest", return_tensors="pt").input_ids
    else:
        messages = conversations(prompts, system)
        template = {"add_generation_prompt": False, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
        tokens = tokenizer.apply_chat_template(
            messages, padding="max_length", truncation=True, max_length=max_length, **template
        )
        full = tokenizer.apply_chat_template(messages, padding="longest", **template)["input_ids"]
    warnings = []
    if full.shape[-1] > max_length:
        warnings.append(f"text encoder prompt was truncated to {max_length} tokens (chat template included)")
    feeds = {
        "input_ids": tokens["input_ids"].to(torch.int32),
        "attention_mask": tokens["attention_mask"].to(torch.int32),
    }
    return feeds, warnings


def encode_prompts(
    backend: Backend, source: ModelSource, prompts: list[str], max_length: int, repeats: int
) -> tuple[torch.Tensor, list[str]]:
    """Prompt embeddings [B·repeats, L, 3·hidden] (each prompt repeated per image) and any warnings."""
    (tokenizer,) = source.tokenizers
    feeds, warnings = tokenize_chat(tokenizer, prompts, max_length, system_message(source))
    embeddings = backend.component("text_encoder")({k: v.to(backend.device) for k, v in feeds.items()})
    return embeddings["text_embeddings"].repeat_interleave(repeats, dim=0), warnings


def encode_request(
    backend: Backend, source: ModelSource, resolved: ResolvedRequest, repeats: int
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """(prompt embeddings, negative prompt embeddings or None, warnings) of a request, each repeated `repeats`×."""
    length = resolved.max_sequence_length
    embeddings, warnings = encode_prompts(backend, source, resolved.prompts, length, repeats)
    negative = None
    if resolved.negative_prompts is not None:
        negative, _ = encode_prompts(backend, source, resolved.negative_prompts, length, repeats)
    return embeddings, negative, warnings


def patch_grid(source: ModelSource, resolved: ResolvedRequest) -> tuple[int, int]:
    """(h, w) of the noise's patch grid: 1/16 of the pixels."""
    h, w = latent_grid(resolved.height, resolved.width, source.vae_scale_factor)
    return h // 2, w // 2


def sigmas_for(source: ModelSource, steps: int, tokens: int) -> torch.Tensor:
    """The flow-match sigmas of `steps` steps, shifted by FLUX.2's empirical mu for `tokens` noise tokens."""
    return flow_match_sigmas(steps, tokens, source.scheduler, mu=empirical_mu(tokens, steps))


def text_ids(length: int) -> torch.Tensor:
    """RoPE ids [L,4] of text tokens: (0, 0, 0, position)."""
    ids = torch.zeros(length, 4)
    ids[:, 3] = torch.arange(length)
    return ids


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] → [B, h·w, C]: one token per patch, row-major."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h·w, C] → [B,C,h,w]; the inverse of `pack`."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, h, w)


def noise(batch: int, channels: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Gaussian patchified latents [B,C,h,w] float32 from a CPU generator: diffusers' draw for the seed."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((batch, channels, h, w), generator=generator, dtype=torch.float32)


def encode_references(
    backend: Backend, source: ModelSource, references, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference images → (packed tokens [B,M,128], ids [M,4]), each image at its own RoPE time."""
    tokens, ids = [], []
    for index, image in enumerate(references):
        pixels = prepare_reference(image, 2 * source.vae_scale_factor).to(backend.device)
        latent = backend.component("vae_encoder")({"images": pixels})["latent"]
        _, _, h, w = latent.shape
        tokens.append(pack(latent)[0])
        ids.append(reference_ids(h, w, index))
    packed = torch.cat(tokens, dim=0)[None].expand(batch, -1, -1).contiguous()
    return packed, torch.cat(ids, dim=0).to(backend.device)


def denoise(
    transformer: Callable | Callable[[str], Callable],
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    conditioning: dict[str, torch.Tensor],
    negative: dict[str, torch.Tensor] | None,
    guidance_scale: float,
    reference: torch.Tensor | None = None,
    on_step: StepCallback | None = None,
    cache: StepCache | None = None,
) -> torch.Tensor:
    """The Euler loop; with `negative` (true CFG) a second transformer run per step, combined as diffusers does.
    Without a `cache`, `transformer` is the transformer component; with one (a step cache's state for this
    generation), it gives the transformer components the cache runs by name (a Backend's `component`), and the
    unconditional run caches in a state of its own (`cache.branch()`), as diffusers' "uncond" cache context."""
    batch, tokens, _ = latents.shape
    steps = len(sigmas) - 1
    if cache is None:
        cache, component = NoCache(), {"transformer": transformer}.__getitem__
    else:
        component = transformer
    runs = [(conditioning, cache)] + ([(negative, cache.branch())] if negative is not None else [])
    for index in range(steps):
        hidden = latents if reference is None else torch.cat([latents, reference], dim=1)
        step = {"hidden_states": hidden, "timestep": model_timestep(sigmas[index], batch)}
        velocity, *unconditional = (run(step | inputs, component)["latent"][:, :tokens] for inputs, run in runs)
        if unconditional:
            velocity = unconditional[0] + guidance_scale * (velocity - unconditional[0])
        latents = euler_step(latents, velocity, sigmas[index], sigmas[index + 1])
        if on_step is not None:
            on_step(index + 1, steps)
    return latents


def conditioning(
    source: ModelSource, embeddings: torch.Tensor, ids: torch.Tensor, guidance_scale: float
) -> dict[str, torch.Tensor]:
    """Every transformer input but hidden_states and timestep: the same each step."""
    feeds = {
        "encoder_hidden_states": embeddings,
        "img_ids": ids,
        "txt_ids": text_ids(embeddings.shape[1]).to(embeddings.device),
    }
    if source.guidance_embeds:
        feeds["guidance"] = torch.full((embeddings.shape[0],), guidance_scale, device=embeddings.device)
    return feeds


def guided_conditioning(
    source: ModelSource,
    embeddings: torch.Tensor,
    negative_embeddings: torch.Tensor | None,
    ids: torch.Tensor,
    guidance_scale: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(the conditional transformer inputs, the unconditional ones or None): true CFG runs only with a negative
    prompt and a guidance scale above 1, as diffusers decides."""
    positive = conditioning(source, embeddings, ids, guidance_scale)
    if negative_embeddings is None or guidance_scale <= 1:
        return positive, None
    return positive, conditioning(source, negative_embeddings, ids, guidance_scale)


def decode(backend: Backend, latents: torch.Tensor, h: int, w: int) -> np.ndarray:
    """Packed latents → uint8 images [B,H,W,3] (the decoder graph un-normalises and un-patchifies)."""
    return images_to_uint8(backend.component("vae_decoder")({"latent": unpack(latents, h, w)})["images"])


def check_cache(source: ModelSource, cache: CacheSettings | StepCache) -> None:
    """Refuse, in one line, a step cache that cannot serve this FLUX.2 model: MagCache with FLUX.1-dev's ratios."""
    ratios = cache.knobs.get("ratios") if isinstance(cache, CacheSettings) else None
    if ratios in NAMED_RATIOS:
        raise FluxExportError(
            f"magcache ratios={ratios} are FLUX.1-dev's, not {source.name}'s: measure its own with fluxexport "
            f"calibrate-magcache --model {source.name} --prompt TEXT --out FILE and pass ratios=FILE (--cache)"
        )


def generate(
    backend: Backend,
    source: ModelSource,
    request: GenerationRequest,
    on_step: StepCallback | None = None,
    cache: CacheSettings | StepCache | None = None,
) -> GenerationResult:
    """Run FLUX.2's pipeline; the same seed and settings give diffusers' image (with `cache`, diffusers' image with
    the same cache hook). With true CFG each of the two transformer runs of a step keeps its own cache state, and
    the result's computed steps are the conditional run's."""
    cache = cache or CacheSettings()
    check_cache(source, cache)
    resolved: ResolvedRequest = resolve_request(source, request)
    check_request(backend, resolved)  # e.g. references past the engines' budget, before any component runs
    timings: dict[str, float] = {}
    start = time.perf_counter()
    device = backend.device
    embeddings, negative_embeddings, warnings = encode_request(
        backend, source, resolved, resolved.num_images_per_prompt
    )
    timings["text_encode"] = stage_end(device) - start

    batch = resolved.batch
    h, w = patch_grid(source, resolved)
    ids, reference = grid_ids(h, w).to(device), None
    if resolved.references:
        tick = time.perf_counter()
        reference, extra_ids = encode_references(backend, source, resolved.references, batch)
        ids = torch.cat([ids, extra_ids], dim=0)
        timings["reference_encode"] = stage_end(device) - tick

    latents = pack(noise(batch, 4 * source.latent_channels, h, w, resolved.seed)).to(device)
    sigmas = sigmas_for(source, resolved.steps, latents.shape[1]).to(device)
    positive, negative = guided_conditioning(source, embeddings, negative_embeddings, ids, resolved.guidance_scale)

    for name in cache.components:  # loaded before the clock starts
        backend.component(name)
    state = cache if isinstance(cache, StepCache) else cache.new_state(resolved.steps)
    tick = time.perf_counter()
    latents = denoise(
        backend.component, latents, sigmas, positive, negative, resolved.guidance_scale, reference, on_step, state
    )
    timings["denoise"] = stage_end(device) - tick
    timings["denoise_per_step"] = timings["denoise"] / resolved.steps

    tick = time.perf_counter()
    images = decode(backend, latents, h, w)
    timings["decode"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start
    return GenerationResult(images, resolved, timings, warnings, state.computed, str(cache))
