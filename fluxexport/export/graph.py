"""Stage 2 of an export: passes over a traced onnx_ir model (spec names on I/O axes, no DOUBLE, BF16 Resize
wrapped in casts), each a `GraphPass`, run in the order `EXPORT_PASSES` declares.

They work on onnx_ir (not protobuf) so that multi-GB graphs never have to fit in one protobuf message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx_ir as ir

from fluxexport.dtypes import element_type
from fluxexport.errors import FluxExportError
from fluxexport.specs import ComponentSpec


def onnx_dtype(spec_dtype: str, compute: str) -> ir.DataType:
    """The ONNX element type of a spec tensor when the component computes in `compute`."""
    return ir.DataType[element_type(spec_dtype, compute).upper()]


def name_axes_from_spec(model: ir.Model, spec: ComponentSpec) -> None:
    """Give the graph's inputs and outputs the spec's axis names (torch names them `s9`, `8*h_`, …)."""
    renames: dict[str, str] = {}
    for values, tensors in ((model.graph.inputs, spec.inputs), (model.graph.outputs, spec.outputs)):
        for value, tensor in zip(values, tensors, strict=True):
            if value.name != tensor.name:
                raise FluxExportError(f"{spec.name}: exported {value.name!r} where the spec says {tensor.name!r}")
            dims = []
            for exported, wanted in zip(value.shape, tensor.dims, strict=True):
                if isinstance(wanted, str):
                    if isinstance(exported, ir.SymbolicDim) and exported.value:
                        renames[exported.value] = wanted
                    dims.append(ir.SymbolicDim(wanted))
                else:
                    dims.append(exported)
            value.shape = ir.Shape(dims)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value.shape is not None and not value.is_graph_output():
                value.shape = ir.Shape(
                    ir.SymbolicDim(renames.get(d.value, d.value)) if isinstance(d, ir.SymbolicDim) else d
                    for d in value.shape
                )


def _all_values(model: ir.Model):
    yield from model.graph.inputs
    yield from model.graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        yield from node.outputs


def double_tensors(model: ir.Model) -> list[str]:
    """Names of every float64 value or constant in the graph (TensorRT has no DOUBLE)."""
    found = [value.name for value in _all_values(model) if value.dtype == ir.DataType.DOUBLE]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attribute in node.attributes.values():
            if attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype == ir.DataType.DOUBLE:
                found.append(f"{node.name}.{attribute.name}")
    return found


def wrap_bf16_resize_in_casts(model: ir.Model) -> int:
    """TensorRT has no BF16 Resize: replace each BF16 Resize by Cast(fp32) → Resize → Cast(bf16)."""
    graph, wrapped = model.graph, 0
    for node in [n for n in graph if n.op_type == "Resize" and n.inputs[0].dtype == ir.DataType.BFLOAT16]:
        old_output = node.outputs[0]
        up = ir.Node("", "Cast", [node.inputs[0]], [ir.AttrInt64("to", ir.DataType.FLOAT)], name=f"{node.name}_up")
        resize = ir.Node("", "Resize", [up.outputs[0], *node.inputs[1:]], node.attributes.values(), name=node.name)
        down = ir.Node(
            "", "Cast", [resize.outputs[0]], [ir.AttrInt64("to", ir.DataType.BFLOAT16)], name=f"{node.name}_down"
        )
        up.outputs[0].dtype = resize.outputs[0].dtype = ir.DataType.FLOAT
        down.outputs[0].dtype, down.outputs[0].shape = ir.DataType.BFLOAT16, old_output.shape
        graph.insert_before(node, [up, resize, down])
        old_output.replace_all_uses_with(down.outputs[0], replace_graph_outputs=True)
        name = old_output.name
        graph.remove(node, safe=True)
        down.outputs[0].name = name
        wrapped += 1
    return wrapped


def check_io_dtypes(model: ir.Model, spec: ComponentSpec, compute: str) -> None:
    """The exported inputs/outputs carry exactly the spec's element types."""
    for values, tensors in ((model.graph.inputs, spec.inputs), (model.graph.outputs, spec.outputs)):
        for value, tensor in zip(values, tensors, strict=True):
            expected = onnx_dtype(tensor.dtype, compute)
            if value.dtype != expected:
                raise FluxExportError(f"{spec.name}.{tensor.name} is {value.dtype.name}, the spec says {expected.name}")


def strip_exporter_metadata(model: ir.Model) -> None:
    """Drop torch's per-node provenance (stack traces, fx names: ~2 KB a node)."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
        node.doc_string = None
        for value in node.outputs:
            value.metadata_props.clear()


def replace_with_initializer(graph: ir.Graph, node: ir.Node, tensor: ir.TensorProtocol) -> ir.Value:
    """Replace single-output `node` by an initializer holding `tensor`, under the node output's name (what
    the optimizer's constant folding does), and drop the node's initializer inputs nothing else uses."""
    output = node.outputs[0]
    name = output.name
    output.name = f"{name}_replaced"
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    output.replace_all_uses_with(value, replace_graph_outputs=True)
    sources = [v for v in node.inputs if v is not None and v.is_initializer()]
    graph.remove(node, safe=True)
    graph.register_initializer(value)
    for source in sources:
        if not source.uses() and source.name in graph.initializers:
            graph.initializers.pop(source.name)
    return value


GraphPass = Callable[[ir.Model, ComponentSpec, str], str | None]
"""A pass over a traced graph: (model, its spec, the dtype it computes in) → a note for the manifest or None.
It rewrites the model in place, or refuses the graph with a FluxExportError."""


def drop_provenance(model: ir.Model, spec: ComponentSpec, compute: str) -> None:
    """Pass: torch's per-node stack traces and fx names go (`strip_exporter_metadata`)."""
    strip_exporter_metadata(model)


def spec_axis_names(model: ir.Model, spec: ComponentSpec, compute: str) -> None:
    """Pass: the I/O names must be the spec's; axes get the spec's names (`name_axes_from_spec`)."""
    name_axes_from_spec(model, spec)


def spec_io_dtypes(model: ir.Model, spec: ComponentSpec, compute: str) -> None:
    """Pass: refuse I/O element types other than the spec's in `compute` (`check_io_dtypes`)."""
    check_io_dtypes(model, spec, compute)


def no_doubles(model: ir.Model, spec: ComponentSpec, compute: str) -> None:
    """Pass: refuse a graph holding float64 values or constants (TensorRT has no DOUBLE)."""
    doubles = double_tensors(model)
    if doubles:
        raise FluxExportError(
            f"{spec.name}: the graph holds float64 tensors ({', '.join(doubles[:3])}); TensorRT has no DOUBLE"
        )


def bf16_resize_in_fp32(model: ir.Model, spec: ComponentSpec, compute: str) -> str | None:
    """Pass: in a bf16 graph, each BF16 Resize computes in fp32 between two casts (`wrap_bf16_resize_in_casts`)."""
    if compute == "bf16" and (count := wrap_bf16_resize_in_casts(model)):
        return f"{count} BF16 Resize nodes wrapped in fp32 casts"
    return None


# Every exported graph goes through these, in this order (checks before rewrites that assume them). A family or
# component that needs its own pass adds it after these (`export_component`'s `graph_pass`: quantize's FP8 weights).
EXPORT_PASSES: tuple[GraphPass, ...] = (drop_provenance, spec_axis_names, spec_io_dtypes, no_doubles,
                                        bf16_resize_in_fp32)  # fmt: skip


def run_passes(
    model: ir.Model, spec: ComponentSpec, compute: str, passes: Sequence[GraphPass] = EXPORT_PASSES
) -> tuple[str, ...]:
    """Run `passes` over `model` in order; the notes they return, in that order."""
    return tuple(note for graph_pass in passes if (note := graph_pass(model, spec, compute)))
