"""FLUX.1's runtime part (schnell, dev, Kontext, Fill, Canny/Depth), number for number as diffusers' FluxPipeline,
FluxKontextPipeline, FluxFillPipeline and FluxControlPipeline: CLIP's pooled embedding and T5's sequence, noise
drawn as 16-channel VAE latents and packed 2×2, 3-axis RoPE ids, the scheduler config's shift, the guidance
embedding on dev and Kontext, Kontext's one reference image (at the preferred resolution closest to its aspect
ratio) as extra tokens in RoPE domain 1, and the conditions Fill and Canny/Depth put beside each noise token's
channels (Fill: the masked image's latents and the mask, 8×8 pixels per latent pixel; Control: the control image's
latents), their VAE posteriors sampled from the request's seed in diffusers' order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from fluxexport.errors import RequestError
from fluxexport.families.family import CONTROL_CONDITION, FILL_CONDITION
from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Backend
from fluxexport.runtime.cache import CacheSettings, StepCache
from fluxexport.runtime.family_part import EncodedPrompts, Grid, TransformerInputs
from fluxexport.runtime.images import from_vae_latents, images_to_uint8, pil_to_model_input, to_vae_latents
from fluxexport.runtime.latents import image_ids as packed_ids
from fluxexport.runtime.latents import latent_grid as vae_grid
from fluxexport.runtime.latents import noise, pack_latents, text_ids, unpack_latents
from fluxexport.runtime.request import RequestReferences, ResolvedRequest, tokenize
from fluxexport.runtime.schedule import flow_match_sigmas

# (width, height) pairs FLUX.1 Kontext was trained on, ~1 megapixel each.
PREFERRED_KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248),
    (880, 1184), (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832),
    (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
)  # fmt: skip


def preferred_resolution(width: int, height: int) -> tuple[int, int]:
    """The preferred (width, height) whose aspect ratio is closest to width/height (first one on ties)."""
    aspect = width / height
    _, best_w, best_h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return best_w, best_h


def reference_size(image: Image.Image, auto_resize: bool = True, multiple: int = 16) -> tuple[int, int]:
    """(width, height) the reference is encoded at: its own size floored to /16, or the preferred one."""
    width, height = (value - value % multiple for value in image.size)
    if auto_resize:
        width, height = preferred_resolution(width, height)
    return width // multiple * multiple, height // multiple * multiple


def prepare_reference(image: Image.Image, auto_resize: bool = True, multiple: int = 16) -> torch.Tensor:
    """A reference image → [1,3,H,W] in [-1,1], Lanczos-resized to its encoding size."""
    width, height = reference_size(image, auto_resize, multiple)
    if (width, height) != image.size:
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return pil_to_model_input(image)


def request_references(source: ModelSource, images: Sequence[Image.Image] | None) -> RequestReferences:
    """A request's reference: one, on Kontext only (the output keeps the request's or the model's size); Fill's
    image to repaint (the output takes its size, floored to /16, when the request gives none)."""
    if source.reference_mode == FILL_CONDITION:
        return fill_image(source, images)
    if images is None:
        return RequestReferences()
    if source.reference_mode == CONTROL_CONDITION:
        raise RequestError(
            "image", f"{source.name} is a FLUX.1 Canny/Depth model: it follows a control image, not a reference",
            "pass the edge or depth map with --control-image and {drop}", pointer=False,
        )  # fmt: skip
    if not source.is_kontext:
        raise RequestError(
            "image", f"{{option}} is a Kontext reference but {source.name} is a {source.pipeline_class}",
            "use a FLUX.1 Kontext model or {drop}", pointer=False,
        )  # fmt: skip
    if len(images) != 1:
        raise RequestError(
            "image", f"FLUX.1 Kontext takes one reference image, got {len(images)}", "pass one {option}", pointer=False
        )
    multiple, (width, height) = 2 * source.vae_scale_factor, images[0].size
    if min(width, height) < multiple:  # floored to 0 px: diffusers' aspect ratio divides by zero (fuzzing found it)
        raise RequestError(
            "image", f"the reference image is {width}×{height}", f"both sides must be at least {multiple} px"
        )
    return RequestReferences(image=images[0])


def fill_image(source: ModelSource, images: Sequence[Image.Image] | None) -> RequestReferences:
    """Fill's one image to repaint (`--image`, its mask `--mask`), with the size it implies."""
    if images is None or len(images) != 1:
        got = "none" if images is None else str(len(images))
        raise RequestError(
            "image", f"{source.name} is a FLUX.1 Fill model: it repaints one image where its mask is white, got {got}",
            "pass the image with {option} and the mask with --mask", pointer=False,
        )  # fmt: skip
    return RequestReferences(image=images[0], size=condition_size(source, images[0], "image"))


def condition_size(source: ModelSource, image: Image.Image, field: str) -> tuple[int, int]:
    """(height, width) an image condition implies for the output: its own size floored to /16 (FLUX's packing);
    diffusers' pipelines resize the condition to the output's size."""
    multiple, (width, height) = 2 * source.vae_scale_factor, image.size
    if min(width, height) < multiple:
        raise RequestError(field, f"the {{name}} is {width}×{height}", f"both sides must be at least {multiple} px")
    return height - height % multiple, width - width % multiple


def check_cache(source: ModelSource, cache: CacheSettings | StepCache) -> None:
    """Every step cache serves FLUX.1 (MagCache's published ratios are FLUX.1-dev's); a MagCache ratios file
    calibrated on another model is refused in one line."""
    if isinstance(cache, CacheSettings):
        cache.check_calibrated_for(source.name)


def encode_prompts(backend: Backend, source: ModelSource, resolved: ResolvedRequest, repeats: int) -> EncodedPrompts:
    """T5's embeddings [B,L,D] of `prompts_2` and CLIP's pooled embeddings [B,P] of `prompts`, each repeated
    `repeats`× (once per image), and any truncation warnings; the request's own embeddings where it gives them
    (FLUX.1 Redux's prior), repeated as FluxPipeline repeats `prompt_embeds`."""
    if resolved.prompt_embeds is not None and resolved.pooled_prompt_embeds is not None:
        embeddings, pooled = resolved.prompt_embeds.to(backend.device), resolved.pooled_prompt_embeds.to(backend.device)
        text = {
            "encoder_hidden_states": embeddings.repeat_interleave(repeats, dim=0),
            "pooled_projections": pooled.repeat_interleave(repeats, dim=0),
        }
        return EncodedPrompts(text)
    clip_tokenizer, t5_tokenizer = source.tokenizers
    clip_ids, clip_warnings = tokenize(clip_tokenizer, resolved.prompts, clip_tokenizer.model_max_length, "CLIP")
    t5_ids, t5_warnings = tokenize(t5_tokenizer, resolved.prompts_2, resolved.max_sequence_length, "T5")
    pooled = backend.component("clip")({"input_ids": clip_ids.to(backend.device)})["pooled_embeddings"]
    embeddings = backend.component("t5")({"input_ids": t5_ids.to(backend.device)})["text_embeddings"]
    text = {
        "encoder_hidden_states": embeddings.repeat_interleave(repeats, dim=0),
        "pooled_projections": pooled.repeat_interleave(repeats, dim=0),
    }
    return EncodedPrompts(text, None, clip_warnings + t5_warnings)


def latent_grid(source: ModelSource, resolved: ResolvedRequest) -> Grid:
    """(h, w) of the VAE latents of the request's image size (the tokens pack 2×2 of them)."""
    return vae_grid(resolved.height, resolved.width, source.vae_scale_factor)


def image_ids(grid: Grid) -> torch.Tensor:
    """RoPE ids [N,3] of the noise tokens: (0, row, col)."""
    return packed_ids(*grid)


def encode_references(
    backend: Backend, source: ModelSource, resolved: ResolvedRequest, batch: int
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Kontext's reference → (packed tokens [B,M,4C], ids [M,3] in domain 1); Fill's image and mask, Control's
    control image → (the condition [B,N,·] beside each noise token's channels, None); None without any."""
    if source.reference_mode == FILL_CONDITION:
        return fill_condition(backend, source, resolved, batch), None
    if source.reference_mode == CONTROL_CONDITION:
        return control_condition(backend, source, resolved, batch), None
    if resolved.image is None:
        return None
    multiple = 2 * source.vae_scale_factor
    pixels = prepare_reference(resolved.image, resolved.auto_resize_reference, multiple).to(backend.device)
    mean = backend.component("vae_encoder")({"images": pixels})["latent"]
    latents = from_vae_latents(mean, source.vae["scaling_factor"], source.vae["shift_factor"] or 0.0)
    _, _, h, w = latents.shape
    return pack_latents(latents).expand(batch, -1, -1).contiguous(), packed_ids(h, w, domain=1).to(backend.device)


def fill_condition(backend: Backend, source: ModelSource, resolved: ResolvedRequest, batch: int) -> torch.Tensor:
    """FluxFillPipeline's condition [B,N,4C+4s²]: the image and its mask resized to the output (diffusers' own
    processors: Lanczos, the mask made gray and binarized at 0.5), the image where the mask is black encoded and
    sampled with the seed's third draw (the first is the image's own posterior, the second the noise), then packed,
    and the mask's s×s pixels under each latent pixel as channels, packed 2×2."""
    from diffusers.image_processor import VaeImageProcessor

    scale, channels = source.vae_scale_factor, int(source.vae["latent_channels"])
    height, width = resolved.height, resolved.width
    image = VaeImageProcessor(vae_scale_factor=2 * scale, vae_latent_channels=channels).preprocess(
        resolved.image, height=height, width=width
    ).to(torch.float32)  # fmt: skip
    mask = VaeImageProcessor(
        vae_scale_factor=2 * scale, vae_latent_channels=channels, do_normalize=False, do_binarize=True,
        do_convert_grayscale=True,
    ).preprocess(resolved.mask, height=height, width=width)  # fmt: skip
    masked = (image * (1 - mask)).to(backend.device)
    _, noise_draw, sample_draw = seeded_draws(resolved.seed, ((1,), (batch,), (1,)), channels, height, width, scale)
    latents = sampled_latents(backend, source, masked, sample_draw).repeat(batch, 1, 1, 1)
    h, w = latents.shape[-2:]
    packed_mask = mask[:, 0].repeat(batch, 1, 1).view(batch, h, scale, w, scale).permute(0, 2, 4, 1, 3)
    packed_mask = pack_latents(packed_mask.reshape(batch, scale * scale, h, w)).to(backend.device)
    return torch.cat((pack_latents(latents), packed_mask), dim=-1)


def control_condition(backend: Backend, source: ModelSource, resolved: ResolvedRequest, batch: int) -> torch.Tensor:
    """FluxControlPipeline's condition [B,N,4C]: the control image resized to the output (Lanczos), repeated per
    image, encoded and sampled with the seed's first draw (the noise is its second), packed."""
    from diffusers.image_processor import VaeImageProcessor

    scale, channels = source.vae_scale_factor, int(source.vae["latent_channels"])
    control = VaeImageProcessor(vae_scale_factor=2 * scale, vae_latent_channels=channels).preprocess(
        resolved.control_image, height=resolved.height, width=resolved.width
    )  # fmt: skip
    control = control.repeat_interleave(batch, dim=0).to(torch.float32).to(backend.device)
    sample_draw, _ = seeded_draws(resolved.seed, ((batch,), (batch,)), channels, *control.shape[-2:], scale)
    return pack_latents(sampled_latents(backend, source, control, sample_draw))


def sampled_latents(backend: Backend, source: ModelSource, pixels: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """Pixels [B,3,H,W] in [-1,1] → a sample of the VAE posterior (mean + std · `draw`, diffusers'
    `latent_dist.sample`), shifted and scaled into the transformer's latent space."""
    posterior = backend.component("vae_encoder")({"images": pixels})
    sample = posterior["latent"] + posterior["latent_std"] * draw.to(posterior["latent"].device)
    return from_vae_latents(sample, source.vae["scaling_factor"], source.vae["shift_factor"] or 0.0)


def seeded_draws(
    seed: int, batches: tuple[tuple[int], ...], channels: int, height: int, width: int, scale: int
) -> list[torch.Tensor]:
    """The Gaussian draws [b,C,h,w] a pipeline takes from one CPU generator of `seed`, in its order (Fill: its
    image's posterior, the noise, the masked image's posterior; Control: the control image's, the noise)."""
    h, w = vae_grid(height, width, scale)
    generator = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn((b, channels, h, w), generator=generator, dtype=torch.float32) for (b,) in batches]


def noise_tokens(source: ModelSource, resolved: ResolvedRequest, batch: int, seed: int) -> torch.Tensor:
    """Packed Gaussian latents [B,N,4C] float32 of `seed`, drawn on the CPU generator as diffusers draws them (Fill
    and Control draw their condition's posterior sample first from the same generator)."""
    channels, scale = int(source.vae["latent_channels"]), source.vae_scale_factor
    if source.reference_mode == FILL_CONDITION:
        draws = seeded_draws(seed, ((1,), (batch,)), channels, resolved.height, resolved.width, scale)
        return pack_latents(draws[1])
    if source.reference_mode == CONTROL_CONDITION:
        draws = seeded_draws(seed, ((batch,), (batch,)), channels, resolved.height, resolved.width, scale)
        return pack_latents(draws[1])
    return pack_latents(noise(batch, channels, resolved.height, resolved.width, seed, scale))


def sigmas(source: ModelSource, steps: int, tokens: int) -> torch.Tensor:
    """The flow-match sigmas, shifted as the scheduler config says (dynamically for `tokens` on dev, Kontext)."""
    return flow_match_sigmas(steps, tokens, source.scheduler)


def transformer_inputs(
    source: ModelSource, prompts: EncodedPrompts, ids: torch.Tensor, guidance_scale: float
) -> tuple[TransformerInputs, None]:
    """Every transformer input but hidden_states and timestep, the same each step; FLUX.1 has no true CFG."""
    embeddings = prompts.text["encoder_hidden_states"]
    device = embeddings.device
    inputs = {
        "encoder_hidden_states": embeddings,
        "pooled_projections": prompts.text["pooled_projections"],
        "img_ids": ids,
        "txt_ids": text_ids(embeddings.shape[1]).to(device),
    }
    if source.guidance_embeds:
        batch = embeddings.shape[0]
        inputs["guidance"] = torch.full((batch,), guidance_scale, dtype=torch.float32, device=device)
    return inputs, None


def decode(backend: Backend, source: ModelSource, latents: torch.Tensor, grid: Grid) -> np.ndarray:
    """Packed latents → uint8 images [B,H,W,3]: unpacked, un-scaled and shifted, then the VAE decoder."""
    scale, shift = source.vae["scaling_factor"], source.vae["shift_factor"] or 0.0
    scaled = to_vae_latents(unpack_latents(latents, *grid), scale, shift)
    return images_to_uint8(backend.component("vae_decoder")({"latent": scaled})["images"])
