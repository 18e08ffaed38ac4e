"""FP8 E4M3 fake quantization as one custom op: its eager body is the PyTorch reference, its ONNX
translation standard QuantizeLinear → DequantizeLinear (opset ≥ 19, FLOAT8E4M3FN zero point)."""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset20 as op
from torch import nn

from fluxexport.dtypes import E4M3_MAX, quantize_e4m3


@torch.library.custom_op("fluxexport::fp8_qdq", mutates_args=())
def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round x to the E4M3 grid of `scale` (saturating at ±448·scale) and back, as Q→DQ does."""
    return quantize_e4m3(x, scale).to(x.dtype) * scale.to(x.dtype)


@fp8_qdq.register_fake
def _(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def fp8_qdq_onnx(x, scale):
    zero_point = op.Cast(op.Constant(value_float=0.0), to=onnx.TensorProto.FLOAT8E4M3FN)
    step = op.CastLike(scale, x)
    return op.DequantizeLinear(op.QuantizeLinear(x, step, zero_point), step)


TRANSLATIONS = {torch.ops.fluxexport.fp8_qdq.default: fp8_qdq_onnx}


class FP8Linear(nn.Linear):
    """A Linear whose input and weight pass through per-tensor FP8 Q/DQ (scales = amax / 448).

    It shares the Linear's parameters, under the same names (`….to_q.weight`), so the checkpoint's tensors
    and the exported initializers keep their names. `weight_amax` defaults to the weight's own."""

    def __init__(self, linear: nn.Linear, input_amax: float, weight_amax: float | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        if weight_amax is None:
            weight_amax = linear.weight.detach().abs().max().float().item()
        self.register_buffer("input_scale", torch.tensor(max(input_amax, 1e-12) / E4M3_MAX, dtype=torch.float32))
        self.register_buffer("weight_scale", torch.tensor(max(weight_amax, 1e-12) / E4M3_MAX, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = fp8_qdq(self.weight, self.weight_scale)
        return nn.functional.linear(fp8_qdq(x, self.input_scale), weight, self.bias)
