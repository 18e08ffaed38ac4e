"""Published quantized transformer checkpoints: which layout a file's keys are, where each weight's scales
live, and the weight they dequantize to.

Every scale here multiplies: weight = q · weight_scale; an activation x is quantized as x / input_scale (the
E4M3 value nearest, saturated at ±448) and dequantized as q · input_scale. Layouts, as their loaders read them:

- `fp8r`, black-forest-labs' FP8 (FLUX.2 [klein] 4B/9B FP8 single files): each quantized Linear's `weight` is
  float8_e4m3fn `[N, K]` beside `weight_scale`, float32 per output row `[N]`; no activation scale. diffusers reads
  it with `BFLQuantizationConfig` through `from_single_file` (diffusers/quantizers/bfl/: `BFLQuantizer`
  pops `<layer>.weight_scale`, calls it fp8r when there is no `weight_scale_2`, and `dequantize_fp8r` computes
  `weight.float() * weight_scale[:, None]`; without FP8 kernels it runs the dequantized weight in its compute
  dtype, with them it quantizes activations per row at run time). The fused BFL projections (`qkv`, `linear1`)
  carry one scale per row, so their parts take the rows of the scale that their weight takes.
- `fp8`, per-tensor FP8: ComfyUI's `float8_e4m3fn` layer format (comfy/quant_ops.py `TensorCoreFP8Layout`,
  QUANTIZATION.md): `weight` float8_e4m3fn, `weight_scale` a float32 scalar, optionally `input_scale` a float32
  scalar for the activations (`torch._scaled_mm` with both); each layer marked by `<layer>.comfy_quant` (the
  uint8 bytes of `{"format": "float8_e4m3fn"}`) or by the header's `_quantization_metadata`. NVIDIA ModelOpt's
  FP8 export names its scales alike (`weight_scale`, `input_scale`, scalars). E4M3 weights without any scale (a
  plain cast) are this layout with scale 1.

- `nvfp4`, the ModelOpt NVFP4 layout (FLUX.2 [dev] NVFP4; diffusers' `BFLQuantizationConfig` reads it too): each
  quantized Linear's `weight` is uint8 `[N, K/2]`, two E2M1 codes a byte, the even element in the low nibble,
  `weight_scale` float8_e4m3fn `[N, K/16]` (one per 16 inputs), `weight_scale_2` and `input_scale` float32
  scalars: w = e2m1 · weight_scale · weight_scale_2 (diffusers' `dequantize_nvfp4`); activations quantized
  dynamically in blocks of 16 under the per-tensor `input_scale` (diffusers' FlashInfer path on Blackwell).

Refused, each in one line naming it: ComfyUI's legacy `scaled_fp8` (`scale_weight` keys), `comfy_quant` formats
other than float8_e4m3fn, float8_e5m2 weights, block-scaled FP8 (`weight_scale_inv`) and bitsandbytes (`absmax`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxexport.errors import FluxExportError

FP8_ROWS = "fp8r"
FP8_TENSOR = "fp8"
NVFP4 = "nvfp4"
NVFP4_BLOCK = 16
# E2M1 values by their 4-bit code: bit 3 the sign, bits 2-0 the magnitude (ONNX's FLOAT4E2M1, ml_dtypes' float4_e2m1fn)
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
LAYOUT_TITLES = {
    FP8_ROWS: "black-forest-labs' fp8r (E4M3 weights, float32 weight_scale per row)",
    FP8_TENSOR: "per-tensor FP8 (E4M3 weights, float32 weight_scale and input_scale)",
    NVFP4: "NVFP4 (packed E2M1 weights, E4M3 block scales, float32 weight_scale_2 and input_scale)",
}
# keys that are no model parameter: a layer's scales and markers, a file's format marker
SCALE_SUFFIXES = (".weight_scale", ".input_scale", ".weight_scale_2", ".comfy_quant", ".scale_weight", ".scale_input",
                  ".weight_scale_inv")  # fmt: skip
MARKER_KEYS = ("scaled_fp8",)
E4M3 = "F8_E4M3"
# refused layouts: what a key ends with → the format's name and what to do instead
REFUSED = {
    ".scale_weight": "ComfyUI's legacy scaled_fp8 (scale_weight keys)",
    ".weight_scale_inv": "block-scaled FP8 (weight_scale_inv)",
    ".absmax": "bitsandbytes (absmax)",
}


QUANTIZED_DTYPES = ("F8_E4M3", "U8")  # what a quantized weight is stored as (E4M3; NVFP4's packed E2M1)
TORCH_NAMES = {torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8"}


def quantization_keys(dtypes: dict[str, str]) -> set[str]:
    """The keys (of a file whose tensors have safetensors `dtypes`) that are a quantized weight's scales or markers,
    or a file's format marker: no parameter of the model. A scale beside a weight that is not quantized is none of
    them (the layout then refuses it as a key the model does not have)."""

    def of_quantized_weight(key: str) -> bool:
        return key.endswith(SCALE_SUFFIXES) and dtypes.get(key.rsplit(".", 1)[0] + ".weight") in QUANTIZED_DTYPES

    return {key for key in dtypes if key.rsplit(".", 1)[-1] in MARKER_KEYS or of_quantized_weight(key)}


@dataclass(frozen=True)
class QuantScale:
    """Where one quantized weight's scales are: `weight_scale` (None: a plain E4M3 cast, scale 1), per row or
    per tensor, and the activation scale `input_scale` if the layout has one."""

    weight_scale: str | None
    per_row: bool
    input_scale: str | None = None
    global_scale: str | None = None  # NVFP4: `weight_scale_2` over the E4M3 block scales `weight_scale`


@dataclass(frozen=True)
class FileHeader:
    """A safetensors file's tensors (key → (dtype, shape)) and its metadata, read from the header alone."""

    path: Path
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]


def read_header(path: Path) -> FileHeader:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {}
            for key in handle.keys():  # noqa: SIM118 - a safe_open handle is no dict
                tensor = handle.get_slice(key)
                tensors[key] = (tensor.get_dtype(), tuple(tensor.get_shape()))
            return FileHeader(Path(path), tensors, dict(handle.metadata() or {}))
    except (SafetensorError, OSError) as error:
        raise FluxExportError(f"cannot read {path}: {error} (it must be a .safetensors file)") from None


def _comfy_formats(header: FileHeader) -> set[str]:
    """The `format`s ComfyUI's layer markers name (`<layer>.comfy_quant` tensors are not read here: the header's
    `_quantization_metadata` names them; a marker tensor's bytes are read by `comfy_format`)."""
    formats: set[str] = set()
    metadata = header.metadata.get("_quantization_metadata")
    if metadata:
        try:
            layers = json.loads(metadata).get("layers", {})
        except (json.JSONDecodeError, AttributeError):
            raise FluxExportError(f"{header.path.name}: its _quantization_metadata is not JSON") from None
        formats |= {str(layer.get("format")) for layer in layers.values()}
    return formats


def comfy_format(path: Path, key: str) -> str:
    """The `format` a `<layer>.comfy_quant` marker (uint8 bytes of a JSON object) names."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = bytes(handle.get_tensor(key).to(torch.uint8).tolist())
    try:
        return str(json.loads(raw).get("format"))
    except (json.JSONDecodeError, AttributeError):
        raise FluxExportError(f"{path.name}: {key} is not a ComfyUI quantization marker (JSON bytes)") from None


def layout_of(header: FileHeader) -> str | None:
    """The quantized layout of a transformer file (`FP8_ROWS`, `FP8_TENSOR`, `NVFP4`), None for an unquantized one; a
    layout fluxexport cannot read is refused in one line naming it."""
    name, tensors = header.path.name, header.tensors
    for suffix, title in REFUSED.items():
        if any(key.endswith(suffix) for key in tensors) or (suffix == ".scale_weight" and "scaled_fp8" in tensors):
            raise FluxExportError(f"{name} is {title}, which fluxexport cannot read: {fix_for(title)}")
    formats = _comfy_formats(header) | {
        comfy_format(header.path, key) for key in tensors if key.endswith(".comfy_quant")
    }
    other = sorted(formats - {"float8_e4m3fn"})
    if other:
        raise FluxExportError(
            f"{name} is ComfyUI's {other[0]} layout, which fluxexport cannot read: pass a float8_e4m3fn or bf16 "
            "checkpoint"
        )
    if any(dtype == "F8_E5M2" for dtype, _ in tensors.values()):
        raise FluxExportError(
            f"{name} holds float8_e5m2 weights, which fluxexport cannot read: pass an E4M3 (float8_e4m3fn) or bf16 "
            "checkpoint"
        )
    extra = quantization_keys({key: dtype for key, (dtype, _) in tensors.items()})
    if any(key.endswith(".weight_scale_2") for key in extra):
        return NVFP4
    scales = {key: shape for key, (_, shape) in tensors.items() if key.endswith(".weight_scale") and key in extra}
    if any(len(shape) == 1 and shape[0] > 1 for shape in scales.values()):
        return FP8_ROWS
    if scales or any(dtype == E4M3 for dtype, _ in tensors.values()):
        return FP8_TENSOR
    return None


def fix_for(title: str) -> str:
    """What to pass instead of a refused layout."""
    return "pass its FP8 (float8_e4m3fn, weight_scale), NVFP4 or bf16 release"


def quant_scale(header: FileHeader, weight_key: str) -> QuantScale | None:
    """The scales of the weight `weight_key` (a `….weight` key of the file), None for a weight kept in high
    precision."""
    if not weight_key.endswith(".weight"):
        return None
    base = weight_key.removesuffix("weight")
    scale, dtype = base + "weight_scale", header.tensors[weight_key][0]
    if dtype == "U8" and base + "weight_scale_2" in header.tensors:
        return _nvfp4_scale(header, base)
    if scale not in header.tensors and dtype != E4M3:
        return None
    if dtype != E4M3:
        raise FluxExportError(
            f"{header.path.name}: {weight_key} is {dtype} beside a weight_scale, not float8_e4m3fn: it is no FP8 "
            "layout fluxexport reads"
        )
    input_scale = base + "input_scale"
    if scale not in header.tensors:
        return QuantScale(None, False, input_scale if input_scale in header.tensors else None)
    shape = header.tensors[scale][1]
    per_row = len(shape) == 1 and shape[0] > 1
    return QuantScale(scale, per_row, input_scale if input_scale in header.tensors else None)


def _nvfp4_scale(header: FileHeader, base: str) -> QuantScale:
    """An NVFP4 weight's scales; the activation scale is part of the layout (diffusers refuses a file without)."""
    if base + "input_scale" not in header.tensors:
        raise FluxExportError(
            f"{header.path.name}: {base}weight has weight_scale_2 but no input_scale, which the NVFP4 layout "
            "requires: the file is incomplete"
        )
    return QuantScale(base + "weight_scale", True, base + "input_scale", base + "weight_scale_2")


def _rows(handle, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
    tensor = handle.get_slice(key)
    return tensor[rows[0] : rows[1]] if rows is not None else tensor[:]


def e2m1_values(packed: torch.Tensor) -> torch.Tensor:
    """Packed E2M1 codes `[N, K/2]` (uint8, the even element in the low nibble) as float32 values `[N, K]`."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    return E2M1_VALUES[codes.long()]


def nvfp4_dequantize(packed: torch.Tensor, blocks: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """w = e2m1 · block scale · weight_scale_2 (float32), each E4M3 block scale over 16 consecutive inputs."""
    step = (blocks.float() * global_scale.float().reshape(())).repeat_interleave(NVFP4_BLOCK, dim=1)
    return e2m1_values(packed) * step


def dequantize(handle, scale: QuantScale, weight: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    """The float32 weight an E4M3 `weight` (the `rows` of its file tensor, or all of it) stands for: q · scale,
    with the scale's rows cut as the weight's were (diffusers' `dequantize_fp8r`, ComfyUI's dequantize); an NVFP4
    weight by its block and global scales (diffusers' `dequantize_nvfp4`)."""
    if scale.global_scale is not None:
        return nvfp4_dequantize(weight, _rows(handle, scale.weight_scale, rows), handle.get_tensor(scale.global_scale))
    values = weight.float()
    if scale.weight_scale is None:
        return values
    if scale.per_row:
        step = handle.get_slice(scale.weight_scale)
        step = step[rows[0] : rows[1]] if rows is not None else step[:]
        return values * step.float()[:, None]
    return values * handle.get_tensor(scale.weight_scale).float().reshape(())


def read_scales(handle, scale: QuantScale, rows: tuple[int, int] | None) -> tuple[torch.Tensor, float | None]:
    """(weight scale: float32 `[rows]` per row or a 0-d scalar, input scale or None) of one quantized weight; an
    NVFP4 weight's is its global scale (`weight_scale_2`)."""
    if scale.global_scale is not None:
        weight_scale = handle.get_tensor(scale.global_scale).float().reshape(())
    elif scale.weight_scale is None:
        weight_scale = torch.tensor(1.0)
    elif scale.per_row:
        step = handle.get_slice(scale.weight_scale)
        weight_scale = (step[rows[0] : rows[1]] if rows is not None else step[:]).float()
    else:
        weight_scale = handle.get_tensor(scale.weight_scale).float().reshape(())
    if scale.input_scale is None:
        return weight_scale, None
    return weight_scale, float(handle.get_tensor(scale.input_scale).float().reshape(()))


def dequantized_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loaded state dict with every E4M3 weight dequantized to float32 by its scales and the scales and markers
    dropped (unquantized tensors pass through): what a PyTorch run of the checkpoint computes with."""
    plain, extra = {}, quantization_keys({key: TORCH_NAMES.get(value.dtype, "") for key, value in state.items()})
    for key, value in state.items():
        if key in extra:
            continue
        base = key.removesuffix("weight")
        if key.endswith(".weight") and value.dtype == torch.uint8 and base + "weight_scale_2" in state:
            value = nvfp4_dequantize(value, state[base + "weight_scale"], state[base + "weight_scale_2"])
        elif key.endswith(".weight") and value.dtype == torch.float8_e4m3fn:
            scale = state.get(key.removesuffix("weight") + "weight_scale")
            value = value.float() if scale is None else value.float() * _broadcast(scale.float(), value)
        plain[key] = value
    return plain


def _broadcast(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A per-row scale `[N]` as `[N, 1]` against an `[N, K]` weight; a per-tensor one as a 0-d scalar."""
    return scale[:, None] if scale.dim() == 1 and scale.numel() > 1 else scale.reshape(())


def refuse_quantized_folder(folder: Path) -> None:
    """Refuse a diffusers transformer folder whose weights are quantized: diffusers reads the published layouts
    from single files only (`BFLQuantizationConfig` through `from_single_file`), and its folder loader would
    take the E4M3 values without their scales."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        header = read_header(path)
        if any(dtype.startswith("F8_") or key.endswith(SCALE_SUFFIXES) for key, (dtype, _) in header.tensors.items()):
            raise FluxExportError(
                f"{folder} holds quantized weights ({path.name}): fluxexport reads published FP8 transformers as "
                "single files: pass the .safetensors file as --model with --base-model for the rest"
            )
