"""Pixels in and out: VAE latent scaling, [-1,1] ↔ uint8, PNG writing. Same rounding as diffusers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fluxexport.atomic import atomic_file
from fluxexport.errors import FluxExportError, InternalError


def to_vae_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float) -> torch.Tensor:
    """Denoised latents → what the VAE decoder takes: z / scaling_factor + shift_factor."""
    return latents / scaling_factor + shift_factor


def from_vae_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float) -> torch.Tensor:
    """VAE encoder mean → the transformer's latent space: (z − shift_factor) · scaling_factor."""
    return (latents - shift_factor) * scaling_factor


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output [B,3,H,W] in [-1,1] → uint8 [B,H,W,3]; a NaN or infinite pixel is our failure, never an
    image (uint8 would turn it into black or garbage silently)."""
    if not bool(torch.isfinite(images).all()):
        raise InternalError("the VAE decoder gave NaN or infinite pixels: no image written")
    unit = (images.to(torch.float32) * 0.5 + 0.5).clamp(0, 1)
    array = unit.cpu().permute(0, 2, 3, 1).numpy()
    return (array * 255).round().astype(np.uint8)


def pil_to_model_input(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image → [1,3,H,W] float32 in [-1,1]."""
    array = np.array(image.convert("RGB")).astype(np.float32)[None] / 255.0  # 1,H,W,3
    # Keep diffusers' channels-last strides: the CPU convolutions pick kernels (and rounding) by layout.
    tensor = torch.from_numpy(array.transpose(0, 3, 1, 2))
    return 2.0 * tensor - 1.0


def load_reference(path: str | Path, option: str = "--image") -> Image.Image:
    """An image (a reference, Fill's image or mask, a control image) read from a file as diffusers' `load_image`
    reads it: EXIF orientation applied, any mode (RGBA, P, L, I;16, …) converted to RGB; a file PIL cannot read is
    refused in one line naming `option`."""
    from diffusers.utils import load_image

    try:
        with Image.open(path) as opened:
            opened.load()
            return load_image(opened)
    except OSError as error:
        raise FluxExportError(f"cannot read {option} {path}: {error}") from None


def output_paths(output: str | Path, count: int) -> list[Path]:
    """`out.png` for one image; `out_0.png`, `out_1.png`, … for several."""
    output = Path(output)
    if output.suffix.lower() != ".png":
        output = output.with_suffix(output.suffix + ".png") if output.suffix else output.with_suffix(".png")
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{index}{output.suffix}") for index in range(count)]


def save_png_atomic(image: np.ndarray, path: Path) -> None:
    """Write a PNG through a temporary file in the same folder, then rename: never a half-written file."""
    with atomic_file(path) as temporary:
        Image.fromarray(image).save(temporary, format="PNG")
