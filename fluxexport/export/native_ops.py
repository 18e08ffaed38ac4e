"""ONNX's own `Attention` and `RMSNormalization` (opset 23): which export gets them, and which TensorRT parses them.

torch's dynamo exporter writes `scaled_dot_product_attention` as ONNX `Attention` and `rms_norm` as
`RMSNormalization` from opset 23 on. `export --native-attention` keeps them (TensorRT ≥ 10.15 maps them to its
native attention and normalization layers); every other export at opset ≥ 23 gets the same decomposition as opsets
18–22 (MatMul/Softmax/MatMul through `portable_translations`, Pow/ReduceMean/Sqrt through
`decompose_rms_normalization`, onnxscript's opset-23 fusions held back by `opset23_fusions`), so that the default
stays what any TensorRT 10 parses. Which TensorRT parses which
native op is `tensorrt/environment.py`'s `NATIVE_OP_TENSORRT`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import onnx_ir as ir

from fluxexport.errors import FluxExportError, InternalError
from fluxexport.specs import ComponentSpec
from fluxexport.tensorrt.environment import NATIVE_OPS, tensorrt_for, version_text

NATIVE_OPSET = 23  # the opset that introduced Attention and RMSNormalization
FLAG_OPS = ("Attention", "RMSNormalization")  # what --native-attention keeps and every other export decomposes


def require_native_opset(opset: int) -> None:
    """`--native-attention` needs opset ≥ 23: refuse a lower one in one line."""
    if opset < NATIVE_OPSET:
        raise FluxExportError(
            f"--native-attention needs opset {NATIVE_OPSET} or newer (ONNX's Attention and RMSNormalization), "
            f"--opset is {opset}: drop --opset or pass --opset {NATIVE_OPSET}"
        )


@contextmanager
def opset23_fusions(native: bool) -> Iterator[None]:
    """While torch exports: onnxscript's optimizer fuses, at opset 23, RMS norms into RMSNormalization, rotary
    embeddings into RotaryEmbedding and grouped-query attention; keep only the RMSNormalization fusion for a native
    export and none for any other. (The RotaryEmbedding it fuses in FLUX.2's Qwen3 text encoder is refused by ONNX
    Runtime 1.32 at run time: "Inputs 'cos_cache' and 'sin_cache' are expected to have the same shape as input
    'x'", seen here.)"""
    from onnxscript.rewriter import onnx_fusions
    from onnxscript.rewriter.rules.fusion import _rms_normalization

    def fuse(model: ir.Model, *, debug: bool = False) -> dict[str, int]:
        if not native or model.opset_imports.get("", model.opset_imports.get("ai.onnx")) != NATIVE_OPSET:
            return {}
        return {"RMSNormalization": _rms_normalization.fuse_rms_normalization(model, debug=debug)}

    original = onnx_fusions.fuse
    onnx_fusions.fuse = fuse
    try:
        yield
    finally:
        onnx_fusions.fuse = original


def portable_translations(opset: int, native: bool) -> dict:
    """The custom translations an export at `opset` needs so that `native` alone decides whether Attention
    appears: opsets 18–22's decomposition of `scaled_dot_product_attention` (onnxscript's), none below opset 23
    (nothing native there) or when native ops are asked for. (torch writes `rms_norm` as RMSNormalization at opset
    23 whatever the table says: `decompose_rms_normalization` undoes it after the trace.)"""
    if native or opset < NATIVE_OPSET:
        return {}
    import torch
    from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

    return {
        torch.ops.aten.scaled_dot_product_attention.default: aten_scaled_dot_product_attention,
    }


def native_ops_in(model: ir.Model) -> dict[str, int]:
    """How many of each native op (`NATIVE_OPS`: those a newer TensorRT parses) the graph holds, only those it
    holds."""
    counts = Counter(
        node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.domain in ("", "ai.onnx") and node.op_type in NATIVE_OPS
    )  # fmt: skip
    return {name: counts[name] for name in NATIVE_OPS if counts[name]}


def native_note(counts: dict[str, int]) -> str | None:
    """The manifest note of a graph holding native ops (None when it holds none)."""
    if not counts:
        return None
    held = ", ".join(f"{name} ×{count}" for name, count in counts.items())
    return f"native ONNX ops {held}: TensorRT ≥ {version_text(tensorrt_for(counts) or ())} parses them"


def check_native(model: ir.Model, spec: ComponentSpec, compute: str) -> str | None:
    """Pass (`--native-attention`): no attention left decomposed (a Softmax beside native Attention means one
    `scaled_dot_product_attention` fell back); the note says which native ops the graph holds."""
    counts = native_ops_in(model)
    softmax = sum(node.op_type == "Softmax" for node in ir.traversal.RecursiveGraphIterator(model.graph))
    if counts.get("Attention") and softmax:
        raise FluxExportError(
            f"{spec.name}: {softmax} attention(s) stayed decomposed beside {counts['Attention']} native Attention "
            "ops: export without --native-attention"
        )
    return native_note(counts)


def _constant(graph_node: ir.Node, name: str, tensor: ir.TensorProtocol) -> ir.Node:
    return ir.Node("", "Constant", [], [ir.AttrTensor("value", tensor)], name=f"{graph_node.name}_{name}")


def decompose_rms_normalization(model: ir.Model) -> int:
    """Replace each RMSNormalization by the ops torch's decomposition of rms_norm gives at opsets 18–22 (in
    float32: x·1/√(mean(x²)+ε), times the scale, cast back): the count replaced."""
    graph, replaced = model.graph, 0
    for node in [n for n in graph if n.op_type == "RMSNormalization" and n.domain in ("", "ai.onnx")]:
        x, scale = node.inputs[0], node.inputs[1]
        if x is None or scale is None or x.shape is None or x.dtype is None:
            raise InternalError(f"RMSNormalization {node.name} has an input of unknown rank or type")
        rank = len(x.shape)
        axis = node.attributes.get_int("axis", -1) % rank
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        float32 = ir.DataType.FLOAT

        def new(op_type: str, inputs, attributes=(), suffix: str = "", dtype=float32, prefix=node.name) -> ir.Node:
            made = ir.Node("", op_type, inputs, list(attributes), name=f"{prefix}_{suffix or op_type.lower()}")
            made.outputs[0].dtype = dtype
            return made

        nodes = []
        upcast = x
        if x.dtype != float32:
            nodes.append(new("Cast", [x], [ir.AttrInt64("to", float32)], "upcast"))
            upcast = nodes[-1].outputs[0]
        two = _constant(node, "two", ir.tensor(2.0, dtype=float32))
        axes = _constant(node, "axes", ir.tensor(list(range(axis, rank)), dtype=ir.DataType.INT64))
        eps = _constant(node, "epsilon", ir.tensor(epsilon, dtype=float32))
        square = new("Pow", [upcast, two.outputs[0]])
        mean = new("ReduceMean", [square.outputs[0], axes.outputs[0]], [ir.AttrInt64("keepdims", 1)])
        shifted = new("Add", [mean.outputs[0], eps.outputs[0]])
        root = new("Sqrt", [shifted.outputs[0]])
        inverse = new("Reciprocal", [root.outputs[0]])
        normalized = new("Mul", [upcast, inverse.outputs[0]], suffix="normalize")
        nodes += [two, axes, eps, square, mean, shifted, root, inverse, normalized]
        scale32 = scale
        if scale.dtype != float32:
            nodes.append(new("Cast", [scale], [ir.AttrInt64("to", float32)], "scale_upcast"))
            scale32 = nodes[-1].outputs[0]
        nodes.append(new("Mul", [normalized.outputs[0], scale32], suffix="scale"))
        if x.dtype != float32:
            nodes.append(new("Cast", [nodes[-1].outputs[0]], [ir.AttrInt64("to", x.dtype)], "downcast", x.dtype))
        old = node.outputs[0]
        nodes[-1].outputs[0].shape = old.shape
        graph.insert_before(node, nodes)
        old.replace_all_uses_with(nodes[-1].outputs[0], replace_graph_outputs=True)
        name = old.name
        graph.remove(node, safe=True)
        nodes[-1].outputs[0].name = name
        replaced += 1
    return replaced


def check_portable(model: ir.Model, spec: ComponentSpec, compute: str) -> None:
    """Pass (every other export): RMSNormalization that torch wrote for `rms_norm` is decomposed again
    (`decompose_rms_normalization`), and no native op is left in a graph that claims to be portable."""
    decompose_rms_normalization(model)
    counts = {name: count for name, count in native_ops_in(model).items() if name in FLAG_OPS}
    if counts:
        raise InternalError(
            f"{spec.name}: the portable export holds {', '.join(counts)}: this is a fluxexport bug, export with "
            "--native-attention meanwhile"
        )
