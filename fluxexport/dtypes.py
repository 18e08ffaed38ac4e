"""Precisions and element types: every name and its torch / numpy / ONNX / Triton / TensorRT equivalent, once.

Two vocabularies meet here. A *precision* is what a user asks for (`--dtype fp32|bf16|fp16`, `--precision
bf16|fp8|fp16|nvfp4`). An *element type* is ONNX's name of a tensor's type, lower case, as manifests write them
(`float`, `bfloat16`, `float16`, `int32`, …). A spec tensor's dtype is `compute` (the component's precision),
`float32` or `int32`; `element_type` turns it into an element type.

Only torch and numpy are imported: the Triton python backend imports this module in its own environment.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from fluxexport.errors import FluxExportError

PRECISIONS = ("fp32", "bf16", "fp16")  # what a component computes in (export, the torch backend)
ENGINE_PRECISIONS = ("bf16", "fp8", "fp16", "fp32", "nvfp4")  # `build --precision` (fp32: a reference set)
QUANTIZED_PRECISIONS = ("fp8", "nvfp4")  # what `quantize --precision` makes of the transformer
COMPUTE = "compute"  # spec dtype: the component's compute precision, whichever it is

TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_ELEMENT = {"fp32": "float", "bf16": "bfloat16", "fp16": "float16"}

# element type → torch / numpy (ONNX Runtime's host arrays; bf16 graphs run upcast, so float32) / Triton
ELEMENT_TORCH = {
    "float": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int32": torch.int32, "int64": torch.int64, "bool": torch.bool, "uint8": torch.uint8,
    "float8e4m3fn": torch.float8_e4m3fn,
}  # fmt: skip
ELEMENT_NUMPY = {"float": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}
ELEMENT_TRITON = {
    "float": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int32": "TYPE_INT32",
    "int64": "TYPE_INT64", "uint8": "TYPE_UINT8", "string": "TYPE_STRING",
}  # fmt: skip
E4M3_MAX = 448.0  # the largest FLOAT8E4M3FN value
E2M1_MAX = 6.0  # the largest FLOAT4E2M1 value
NVFP4_BLOCK = 16  # NVFP4: 16 FLOAT4E2M1 values share one FLOAT8E4M3FN scale
# FLOAT4E2M1 magnitudes (code 0…7) and the midpoints between them; a tie goes to the even code (as IEEE rounding)
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# TensorRT DataType member names → element types (looked up by name: TensorRT may not be installed)
TENSORRT_ELEMENT = {
    "FLOAT": "float", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64", "BOOL": "bool",
    "UINT8": "uint8", "FP8": "float8e4m3fn", "FP4": "float4e2m1",
}  # fmt: skip


def torch_dtype(precision: str) -> torch.dtype:
    """`fp32` → torch.float32, …; an unknown name gets a one-line refusal listing the choices."""
    if precision not in TORCH:
        raise FluxExportError(f"unknown dtype {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return TORCH[precision]


def element_type(spec_dtype: str, precision: str) -> str:
    """The element type of a spec tensor (`compute`, `float32`, `int32`) in a component computing in `precision`."""
    if spec_dtype == COMPUTE:
        return PRECISION_ELEMENT[precision]
    return "float" if spec_dtype == "float32" else spec_dtype


def host_element(element: str) -> str:
    """What a caller feeds for an input of this element type: reduced floats are fed as float32."""
    return "float" if element in ("bfloat16", "float16") else element


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale (in x's dtype) as FLOAT8E4M3FN, saturating at ±448: what QuantizeLinear (saturate=1) computes."""
    return (x / scale.to(x.dtype)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest FLOAT4E2M1 value (ties to the even code), saturating at ±6, in float32: what a
    cast to FLOAT4E2M1 computes (ONNX's Cast and TensorRT's FP4 quantization round to nearest even)."""
    magnitude = x.float().abs().clamp(max=E2M1_MAX)
    code = torch.zeros_like(magnitude, dtype=torch.int64)
    for index, (low, high) in enumerate(itertools.pairwise(E2M1_GRID)):
        middle = (low + high) / 2
        above = magnitude > middle if index % 2 == 0 else magnitude >= middle  # ties toward the even code
        code += above.long()
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=x.device)
    return grid[code] * torch.where(x.float() < 0, -1.0, 1.0)


def component_precision(component: str, requested: str) -> tuple[str, str | None]:
    """The precision policy, for export and engines alike: (precision of `component`, why it differs or None).

    fp16 keeps T5 in bf16 (it overflows fp16) and the VAE in fp32 (never fp16: NVIDIA's notes); fp8 quantizes
    only the transformer, everything else is bf16."""
    if requested not in PRECISIONS + ENGINE_PRECISIONS:
        raise FluxExportError(f"unknown precision {requested!r}: choose one of {', '.join(ENGINE_PRECISIONS)}")
    if requested == "fp16" and component in ("vae_decoder", "vae_encoder"):
        return "fp32", "the VAE is never exported in fp16 (its activations overflow fp16); kept fp32"
    if requested == "fp16" and component == "t5":
        return "bf16", "T5 overflows in fp16 (inf, then zeros); kept bf16"
    if requested in QUANTIZED_PRECISIONS and component != "transformer":
        return "bf16", None  # only the transformer's block Linears are FP8 (or NVFP4)
    return requested, None
