"""A bf16 graph rewritten to compute in float32 with its bf16-rounded weights: how ONNX Runtime on CPU (which
has no bf16 MatMul/Conv kernels) runs the graphs that TensorRT gets as they are."""

from __future__ import annotations

import onnx_ir as ir


def _all_values(model: ir.Model):
    yield from model.graph.inputs
    yield from model.graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        yield from node.outputs


def upcast_bf16_to_fp32(model: ir.Model) -> ir.Model:
    """Rewrite a BF16 graph to compute in float32 with its bf16-rounded weights, in place.

    ONNX Runtime has no CPU kernels for bf16 MatMul/Conv/…: this copy checks the graph's structure and
    weights there, while the BF16 graph itself goes to TensorRT.
    """
    import numpy as np

    bf16, fp32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT
    for value in model.graph.initializers.values():
        if value.dtype == bf16 and value.const_value is not None:
            value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
    for value in _all_values(model):
        if value.dtype == bf16:
            value.dtype = fp32
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for name, attribute in list(node.attributes.items()):
            if name == "to" and attribute.value == bf16:
                node.attributes[name] = ir.AttrInt64("to", fp32)
            elif attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype == bf16:
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attribute.value.numpy().astype(np.float32)))
    return model
