"""Kontext reference images: preferred-resolution choice and preprocessing, as FluxKontextPipeline does."""

from __future__ import annotations

import torch
from PIL import Image

from fluxexport.runtime.images import pil_to_model_input

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
