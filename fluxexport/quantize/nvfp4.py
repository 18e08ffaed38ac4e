"""NVFP4 (Blackwell) fake quantization of the block Linears: the PyTorch emulation and the ONNX pattern TensorRT
parses, which is the one NVIDIA's Model Optimizer exports.

NVFP4 stores 16-element blocks (along a GEMM's reduction axis) of FLOAT4E2M1 values, each block with a
FLOAT8E4M3FN scale, the block scales themselves scaled by one float32 per-tensor scale ("double quantization"):

    global = amax / (6 · 448)                       per tensor (weights: their amax; activations: calibrated)
    block  = castToFp8(min(blockAmax / 6 / global, 448))  per 16 values
    x_q    = castToFp4(clip(x / (block · global), ±6))      round to nearest even

The graph (sources: ModelOpt `modelopt/torch/quantization/export_onnx.py` `export_fp4` and
`modelopt/onnx/export/nvfp4_exporter.py`; TensorRT's operator docs `DynamicQuantize` and "Quantization Schemes"):

- weights, pre-quantized: a FLOAT4E2M1 initializer [out, in] and a FLOAT8E4M3FN initializer [out, in/16] of block
  scales; `DequantizeLinear(block_fp8, global_fp32)` → block scales, `DequantizeLinear(w_fp4, block, axis=-1,
  block_size=16)` → the weight (two DequantizeLinear, no Q: TensorRT's quantized-weights rule).
- activations, dynamic (TensorRT computes the block scales at run time, on the GPU): the TensorRT operator
  `trt::TRT_FP4DynamicQuantize(x, global; axis=-1, block_size=16, scale_type=FLOAT8E4M3FN)` → (x_fp4, block_fp8),
  then the same two DequantizeLinear. The ONNX parser maps it to `IDynamicQuantizeLayer` (TensorRT ≥ 10.8); its
  input is 2-D or 3-D with the blocked axis last, as every Linear input of the transformer is. The per-tensor
  scale is a build-time constant: calibrated on the same trajectories as FP8 (input amax / (6 · 448)).
- DequantizeLinear outputs float32 (the scale's type), cast to the graph's compute dtype before the GEMM, as
  ModelOpt casts them. FLOAT4E2M1 DequantizeLinear is opset 23: the graph's default domain is raised to 23 (the
  ops between 20 and 23 only gained types) and it imports the `trt` domain.

ONNX Runtime has no FLOAT4E2M1 kernels: `onnx.reference.ReferenceEvaluator` runs these graphs on CPU, with
`TRT_FP4DynamicQuantize` given as `REFERENCE_OPS` (TensorRT's documented arithmetic, the same function as the
PyTorch emulation below).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnxscript import values
from torch import nn

from fluxexport.dtypes import E2M1_MAX, E4M3_MAX, NVFP4_BLOCK, round_e2m1
from fluxexport.errors import FluxExportError

NVFP4_DOMAIN = "fluxexport.nvfp4"  # the traced placeholder's domain: the graph pass replaces every node of it
TRT_DOMAIN = "trt"  # TensorRT's own operators (ModelOpt exports them under this domain)
DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"
MIN_NVFP4_OPSET = 23  # DequantizeLinear on FLOAT4E2M1
NVFP4_MAX = E2M1_MAX * E4M3_MAX  # what one global scale step spans: amax / (6 · 448)


def global_scale(amax: float) -> float:
    """The per-tensor (second-level) scale of a tensor whose absolute maximum is `amax`."""
    return max(float(amax), 1e-12) / NVFP4_MAX


def block_scales(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The FLOAT8E4M3FN scale of each 16-element block along x's last axis, [..., K/16]: blockAmax / 6 / global,
    saturated at 448 (a value above the calibrated amax saturates, as TensorRT's FP8 cast does)."""
    blocks = x.float().unflatten(-1, (-1, NVFP4_BLOCK))
    amax = blocks.abs().amax(-1)
    return (amax / E2M1_MAX / scale.float()).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_blocks(x: torch.Tensor, block: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x's FLOAT4E2M1 values (as float32 on the E2M1 grid) under `block` (FP8) × `scale` (the global scale). A
    block whose scale is 0 gets code 0 (DequantizeLinear gives 0 whatever the code)."""
    step = (block.float() * scale.float()).unsqueeze(-1)
    blocks = x.float().unflatten(-1, (-1, NVFP4_BLOCK))
    return round_e2m1(blocks / torch.where(step == 0, 1.0, step)).flatten(-2)


def dequantize_blocks(values: torch.Tensor, block: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The two DequantizeLinear: FP8 block scales × global, then FP4 values × their block's scale (float32)."""
    step = (block.float() * scale.float()).repeat_interleave(NVFP4_BLOCK, dim=-1)
    return values.float() * step


def nvfp4_emulate(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x through NVFP4 quantization and dequantization with global scale `scale` (the graph's arithmetic, in
    float32), returned in x's dtype (the graph's Cast to its compute dtype)."""
    block = block_scales(x, scale)
    return dequantize_blocks(quantize_blocks(x, block, scale), block, scale).to(x.dtype)


@torch.library.custom_op("fluxexport::nvfp4_qdq", mutates_args=())
def nvfp4_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake quantization along x's last axis (blocks of 16) with per-tensor scale `scale`."""
    return nvfp4_emulate(x, scale)


@nvfp4_qdq.register_fake
def _(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _placeholder_schema() -> onnx.defs.OpSchema:
    parameter = onnx.defs.OpSchema.FormalParameter
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return onnx.defs.OpSchema(
        "QDQ", NVFP4_DOMAIN, 1, inputs=[parameter("x", "T"), parameter("scale", "tensor(float)")],
        outputs=[parameter("y", "T")], type_constraints=[("T", floats, "")],
    )  # fmt: skip


_PLACEHOLDER = values.Op(values.Opset(NVFP4_DOMAIN, 1), "QDQ", _placeholder_schema())


def nvfp4_qdq_onnx(x, scale):
    """Traced as one placeholder node; `nvfp4_graph_pass` writes the TensorRT pattern in its place."""
    return _PLACEHOLDER(x, scale)


TRANSLATIONS = {torch.ops.fluxexport.nvfp4_qdq.default: nvfp4_qdq_onnx}


class NVFP4Linear(nn.Linear):
    """A Linear whose weight and input pass through NVFP4 (blocks of 16 along `in_features`): the weight with its
    own amax, the input dynamically per block under a calibrated per-tensor scale (`input_amax / (6 · 448)`).

    It shares the Linear's parameters under the same names, so the exported initializers keep their names;
    `weight_amax` defaults to the weight's own (the streaming export traces on fake weights and passes it)."""

    def __init__(self, linear: nn.Linear, input_amax: float, weight_amax: float | None = None):
        nn.Module.__init__(self)
        if linear.in_features % NVFP4_BLOCK:
            raise FluxExportError(
                f"NVFP4 needs Linear inputs in blocks of {NVFP4_BLOCK}, a layer has {linear.in_features}: "
                "quantize with --precision fp8"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        if weight_amax is None:
            weight_amax = linear.weight.detach().abs().max().float().item()
        self.register_buffer("input_scale", torch.tensor(global_scale(input_amax), dtype=torch.float32))
        self.register_buffer("weight_scale", torch.tensor(global_scale(weight_amax), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = nvfp4_qdq(self.weight, self.weight_scale)
        return nn.functional.linear(nvfp4_qdq(x, self.input_scale), weight, self.bias)


def reference_dynamic_quantize(x: np.ndarray, scale: np.ndarray, axis: int = -1, block_size: int = 16,
                               scale_type: int = onnx.TensorProto.FLOAT8E4M3FN) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """TensorRT's `TRT_FP4DynamicQuantize` for the reference evaluator: (FLOAT4E2M1 values, FLOAT8E4M3FN block
    scales) as ml_dtypes arrays, by the same arithmetic as `nvfp4_emulate`."""
    import ml_dtypes

    if axis not in (-1, x.ndim - 1) or block_size != NVFP4_BLOCK or scale_type != onnx.TensorProto.FLOAT8E4M3FN:
        raise NotImplementedError(f"{DYNAMIC_QUANTIZE}: only axis=-1, block_size=16, FP8 scales are emulated")
    data, step = torch.from_numpy(np.asarray(x, dtype=np.float32)), torch.tensor(np.float32(scale).reshape(()))
    block = block_scales(data, step)
    codes = quantize_blocks(data, block, step).numpy().astype(ml_dtypes.float4_e2m1fn)
    return codes, block.float().numpy().astype(ml_dtypes.float8_e4m3fn)


def reference_ops() -> list:
    """`ReferenceEvaluator(..., new_ops=reference_ops())`: the TensorRT operator the NVFP4 graphs use."""
    from onnx.reference.op_run import OpRun

    class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 — the operator's name
        op_domain = TRT_DOMAIN

        def _run(self, x, scale, axis=-1, block_size=16, scale_type=onnx.TensorProto.FLOAT8E4M3FN):
            return reference_dynamic_quantize(x, scale, axis, block_size, scale_type)

    return [TRT_FP4DynamicQuantize]
