"""FP8 E4M3 fake quantization as one custom op: its eager body is the PyTorch reference, its ONNX
translation standard QuantizeLinear → DequantizeLinear (opset ≥ 19, FLOAT8E4M3FN zero point)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import onnx
import torch
from onnxscript import opset20 as op
from torch import nn
from torch.nn import functional

from fluxexport.dtypes import E4M3_MAX, quantize_e4m3
from fluxexport.errors import FluxExportError


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


# FP8 attention: the two batched matmuls of scaled dot-product attention on FP8 operands, placed as TensorRT's fused
# FP8 MHA takes them and as NVIDIA ModelOpt quantizes FLUX's attention (`--quantize-mha`): per-tensor Q/DQ on the
# scaled query, on the transposed key and on the value, with calibrated scales, and on the softmax output with the
# fixed scale 1/448 (its values lie in [0, 1]). Every DequantizeLinear feeds its MatMul directly: the attention
# scale multiplies the query before its QuantizeLinear (TensorRT wants Q or K scaled before the first BMM), the key
# is transposed before its QuantizeLinear.
SOFTMAX_AMAX = 1.0
ATTENTION_TENSORS = ("q", "k", "v")  # calibrated; the softmax output's scale is fixed


@torch.library.custom_op("fluxexport::fp8_attention", mutates_args=())
def fp8_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_step: torch.Tensor, k_step: torch.Tensor,
    v_step: torch.Tensor, scale: float,
) -> torch.Tensor:  # fmt: skip
    """softmax(Q/DQ(query·scale) · Q/DQ(keyᵀ)) as Q/DQ(·, 1/448) · Q/DQ(value), on (B, H, S, D) tensors; `q_step`
    is the step of the scaled query (its amax·scale / 448)."""
    softmax_step = torch.tensor(SOFTMAX_AMAX / E4M3_MAX, dtype=torch.float32)
    scores = fp8_qdq(query * scale, q_step) @ fp8_qdq(key.transpose(-1, -2), k_step)
    return fp8_qdq(scores.softmax(-1), softmax_step) @ fp8_qdq(value, v_step)


@fp8_attention.register_fake
def _(query, key, value, q_step, k_step, v_step, scale):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def fp8_attention_onnx(query, key, value, q_step, k_step, v_step, scale: float):
    scaled = op.Mul(query, op.CastLike(op.Constant(value_float=scale), query))
    transposed = op.Transpose(key, perm=[0, 1, 3, 2])
    scores = op.MatMul(fp8_qdq_onnx(scaled, q_step), fp8_qdq_onnx(transposed, k_step))
    probabilities = op.Softmax(scores, axis=-1)
    softmax_step = op.Constant(value_float=SOFTMAX_AMAX / E4M3_MAX)
    return op.MatMul(fp8_qdq_onnx(probabilities, softmax_step), fp8_qdq_onnx(value, v_step))


TRANSLATIONS[torch.ops.fluxexport.fp8_attention.default] = fp8_attention_onnx


def is_attention(module: nn.Module) -> bool:
    """A diffusers attention module (FLUX.1's FluxAttention, FLUX.2's Flux2Attention and parallel self-attention):
    its processor calls scaled dot-product attention once per forward, or once per token group."""
    from diffusers.models.attention import AttentionModuleMixin

    return isinstance(module, AttentionModuleMixin)


@contextmanager
def sdpa_replaced(replacement: Callable) -> Iterator[None]:
    """torch.nn.functional.scaled_dot_product_attention is `replacement` inside the `with` (diffusers' native
    attention backend looks it up at each call); restored on the way out, also on an error."""
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = partial(replacement, original)
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def _plain_sdpa(name: str, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **rest):
    """The arguments FP8 attention takes: no mask, no dropout, not causal (FLUX's attention passes none)."""
    if attn_mask is not None or dropout_p or is_causal or rest.get("enable_gqa"):
        raise FluxExportError(f"{name}: FP8 attention takes plain attention (no mask, dropout, causality or GQA)")
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale


def wrap_attention(module: nn.Module, replacement: Callable) -> Callable[[], None]:
    """Run `module`'s forward with scaled dot-product attention replaced by `replacement(original, q, k, v, …)`;
    returns what undoes it."""
    forward = module.forward

    def forward_with(*args, **kwargs):
        with sdpa_replaced(replacement):
            return forward(*args, **kwargs)

    module.forward = forward_with
    return lambda: module.__dict__.pop("forward", None)


def observe_attention(module: nn.Module, name: str, amax: dict[str, float]) -> Callable[[], None]:
    """Record amax of the query, key and value `module` attends with (`amax["<name>.q"]`, …) at every call;
    returns what stops it."""

    def observed(original, query, key, value, *args, **kwargs):
        for tensor, values in zip(ATTENTION_TENSORS, (query, key, value), strict=True):
            low, high = torch.aminmax(values.detach())
            amax[f"{name}.{tensor}"] = max(amax.get(f"{name}.{tensor}", 0.0), -low.float().item(), high.float().item())
        return original(query, key, value, *args, **kwargs)

    return wrap_attention(module, observed)


def quantize_attention(module: nn.Module, name: str, amax: dict[str, float]) -> None:
    """`module`'s attention in FP8 (`fp8_attention`) with the calibrated amax of its query, key and value; the
    steps are buffers of the module (`….attn.fp8_q_step`, …), exported as the Q/DQ scales' initializers."""
    scale = 1.0 / math.sqrt(module.head_dim)
    steps = {"q": amax[f"{name}.q"] * scale, "k": amax[f"{name}.k"], "v": amax[f"{name}.v"]}
    for tensor, value in steps.items():
        module.register_buffer(f"fp8_{tensor}_step", torch.tensor(max(value, 1e-12) / E4M3_MAX))

    def quantized(_original, query, key, value, *args, **kwargs):
        scale = _plain_sdpa(name, query, key, value, *args, **kwargs)
        if not math.isclose(scale, 1.0 / math.sqrt(module.head_dim)):
            raise FluxExportError(f"{name}: FP8 attention calibrated for the scale 1/sqrt(head_dim), not {scale}")
        return fp8_attention(query, key, value, module.fp8_q_step, module.fp8_k_step, module.fp8_v_step, scale)

    wrap_attention(module, quantized)
