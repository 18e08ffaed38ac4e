"""FLUX.2's runtime part ([klein], [dev]), number for number as diffusers' Flux2KleinPipeline / Flux2Pipeline.

What differs from FLUX.1: one text encoder (a causal LM read at intermediate layers: Qwen3 on [klein], Mistral3
on [dev]) fed chat-templated prompts (after BFL's system message on [dev]) with an attention mask; noise drawn
directly as 2×2-patchified 128-channel latents; 4-axis RoPE ids (t, h, w, l); the empirical shift `mu`; true CFG
with a negative prompt on base models; reference images (each capped to ~1 MP and center-cropped) as extra tokens
at RoPE times 10, 20, …. The VAE components take and give the normalised, patchified latents (the batch-norm
statistics live inside the graphs), so the runtime never reads VAE weights. The Euler loop, true CFG's
combination and the step caches are the generic pipeline's (`runtime.pipeline`); under true CFG each of a step's
two runs caches on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from fluxexport.errors import RequestError
from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Backend
from fluxexport.runtime.cache import CacheSettings, StepCache
from fluxexport.runtime.family_part import EncodedPrompts, Grid, TransformerInputs
from fluxexport.runtime.images import images_to_uint8, pil_to_model_input
from fluxexport.runtime.latents import latent_grid as vae_grid
from fluxexport.runtime.magcache import NAMED_RATIOS
from fluxexport.runtime.request import RequestReferences, ResolvedRequest
from fluxexport.runtime.schedule import empirical_mu, flow_match_sigmas

MAX_REFERENCE_AREA = 1024 * 1024  # larger references are scaled down to about this many pixels
REFERENCE_TIME_STEP = 10  # the i-th reference's tokens sit at RoPE time 10 + 10·i
MIN_REFERENCE_SIDE = 64  # diffusers' limits on a reference image
MAX_REFERENCE_ASPECT = 8


def capped(image: Image.Image) -> Image.Image:
    """The image scaled (Lanczos) to about 1 megapixel when it is larger, else itself."""
    width, height = image.size
    if width * height <= MAX_REFERENCE_AREA:
        return image
    scale = math.sqrt(MAX_REFERENCE_AREA / (width * height))
    return image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)


def reference_size(image: Image.Image, multiple: int = 16) -> tuple[int, int]:
    """(width, height) a reference is encoded at: capped to ~1 MP, then floored to `multiple`."""
    width, height = capped(image).size
    return width // multiple * multiple, height // multiple * multiple


def prepare_reference(image: Image.Image, multiple: int = 16) -> torch.Tensor:
    """A reference → [1,3,H,W] in [-1,1]: capped to ~1 MP, then center-cropped to its encoding size."""
    image = capped(image.convert("RGB"))
    width, height = reference_size(image, multiple)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    if (width, height) != image.size:
        image = image.crop((left, top, left + width, top + height))
    return pil_to_model_input(image)


def grid_ids(h: int, w: int, time: int = 0) -> torch.Tensor:
    """RoPE ids [h·w, 4] of the tokens of an h×w patch grid at RoPE `time`: (time, row, col, 0). The noise
    tokens sit at time 0."""
    ids = torch.zeros(h, w, 4)
    ids[..., 0] = time
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 4)


def reference_ids(h: int, w: int, index: int) -> torch.Tensor:
    """RoPE ids [h·w, 4] of the `index`-th reference's tokens: (t = 10 + 10·index, row, col, 0)."""
    return grid_ids(h, w, REFERENCE_TIME_STEP * (index + 1))


def request_references(source: ModelSource, images: Sequence[Image.Image] | None) -> RequestReferences:
    """A request's references, checked as diffusers checks them; without a size the output takes the first
    one's (capped to ~1 MP), floored to the packing multiple."""
    for index, reference in enumerate(images or ()):
        width, height = reference.size
        if min(width, height) < MIN_REFERENCE_SIDE:
            raise RequestError(
                "image", f"reference image {index + 1} is {width}×{height}",
                f"both sides must be at least {MIN_REFERENCE_SIDE} px",
            )  # fmt: skip
        if max(width / height, height / width) > MAX_REFERENCE_ASPECT:
            raise RequestError(
                "image", f"reference image {index + 1} is {width}×{height}",
                f"its aspect ratio must be at most {MAX_REFERENCE_ASPECT}:1",
            )  # fmt: skip
    if not images:
        return RequestReferences()
    width, height = reference_size(images[0], 2 * source.vae_scale_factor)
    return RequestReferences(references=tuple(images), size=(height, width))


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


def encode_texts(
    backend: Backend, source: ModelSource, prompts: list[str], max_length: int, repeats: int
) -> tuple[torch.Tensor, list[str]]:
    """Prompt embeddings [B·repeats, L, 3·hidden] (each prompt repeated per image) and any warnings."""
    (tokenizer,) = source.tokenizers
    feeds, warnings = tokenize_chat(tokenizer, prompts, max_length, system_message(source))
    embeddings = backend.component("text_encoder")({k: v.to(backend.device) for k, v in feeds.items()})
    return embeddings["text_embeddings"].repeat_interleave(repeats, dim=0), warnings


def encode_prompts(backend: Backend, source: ModelSource, resolved: ResolvedRequest, repeats: int) -> EncodedPrompts:
    """The prompt embeddings and the negative prompts' (true CFG; None without), each repeated `repeats`×."""
    length = resolved.max_sequence_length
    embeddings, warnings = encode_texts(backend, source, resolved.prompts, length, repeats)
    negative = None
    if resolved.negative_prompts is not None:
        negative_embeddings, _ = encode_texts(backend, source, resolved.negative_prompts, length, repeats)
        negative = {"encoder_hidden_states": negative_embeddings}
    return EncodedPrompts({"encoder_hidden_states": embeddings}, negative, warnings)


def latent_grid(source: ModelSource, resolved: ResolvedRequest) -> Grid:
    """(h, w) of the noise's patch grid: 1/16 of the pixels."""
    h, w = vae_grid(resolved.height, resolved.width, source.vae_scale_factor)
    return h // 2, w // 2


def image_ids(grid: Grid) -> torch.Tensor:
    """RoPE ids [h·w, 4] of the noise tokens, at RoPE time 0."""
    return grid_ids(*grid)


def sigmas(source: ModelSource, steps: int, tokens: int) -> torch.Tensor:
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


def noise_tokens(source: ModelSource, resolved: ResolvedRequest, batch: int, seed: int) -> torch.Tensor:
    """Packed Gaussian latents [B, h·w, 4C] float32 of `seed`: 128 channels on the patch grid."""
    return pack(noise(batch, 4 * source.latent_channels, *latent_grid(source, resolved), seed))


def encode_references(
    backend: Backend, source: ModelSource, resolved: ResolvedRequest, batch: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The request's references → (packed tokens [B,M,128], ids [M,4]), each image at its own RoPE time; None
    without any."""
    if not resolved.references:
        return None
    tokens, ids = [], []
    for index, image in enumerate(resolved.references):
        pixels = prepare_reference(image, 2 * source.vae_scale_factor).to(backend.device)
        latent = backend.component("vae_encoder")({"images": pixels})["latent"]
        _, _, h, w = latent.shape
        tokens.append(pack(latent)[0])
        ids.append(reference_ids(h, w, index))
    packed = torch.cat(tokens, dim=0)[None].expand(batch, -1, -1).contiguous()
    return packed, torch.cat(ids, dim=0).to(backend.device)


def conditioning(
    source: ModelSource, embeddings: torch.Tensor, ids: torch.Tensor, guidance_scale: float
) -> TransformerInputs:
    """Every transformer input but hidden_states and timestep: the same each step."""
    feeds = {
        "encoder_hidden_states": embeddings,
        "img_ids": ids,
        "txt_ids": text_ids(embeddings.shape[1]).to(embeddings.device),
    }
    if source.guidance_embeds:
        feeds["guidance"] = torch.full((embeddings.shape[0],), guidance_scale, device=embeddings.device)
    return feeds


def transformer_inputs(
    source: ModelSource, prompts: EncodedPrompts, ids: torch.Tensor, guidance_scale: float
) -> tuple[TransformerInputs, TransformerInputs | None]:
    """(the conditional transformer inputs, the unconditional ones or None): true CFG runs only with a negative
    prompt and a guidance scale above 1, as diffusers decides."""
    positive = conditioning(source, prompts.text["encoder_hidden_states"], ids, guidance_scale)
    if prompts.negative is None or guidance_scale <= 1:
        return positive, None
    return positive, conditioning(source, prompts.negative["encoder_hidden_states"], ids, guidance_scale)


def decode(backend: Backend, source: ModelSource, latents: torch.Tensor, grid: Grid) -> np.ndarray:
    """Packed latents → uint8 images [B,H,W,3] (the decoder graph un-normalises and un-patchifies)."""
    return images_to_uint8(backend.component("vae_decoder")({"latent": unpack(latents, *grid)})["images"])


def check_cache(source: ModelSource, cache: CacheSettings | StepCache) -> None:
    """Refuse, in one line, a step cache that cannot serve this FLUX.2 model: MagCache with FLUX.1-dev's ratios or
    a ratios file calibrated on another model."""
    if isinstance(cache, CacheSettings):
        cache.check_calibrated_for(source.name)
    ratios = cache.knobs.get("ratios") if isinstance(cache, CacheSettings) else None
    if ratios in NAMED_RATIOS:
        raise RequestError(
            "cache", f"magcache ratios={ratios} are FLUX.1-dev's, not {source.name}'s",
            f"measure its own with fluxexport calibrate-magcache --model {source.name} --prompt TEXT --out FILE and "
            "pass ratios=FILE",
        )  # fmt: skip
