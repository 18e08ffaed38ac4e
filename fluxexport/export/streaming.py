"""Export without holding the model: trace on fake weights, fill the initializers from the checkpoint lazily.

1. The component is built from its config with *fake* parameters (torch's FakeTensorMode: shapes and dtypes,
   no memory) and its real buffers (small: CLIP's position ids), then traced by the same dynamo exporter.
2. Each initializer gets an `onnx_ir.LazyTensor` that reads its tensor from the memory-mapped safetensors
   (one shard, one tensor, or the rows of one part of a fused BFL tensor), casts it to the export dtype, and
   lets it go: `onnx_ir.save` then streams the weights into `.onnx_data` one tensor at a time.
3. The onnxscript optimizer (what `optimize=True` runs) runs after the weights are attached, so its constant
   folding sees real values; it only reads small tensors, so the graph is the in-memory export's, node for
   node, with bit-identical initializers (tests/test_streaming.py).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor
from torch import nn

from fluxexport.adapters import adapter_for
from fluxexport.artifacts.records import WeightOrigin
from fluxexport.errors import FluxExportError
from fluxexport.export.graph import replace_with_initializer
from fluxexport.models.checkpoint import CheckpointTensors
from fluxexport.models.loaders import MODULE_OF
from fluxexport.models.meta import parameter_aliases, weightless_module
from fluxexport.models.source import ModelSource
from fluxexport.specs import ComponentSpec


def empty_module(source: ModelSource, module: str, dtype: torch.dtype) -> nn.Module:
    """`module` ("clip", "t5", "transformer", "vae") built from its config with fake `dtype` parameters (tied
    parameters stay tied) and real buffers, in eval mode."""
    model = weightless_module(source, module)
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, nn.Parameter] = {}
    for submodule in model.modules():
        for name, parameter in submodule._parameters.items():
            if parameter is None:
                continue
            if id(parameter) not in fakes:
                with mode:
                    fake = torch.empty(
                        parameter.shape, dtype=dtype if parameter.is_floating_point() else parameter.dtype
                    )
                fakes[id(parameter)] = nn.Parameter(fake, requires_grad=False)
            submodule._parameters[name] = fakes[id(parameter)]
        for name, buffer in submodule._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                submodule._buffers[name] = buffer.to(dtype)
    return model.eval()


Loader = Callable[[], torch.Tensor]


Prepare = Callable[[nn.Module], nn.Module]


def lazy_initializer(load: Loader, name: str, dtype: ir.DataType, shape: ir.Shape) -> ir.LazyTensor:
    """An initializer whose bytes are produced by `load()` when written, and freed right after."""
    return ir.LazyTensor(lambda: TorchTensor(load().contiguous(), name), dtype=dtype, shape=shape, name=name)


def attach_checkpoint_weights(
    model: ir.Model, adapter: nn.Module, inner: nn.Module, tensors: CheckpointTensors, dtype: torch.dtype,
    origins: dict[str, WeightOrigin] | None = None,
) -> dict[str, Loader]:  # fmt: skip
    """Point every initializer that is a parameter (or buffer) of `inner` at its checkpoint tensor, lazily.

    Returns each attached initializer's loader (and fills `origins`: initializer → checkpoint tensor);
    refuses a checkpoint that lacks a tensor the model has."""
    prefix = next(name for name, child in adapter.named_children() if child is inner) + "."
    aliases = parameter_aliases(inner)
    parameters = {f"{prefix}{name}": aliases[id(p)] for name, p in inner.named_parameters(remove_duplicate=False)}
    buffers = {f"{prefix}{name}": buffer for name, buffer in inner.named_buffers()}
    attached: dict[str, Loader] = {}
    for name, value in model.graph.initializers.items():
        if name in parameters:
            found = tensors.first_of(parameters[name])
            load = tensors.loader(found, dtype)
            if origins is not None:
                origins[name] = WeightOrigin(found)
        elif name in buffers:
            buffer = buffers[name]
            load = lambda buffer=buffer: buffer  # noqa: E731 - a buffer is small and already real
        else:
            continue
        value.const_value = lazy_initializer(load, name, value.dtype, value.shape)
        attached[name] = load
    return attached


def fold_weight_transposes(
    model: ir.Model, loaders: dict[str, Loader], origins: dict[str, WeightOrigin] | None = None
) -> int:
    """Fold `Transpose(weight)` into a lazily transposed initializer, as the optimizer would, but lazily.

    torch exports a Linear as MatMul(x, Transpose(W)) and the optimizer's constant folding replaces the
    Transpose by a transposed copy of W held in memory: for FLUX, nearly every weight. Folded here first, each
    becomes a LazyTensor (read, permute, write, free) under the name the optimizer gives it (the Transpose's
    output), so the graph is the same and the optimizer finds nothing left to fold."""
    graph, folded = model.graph, 0
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" else None
        if source is None or source.name not in loaders or not source.is_initializer():
            continue
        rank = len(source.shape)
        perm = tuple(node.attributes["perm"].as_ints()) if "perm" in node.attributes else tuple(reversed(range(rank)))
        shape, name = ir.Shape([source.shape[axis] for axis in perm]), node.outputs[0].name
        load = lambda load=loaders[source.name], perm=perm: load().permute(perm)  # noqa: E731
        origin = origins.get(source.name) if origins is not None else None
        replace_with_initializer(graph, node, lazy_initializer(load, name, source.dtype, shape))
        if origins is not None and origin is not None:
            origins[name] = WeightOrigin(origin.tensor, tuple(perm))
            if source.name not in graph.initializers:
                del origins[source.name]
        folded += 1
    return folded


def streamed_program(
    source: ModelSource, spec: ComponentSpec, dtype: torch.dtype, export, prepare: Prepare | None = None,
    origins: dict[str, WeightOrigin] | None = None,
) -> ir.Model:  # fmt: skip
    """The component's optimized graph with lazily loaded weights; `export(module, optimize)` traces it.

    `prepare` rewrites the (fake-weight) module before it is traced, e.g. into the FP8 fake-quantized one;
    the parameters it keeps keep their names, the buffers it adds must be real. `origins` is filled with
    each initializer's checkpoint tensor."""
    module_name = MODULE_OF[spec.name]
    tensors = CheckpointTensors(source, module_name)
    inner = empty_module(source, module_name, dtype)
    tensors.load_buffers(inner, dtype)
    if prepare is not None:
        inner = prepare(inner)
    adapter = adapter_for(source, spec.name, inner)
    program = export(adapter, False)
    loaders = attach_checkpoint_weights(program.model, adapter, inner, tensors, dtype, origins)
    fakes = [name for name, value in program.model.graph.initializers.items() if _is_fake(value.const_value)]
    if fakes:
        raise FluxExportError(f"{spec.name}: no weight for {fakes[0]} (and {len(fakes) - 1} more) in the checkpoint")
    fold_weight_transposes(program.model, loaders, origins)
    program.optimize()  # the same onnxscript optimizer `optimize=True` runs, now on real (lazy) weights
    return program.model


FP8_SUFFIX = ".fp8"  # quantize's FP8 weights: `<weight initializer>.fp8`, read by one DequantizeLinear


def surviving_origins(model: ir.Model, origins: dict[str, WeightOrigin]) -> dict[str, WeightOrigin]:
    """The origins of the initializers the final graph still has (sorted by name). An FP8 weight
    (`<name>.fp8`, quantized from the initializer `<name>`) keeps its source's origin and its DequantizeLinear's
    scale (`fp8_scale`): a LoRA-merged weight is quantized with that same scale."""
    kept, found = model.graph.initializers, {}
    for name, value in kept.items():
        source = origins.get(name.removesuffix(FP8_SUFFIX)) if name.endswith(FP8_SUFFIX) else origins.get(name)
        if source is None:
            continue
        scale = _dequantize_scale(value) if name.endswith(FP8_SUFFIX) else None
        found[name] = WeightOrigin(source.tensor, source.perm, scale)
    return dict(sorted(found.items()))


def _dequantize_scale(value: ir.Value) -> float:
    """The scale of the one DequantizeLinear that reads an FP8 initializer."""
    readers = [node for node, _ in value.uses() if node.op_type == "DequantizeLinear"]
    scale = ir.convenience.get_const_tensor(readers[0].inputs[1]) if len(readers) == 1 else None
    if scale is None:
        raise FluxExportError(f"FP8 weight {value.name} is not read by one DequantizeLinear with a constant scale")
    return float(scale.numpy().reshape(-1)[0])


def _is_fake(tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    raw = getattr(tensor, "raw", None)
    return isinstance(raw, FakeTensor)
