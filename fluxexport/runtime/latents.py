"""Noise, packing and RoPE position ids: pure tensor functions, identical to diffusers' FluxPipeline."""

from __future__ import annotations

import torch

from fluxexport.errors import RequestError


def latent_grid(height: int, width: int, vae_scale_factor: int = 8) -> tuple[int, int]:
    """Latent (h, w) for an image of height×width pixels: even, so that 2×2 patches pack."""
    return 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))


def check_image_size(height: int, width: int, multiple: int = 16, largest: int | None = None) -> None:
    """Refuse sizes the packed latent grid cannot represent, naming the nearest valid ones, and sides past
    `largest` (the most a request may ask of the model)."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(name, f"{{name}} must be a whole number of pixels, got {value!r}")
        if value < multiple or value % multiple:
            lower = max(multiple, value // multiple * multiple)
            upper = lower + multiple if lower < value else lower
            choices = f"{lower} or {upper}" if lower != upper else f"{lower}"
            raise RequestError(name, f"{{name}} {value} is not a multiple of {multiple}", f"use {choices}")
        if largest is not None and value > largest:
            raise RequestError(
                name, f"{{name}} {value} is past the {largest} px this model serves", f"use {largest} or less"
            )


def noise(batch: int, channels: int, height: int, width: int, seed: int, vae_scale_factor: int = 8) -> torch.Tensor:
    """Gaussian latents [B,C,h,w] float32 from a CPU generator: the same draw as diffusers for the seed."""
    h, w = latent_grid(height, width, vae_scale_factor)
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((batch, channels, h, w), generator=generator, dtype=torch.float32)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] → [B, h/2·w/2, 4C]: each 2×2 latent patch becomes one token."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # B,h/2,w/2,C,2,2
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h/2·w/2, 4C] → [B,C,h,w]; the inverse of pack_latents for a latent grid of h×w."""
    b, _, d = tokens.shape
    patches = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # B,C,h/2,2,w/2,2
    return patches.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, domain: int = 0) -> torch.Tensor:
    """RoPE ids [h/2·w/2, 3] float32 for packed tokens: rows [domain, row, col] (Kontext refs use 1)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 0] = domain
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int) -> torch.Tensor:
    """RoPE ids [L,3] for text tokens: all zeros (the encoders carry their own positions)."""
    return torch.zeros(length, 3)
