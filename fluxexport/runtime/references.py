"""FLUX.2 reference images (multi-reference editing): sizes and preprocessing, as Flux2KleinPipeline does."""

from __future__ import annotations

import math

import torch
from PIL import Image

from fluxexport.runtime.images import pil_to_model_input

MAX_REFERENCE_AREA = 1024 * 1024  # larger references are scaled down to about this many pixels
REFERENCE_TIME_STEP = 10  # the i-th reference's tokens sit at RoPE time 10 + 10·i


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
