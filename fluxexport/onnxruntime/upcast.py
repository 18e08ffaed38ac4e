"""A bf16 graph rewritten to compute in float32 with its bf16-rounded weights: how ONNX Runtime on CPU (which
has no bf16 MatMul/Conv kernels) runs the graphs that TensorRT gets as they are.

The float32 copy is twice the bf16 weights: past protobuf's 2 GB it cannot be serialized in memory, so
`write_upcast` writes it to a file with its weights beside it, one tensor upcast at a time (the bf16 weights are
read through the graph's own external data, mapped from disk), and ONNX Runtime loads it from that path.

The copy rounds to bf16 wherever the bf16 graph does: every bf16 value a graph input or an arithmetic node yields
passes through Cast(to=BFLOAT16) → Cast(to=FLOAT) (ONNX Runtime's CPU Cast rounds to nearest even, as PyTorch
does). Without it the copy computes in float32 throughout, and FLUX.1's `timestep × 1000` (bf16 in the graph,
as in diffusers) lands up to 2 radians away in the sinusoids: the head's `temb` was 0.3 rel-L2 from PyTorch bf16
on tiny-dev, 0.003 with the rounding."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir

from fluxexport.artifacts.published import GRAPH_FILE, cut_posterior_sampling
from fluxexport.atomic import staged_files

# external data offsets aligned to 64 KiB: ONNX Runtime maps aligned tensors from the file instead of reading them
_ALIGNMENT = 65536


def _all_values(model: ir.Model):
    yield from model.graph.inputs
    yield from model.graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        yield from node.outputs


def _upcast_lazily(tensor: ir.TensorProtocol, name: str | None) -> ir.LazyTensor:
    """`tensor` (bf16) as a float32 tensor computed only when it is read (written, or serialized)."""
    import numpy as np

    return ir.LazyTensor(
        lambda: ir.tensor(tensor.numpy().astype(np.float32), name=name), ir.DataType.FLOAT, tensor.shape, name=name
    )


# Nodes whose outputs hold only values of their inputs (or bf16 constants): already bf16 values, no rounding needed
_EXACT_OPS = frozenset({
    "Concat", "Constant", "DepthToSpace", "Expand", "Flatten", "Gather", "GatherElements", "GatherND", "Identity",
    "Max", "Min", "Neg", "Pad", "ReduceMax", "ReduceMin", "Relu", "Reshape", "Slice", "SpaceToDepth", "Split",
    "Squeeze", "Tile", "Transpose", "Unsqueeze", "Where", "Abs",
})  # fmt: skip


def _rounded_values(model: ir.Model) -> list[tuple[ir.Node | None, ir.Value]]:
    """The bf16 values the graph rounds, each with the node yielding it (None: a graph input): those typed bf16
    (the exporter types every value) and the outputs of Cast(to=BFLOAT16)."""
    bf16 = ir.DataType.BFLOAT16
    values: list[tuple[ir.Node | None, ir.Value]] = [(None, v) for v in model.graph.inputs if v.dtype == bf16]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        standard = node.domain in ("", "ai.onnx")
        if standard and node.op_type in _EXACT_OPS:
            continue
        to_bf16 = standard and node.op_type == "Cast" and node.attributes.get_int("to") == bf16
        values += [(node, value) for value in node.outputs if value.dtype == bf16 or to_bf16]
    return values


def _round_to_bf16(model: ir.Model, node: ir.Node | None, value: ir.Value) -> None:
    """Give every consumer of `value` (float32 now) its bf16 rounding instead: Cast(to=BFLOAT16) →
    Cast(to=FLOAT) right after `node` (or at the top of the graph for an input); a graph output keeps its name."""
    bf16, fp32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT
    down = ir.node("Cast", [value], {"to": bf16})
    up = ir.node("Cast", [down.outputs[0]], {"to": fp32})
    down.outputs[0].dtype, down.outputs[0].shape = bf16, value.shape
    up.outputs[0].dtype, up.outputs[0].shape = fp32, value.shape
    for consumer, index in list(value.uses()):
        if consumer is not down:
            consumer.replace_input_with(index, up.outputs[0])
    graph = node.graph if node is not None else model.graph
    outputs = graph.outputs
    if value in outputs:
        name, value.name = value.name, f"{value.name}_before_bf16_rounding"
        up.outputs[0].name = name
        outputs[outputs.index(value)] = up.outputs[0]
    if node is None:
        graph.insert_before(graph.node(0), [down, up])
    else:
        graph.insert_after(node, [down, up])


def upcast_bf16_to_fp32(model: ir.Model) -> ir.Model:
    """Rewrite a BF16 graph to compute in float32 with its bf16-rounded weights, rounding to bf16 where the
    graph does (its bf16 inputs and every bf16 value an arithmetic node yields), in place.

    ONNX Runtime has no CPU kernels for bf16 MatMul/Conv/…: this copy checks the graph's structure and
    weights there, while the BF16 graph itself goes to TensorRT. The initializers are upcast lazily: nothing is
    converted until the model is serialized or saved (`write_upcast` saves them one at a time).
    """
    import numpy as np

    bf16, fp32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT
    rounded = _rounded_values(model)
    for value in model.graph.initializers.values():
        if value.dtype == bf16 and value.const_value is not None:
            value.const_value = _upcast_lazily(value.const_value, value.name)
    for value in _all_values(model):
        if value.dtype == bf16:
            value.dtype = fp32
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for name, attribute in list(node.attributes.items()):
            if name == "to" and attribute.value == bf16:
                node.attributes[name] = ir.AttrInt64("to", fp32)
            elif attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype == bf16:
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attribute.value.numpy().astype(np.float32)))
    for node, value in rounded:
        _round_to_bf16(model, node, value)
    return model


def upcast_name(path: Path) -> str:
    """The file name of `path`'s float32 copy: the graph's own, or for a graph of a published folder (each named
    model.onnx in a folder of its own) its folder's name before it (`vae.opt.model.onnx`, `bf16.model.onnx`)."""
    path = Path(path)
    return f"{path.parent.name}.{path.name}" if path.name == GRAPH_FILE else path.name


def write_upcast(path: Path, folder: Path) -> Path:
    """Write the float32 copy of the bf16 graph at `path` into `folder` (named by `upcast_name`, weights in
    `<name>_data` beside it) and return its path; an existing copy is reused. Peak memory is about the largest
    tensor, not the graph."""
    target = Path(folder) / upcast_name(path)
    if target.is_file():
        return target
    model = ir.load(path)
    mapped = [value.const_value for value in model.graph.initializers.values()
              if isinstance(value.const_value, ir.ExternalTensor)]  # fmt: skip
    # the graph moves in last: a copy whose graph file exists is complete; a failed copy leaves nothing behind
    with staged_files(folder, "upcast", last=target.name) as staging:
        try:
            cut_posterior_sampling(model)
            upcast_bf16_to_fp32(model)
            ir.save(model, staging / target.name, external_data=f"{target.name}_data", size_threshold_bytes=1024,
                    alignment=_ALIGNMENT)  # fmt: skip
        finally:
            for tensor in mapped:  # unmap the bf16 weights now: their pages would count until the model is collected
                tensor.release()
    return target


def upcast_bytes(path: Path) -> int:
    """The disk a float32 copy of the graph at `path` takes at most: twice the graph and its external data."""
    path = Path(path)
    return 2 * sum(file.stat().st_size for file in path.parent.glob(f"{path.name}*") if file.is_file())


def check_room(folder: Path, needed: int) -> None:
    """Refuse in one line when `folder`'s disk cannot take `needed` bytes."""
    from fluxexport.errors import FluxExportError

    free = shutil.disk_usage(folder).free
    if free < needed:
        raise FluxExportError(
            f"the float32 copy ONNX Runtime runs a bf16 graph from needs {needed / 1e9:.1f} GB in {folder}, which has "
            f"{free / 1e9:.1f} GB free: free some space there (or set TMPDIR to a larger disk)"
        )


@contextmanager
def upcast_folder_for(path: Path, folder: Path | None = None) -> Iterator[Path]:
    """Where the float32 copy of `path` is written: `folder` when given (kept: the caller removes it), else a
    temporary folder beside the graph (the graphs' disk), or in the system's temp folder where the graph's is
    read-only, removed on exit. Refuses in one line when the disk has no room for the copy."""
    path = Path(path)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / upcast_name(path)).is_file():
            check_room(folder, upcast_bytes(path))
        yield folder
        return
    parent = path.parent if os.access(path.parent, os.W_OK) else Path(tempfile.gettempdir())
    check_room(parent, upcast_bytes(path))
    temporary = Path(tempfile.mkdtemp(dir=parent, prefix=".fluxexport-upcast-"))
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
