"""Where FP8 quantizers sit: ours next to NVIDIA ModelOpt's FLUX recipe (its diffusers example's FP8 config and
filter), as data: {module: Placement}, and the fusion rules an FP8 Q/DQ graph must keep for TensorRT."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from torch import nn

from fluxexport.quantize.calibrate import quantizable_attention, quantizable_linears
from fluxexport.quantize.fp8 import is_attention

# ModelOpt's diffusers example for FLUX.1 and FLUX.2: per-tensor E4M3 on every Linear's input and weight, the
# attention's q/k/v bmm and softmax quantizers (its --quantize-mha), no output quantizers, max calibration (in
# modelopt 0.47's ordered-list form: later entries win) ...
_E4M3 = {"num_bits": (4, 3), "axis": None}
MODELOPT_FP8_CONFIG = {
    "quant_cfg": [
        {"quantizer_name": "*", "enable": False},
        *({"quantizer_name": name, "cfg": _E4M3} for name in ("*weight_quantizer", "*input_quantizer")),
        {"quantizer_name": "*output_quantizer", "enable": False},
        *({"quantizer_name": name, "cfg": _E4M3} for name in ("*[qkv]_bmm_quantizer", "*softmax_quantizer")),
    ],
    "algorithm": "max",
}
# ... and the modules its FLUX filter keeps in high precision (a module name matching it from its start)
MODELOPT_FLUX_KEPT = re.compile(
    r"proj_out|.*(time_text_embed|context_embedder|x_embedder|norm_out|time_guidance_embed|stream_modulation)"
)
MHA_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")


@dataclass(frozen=True)
class Placement:
    """What one module quantizes: its input, its weight (a Linear), or its attention's matmuls."""

    input: bool = False
    weight: bool = False
    attention: bool = False


def our_placement(transformer: nn.Module, attention: bool = False) -> dict[str, Placement]:
    """Our FP8 recipe: every Linear in the double and single blocks (input and weight), and with `attention`
    (`quantize --fp8-attention`) every block attention's q, k, v and softmax output."""
    placement = {name: Placement(input=True, weight=True) for name in quantizable_linears(transformer)}
    if attention:
        placement |= {name: Placement(attention=True) for name in quantizable_attention(transformer)}
    return dict(sorted(placement.items()))


def modelopt_quantize(transformer: nn.Module, forward_loop, attention: bool = False) -> nn.Module:
    """`transformer` quantized in place as ModelOpt's diffusers example does for FLUX (FP8 config, `forward_loop`
    calibrating, the FLUX filter's modules disabled, MHA quantizers disabled without `attention`)."""
    import modelopt.torch.quantization as mtq

    mtq.quantize(transformer, MODELOPT_FP8_CONFIG, forward_loop)
    mtq.disable_quantizer(transformer, lambda name: MODELOPT_FLUX_KEPT.match(name) is not None)
    if not attention:
        mtq.disable_quantizer(transformer, lambda name: name.rsplit(".", 1)[-1] in MHA_QUANTIZERS)
    return transformer


def _enabled(module: nn.Module, quantizer: str) -> bool:
    found = getattr(module, quantizer, None)
    return found is not None and bool(found.is_enabled)


def modelopt_placement(transformer: nn.Module) -> dict[str, Placement]:
    """The placement of a transformer `modelopt_quantize` made: each module with an enabled quantizer."""
    placement = {}
    for name, module in transformer.named_modules():
        found = Placement(
            input=_enabled(module, "input_quantizer"), weight=_enabled(module, "weight_quantizer"),
            attention=is_attention(module) and all(_enabled(module, q) for q in MHA_QUANTIZERS),
        )  # fmt: skip
        if found != Placement():
            placement[name] = found
    return dict(sorted(placement.items()))


def modelopt_amax(transformer: nn.Module) -> dict[str, float]:
    """ModelOpt's calibrated amax per quantizer, named as ours: `<linear>` for an input, `<attention>.q|k|v`."""
    amax = {}
    for name, module in transformer.named_modules():
        if _enabled(module, "input_quantizer"):
            amax[name] = float(module.input_quantizer.amax)
        for tensor in "qkv":
            if is_attention(module) and _enabled(module, f"{tensor}_bmm_quantizer"):
                amax[f"{name}.{tensor}"] = float(getattr(module, f"{tensor}_bmm_quantizer").amax)
    return amax


def placement_table(ours: dict[str, Placement], theirs: dict[str, Placement]) -> list[tuple[str, str, str]]:
    """(module, ours, ModelOpt's) for every module either quantizes, in words (`input+weight`, `q,k,v,softmax`, `-`)."""

    def words(found: Placement | None) -> str:
        if found is None:
            return "-"
        parts = [part for part, on in (("input", found.input), ("weight", found.weight)) if on]
        return "+".join(parts) + ("q,k,v,softmax" if found.attention else "")

    return [(name, words(ours.get(name)), words(theirs.get(name))) for name in sorted(set(ours) | set(theirs))]


GEMMS = ("MatMul", "Gemm")


def qdq_problems(model) -> list[str]:
    """Where an FP8 Q/DQ graph (an onnx ModelProto) breaks TensorRT's explicit-quantization fusion rules: every
    QuantizeLinear feeds DequantizeLinears only; every DequantizeLinear feeds GEMM inputs only (a weight's through
    the one Transpose the exporter puts between a Linear's weight and its MatMul); weights are FLOAT8E4M3FN
    initializers read by a DequantizeLinear (no QuantizeLinear on a constant); no QuantizeLinear on a GEMM's
    output (that would sit between the GEMM and its bias/activation epilogue)."""
    import onnx

    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    problems = []
    for node in graph.node:
        users = consumers[node.output[0]] if node.output else []
        if node.op_type == "QuantizeLinear":
            source = producer.get(node.input[0])
            if node.input[0] in initializers:
                problems.append(f"{node.name}: quantizes a constant at run time (store the weight in FP8)")
            elif source is not None and source.op_type in GEMMS:
                problems.append(f"{node.name}: quantizes the output of {source.op_type} {source.name}")
            if any(user.op_type != "DequantizeLinear" for user in users):
                problems.append(f"{node.name}: feeds {sorted({u.op_type for u in users})}, not DequantizeLinear")
        elif node.op_type == "DequantizeLinear":
            weight = initializers.get(node.input[0])
            if weight is not None and weight.data_type != onnx.TensorProto.FLOAT8E4M3FN:
                problems.append(f"{node.name}: dequantizes a {onnx.TensorProto.DataType.Name(weight.data_type)} weight")
            for user in users:
                transposed = weight is not None and user.op_type == "Transpose"
                for reader in consumers[user.output[0]] if transposed else [user]:
                    if reader.op_type not in GEMMS:
                        problems.append(f"{node.name}: feeds {reader.op_type} {reader.name}, not a GEMM input")
    return problems


def modelopt_calibrated(source, settings, attention: bool = False):
    """(placement, amax) of ModelOpt's FLUX recipe on `source`'s float32 transformer, calibrated on the very
    trajectories our calibration walks (`trajectories`: the runtime's Euler loop over `settings`' prompts)."""
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.quantize.calibrate import one_sample_at_a_time, trajectories

    with TorchBackend(source, "fp32", "cpu") as backend:
        transformer = backend.module("transformer")
        _, walk = trajectories(backend, source, settings)
        component = one_sample_at_a_time(backend.component("transformer"), backend.specs["transformer"])
        modelopt_quantize(transformer, lambda _model: walk(component, None), attention)
        return modelopt_placement(transformer), modelopt_amax(transformer)
