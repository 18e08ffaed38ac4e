"""Stage 1 of an export: trace a component with torch's dynamo exporter into an in-memory onnx_ir model.

Nothing is written here: the graph passes (`export/graph.py`) and the write (`export/onnx_export.py`) take the
model from this stage. A streamed trace (`export/streaming.py`) holds no weight: its initializers read the
checkpoint lazily when written, and it says which checkpoint tensor each one comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fluxexport.adapters import build_adapter
from fluxexport.artifacts.records import WeightOrigin
from fluxexport.dtypes import torch_dtype
from fluxexport.errors import FluxExportError
from fluxexport.export.native_ops import opset23_fusions
from fluxexport.export.streaming import Prepare, streamed_program
from fluxexport.export.trace_cache import cache_folder, cached_trace, trace_key
from fluxexport.models.source import ModelSource
from fluxexport.specs import ComponentSpec, sample_inputs

if TYPE_CHECKING:
    import onnx_ir as ir
    from torch.onnx import ONNXProgram

DEFAULT_OPSET = 20  # the newest opset TensorRT 10.1's ONNX parser documents (see data/tensorrt_onnx_ops.json)
MIN_OPSET, MAX_OPSET = 18, 23  # what torch's dynamo exporter emits


@dataclass(frozen=True)
class TraceOptions:
    """How to trace: `streaming` builds the module on fake weights and points the initializers at the checkpoint
    (the model is never held); `module` replaces the adapter altogether (in memory); `prepare` rewrites the
    module before it is traced, in both modes (the FP8 fake quantization); `translations` maps custom ops to
    ONNX functions."""

    opset: int = DEFAULT_OPSET
    streaming: bool = True
    module: torch.nn.Module | None = None
    prepare: Prepare | None = None
    translations: dict | None = None
    native_ops: bool = False  # keep opset 23's Attention / RMSNormalization (`export/native_ops.py`)


@dataclass(frozen=True)
class Traced:
    """What a trace gives: the graph (optimized by onnxscript, passes not yet run), the dtype it computes in, and
    for a streamed trace each initializer's checkpoint tensor (None for an in-memory trace)."""

    model: ir.Model
    compute: str
    origins: dict[str, WeightOrigin] | None = None


def dynamic_shapes(spec: ComponentSpec) -> tuple[dict[int, object], ...]:
    """torch.export Dims per input, one Dim object per spec axis so that shared axes stay tied."""
    dims: dict[str, object] = {}
    for axis, bounds in spec.axes.items():
        if bounds.multiple == 1:
            dims[axis] = torch.export.Dim(axis, min=1)
        else:  # sizes that are multiples of `multiple` (VAE pixels): multiple · Dim
            dims[axis] = bounds.multiple * torch.export.Dim(f"{axis}_over_{bounds.multiple}", min=1)
    return tuple(
        {index: dims[dim] for index, dim in enumerate(tensor.dims) if isinstance(dim, str)} for tensor in spec.inputs
    )


def trace_module(
    module: torch.nn.Module, spec: ComponentSpec, feeds: dict[str, torch.Tensor], options: TraceOptions,
    optimize: bool = True,
) -> ONNXProgram:  # fmt: skip
    """torch.onnx.export (dynamo) of `module` on the sample `feeds`, with the spec's names and dynamic axes;
    `optimize` runs the onnxscript optimizer (constant folding, dead-node removal). With
    `FLUXEXPORT_TRACE_CACHE` set, a trace of the same module, inputs, spec and options is read from the cache
    instead (`export/trace_cache.py`)."""

    def trace() -> ONNXProgram:
        with torch.no_grad():
            return torch.onnx.export(
                module,
                tuple(feeds.values()),
                dynamo=True,
                dynamic_shapes=dynamic_shapes(spec),
                input_names=[tensor.name for tensor in spec.inputs],
                output_names=[tensor.name for tensor in spec.outputs],
                opset_version=options.opset,
                optimize=optimize,
                custom_translation_table=options.translations,
                verbose=False,
            )

    if cache_folder() is None:
        return trace()
    settings = (spec, options.opset, options.translations, options.native_ops, optimize)
    return cached_trace(trace_key(module, feeds, *settings), trace)


def trace_component(source: ModelSource, spec: ComponentSpec, compute: str, options: TraceOptions) -> Traced:
    """The component of `source` that `spec` describes, traced in `compute` ("fp32", "bf16", "fp16") at the
    spec's export sizes. torch.export's own errors (pages long) become one line naming the component."""
    dtype = torch_dtype(compute)
    feeds = sample_inputs(spec, spec.export_sizes, dtype)
    origins: dict[str, WeightOrigin] | None = {} if options.module is None and options.streaming else None
    try:
        with opset23_fusions(options.native_ops):
            model = _trace(source, spec, dtype, feeds, options, origins)
    except FluxExportError:
        raise
    except Exception as error:  # keep the first line, point to the cause
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise FluxExportError(f"exporting {spec.name} failed: {first}") from error
    return Traced(model, compute, origins)


def _trace(source: ModelSource, spec: ComponentSpec, dtype: torch.dtype, feeds: dict[str, torch.Tensor],
           options: TraceOptions, origins: dict[str, WeightOrigin] | None) -> ir.Model:  # fmt: skip
    """The traced graph, streamed (`origins` filled) or in memory (`origins` None)."""
    if origins is not None:
        return streamed_program(
            source, spec, dtype, lambda adapter, optimize: trace_module(adapter, spec, feeds, options, optimize),
            options.prepare, origins,
        )  # fmt: skip
    module = options.module or build_adapter(spec, source, dtype, options.prepare)
    return trace_module(module, spec, feeds, options).model
