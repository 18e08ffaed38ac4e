"""Tiny quantized single-file checkpoints in the published layouts (`models/quantized_checkpoint.py`), written
from a tiny folder's transformer for tests and demos: the weights of the double and single blocks' Linears
quantized, everything else as it is.

- `fp8r`: black-forest-labs' layout, quantized by diffusers' own `quantize_fp8r` (E4M3 weight, float32
  `weight_scale` per row), the inverse of the loader that reads it.
- `fp8`: ComfyUI's float8_e4m3fn layout: per-tensor `weight_scale` = amax / 448, `input_scale` from the inputs
  each Linear saw over a short calibration (amax / 448), a `<layer>.comfy_quant` marker per layer.
- `nvfp4`: the ModelOpt layout, quantized by diffusers' own `quantize_nvfp4` (packed E2M1, E4M3 block scales,
  `weight_scale_2`), `input_scale` = amax / (6 · 448) from the calibration's amax.
- `scaled_fp8` (ComfyUI's legacy `scale_weight` keys): a layout fluxexport refuses, written to test the refusal.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from fluxexport.atomic import atomic_file
from fluxexport.dtypes import E4M3_MAX, quantize_e4m3
from fluxexport.errors import FluxExportError

QUANTIZED_LAYOUTS = ("fp8r", "fp8", "nvfp4", "scaled_fp8")
BLOCKS = ("double_blocks.", "single_blocks.")


def _quantized(key: str, value: torch.Tensor) -> bool:
    """A block Linear's weight (BFL names, the `model.diffusion_model.` prefix removed)."""
    return key.startswith(BLOCKS) and key.endswith(".weight") and value.dim() == 2


def _marker(form: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": form}).encode()), dtype=torch.uint8)


def _fp8r(base: str, weight: torch.Tensor, _amax: float) -> dict[str, torch.Tensor]:
    from diffusers.quantizers.bfl.utils import quantize_fp8r

    quantized, scale = quantize_fp8r(weight)
    return {base + "weight": quantized, base + "weight_scale": scale}


def _fp8(base: str, weight: torch.Tensor, amax: float) -> dict[str, torch.Tensor]:
    scale = torch.tensor(max(weight.abs().max().item(), 1e-12) / E4M3_MAX, dtype=torch.float32)
    return {
        base + "weight": quantize_e4m3(weight.float(), scale),
        base + "weight_scale": scale,
        base + "input_scale": torch.tensor(max(amax, 1e-12) / E4M3_MAX, dtype=torch.float32),
        base + "comfy_quant": _marker("float8_e4m3fn"),
    }


def _nvfp4(base: str, weight: torch.Tensor, amax: float) -> dict[str, torch.Tensor]:
    from diffusers.quantizers.bfl.utils import quantize_nvfp4

    packed, block_scale, global_scale = quantize_nvfp4(weight)
    input_scale = torch.tensor(max(amax, 1e-12) / (E4M3_MAX * 6.0), dtype=torch.float32)
    return {base + "weight": packed, base + "weight_scale": block_scale, base + "weight_scale_2": global_scale,
            base + "input_scale": input_scale}  # fmt: skip


def _scaled_fp8(base: str, weight: torch.Tensor, _amax: float) -> dict[str, torch.Tensor]:
    scale = torch.tensor(max(weight.abs().max().item(), 1e-12) / E4M3_MAX, dtype=torch.float32)
    return {base + "weight": quantize_e4m3(weight.float(), scale), base + "scale_weight": scale}


WRITERS: dict[str, Callable[[str, torch.Tensor, float], dict[str, torch.Tensor]]] = {
    "fp8r": _fp8r, "fp8": _fp8, "nvfp4": _nvfp4, "scaled_fp8": _scaled_fp8,
}  # fmt: skip


def bfl_input_amax(source, amax: dict[str, float]) -> dict[str, float]:
    """Each BFL block Linear's input amax (key without `.weight`) from a calibration's (diffusers names, e.g.
    `quantize.qdq_export.calibrate_transformer`'s `input_amax`): the parts of a fused BFL Linear share its input."""
    from fluxexport.models.single_file import diffusers_to_bfl

    state = _diffusers_state(source)
    filled = {key: torch.full((value.shape[0],), amax.get(key.removesuffix(".weight"), 0.0)) if value.dim() == 2
              else value for key, value in state.items()}  # fmt: skip
    return {key.removesuffix(".weight"): value.max().item() for key, value in diffusers_to_bfl(filled).items()
            if _quantized(key, value[:, None] if value.dim() == 1 else value)}  # fmt: skip


def _diffusers_state(source) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(source.root / "transformer" / "diffusion_pytorch_model.safetensors"))


def write_quantized_single_file(
    source, path: Path, layout: str = "fp8r", input_amax: dict[str, float] | None = None
) -> Path:
    """`source`'s transformer (a tiny folder's) as a BFL single file in `layout` (`QUANTIZED_LAYOUTS`), its keys
    unprefixed as black-forest-labs publishes them (diffusers' FLUX.2 converter reads no other). The layouts with
    activation scales (fp8, nvfp4) take them from `input_amax`, a calibration's amax per Linear (diffusers names)."""
    from safetensors.torch import save_file

    from fluxexport.models.single_file import diffusers_to_bfl

    if layout not in WRITERS:
        raise FluxExportError(f"unknown quantized layout {layout!r}: choose one of {', '.join(QUANTIZED_LAYOUTS)}")
    state = diffusers_to_bfl(_diffusers_state(source))
    if layout in ("fp8", "nvfp4") and input_amax is None:
        raise FluxExportError(f"the {layout} layout has activation scales: pass a calibration's input amax")
    amax = bfl_input_amax(source, input_amax) if input_amax is not None else {}
    written: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _quantized(key, value):
            base = key.removesuffix("weight")
            written |= WRITERS[layout](base, value, amax.get(base.removesuffix("."), 1.0))
        else:
            written[key] = value
    if layout == "scaled_fp8":
        written["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temporary:
        save_file({key: value.contiguous() for key, value in written.items()}, str(temporary))
    return path
