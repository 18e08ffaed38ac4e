"""`export --redux`: FLUX.1 Redux's SigLIP image encoder and Redux embedder as ONNX graphs with their own specs
(`specs/redux.py`: the batch is their one dynamic axis), in a folder of their own with a manifest
(`redux_manifest.json`) naming the prior they came from and each graph's contract."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fluxexport.adapters.redux import load_redux_adapter
from fluxexport.artifacts.records import GraphRecord
from fluxexport.artifacts.redux import ReduxExport, write_redux_manifest
from fluxexport.errors import FluxExportError
from fluxexport.export.graph import EXPORT_PASSES, run_passes
from fluxexport.export.native_ops import check_portable, portable_translations
from fluxexport.export.onnx_export import ExportedComponent, WritePolicy, graph_record, write_graph
from fluxexport.export.trace import DEFAULT_OPSET, TraceOptions, trace_module
from fluxexport.models.redux import REDUX_COMPONENTS, ReduxSource
from fluxexport.specs import sample_inputs
from fluxexport.specs.redux import redux_specs


def export_redux_component(redux: ReduxSource, name: str, out: Path, opset: int = DEFAULT_OPSET) -> GraphRecord:
    """One Redux component traced in fp32 at its spec's export sizes, through the export passes, written into
    `out` (replacing an older graph atomically); its manifest record."""
    start = time.perf_counter()
    spec = redux_specs(redux)[name]
    module = load_redux_adapter(redux, name, torch.float32, for_export=True)
    feeds = sample_inputs(spec, spec.export_sizes)
    options = TraceOptions(opset, streaming=False, translations=portable_translations(opset, False) or None)
    try:
        model = trace_module(module, spec, feeds, options).model
    except Exception as error:  # torch.export's errors are pages long: keep the first line
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise FluxExportError(f"exporting {name} failed: {first}") from error
    notes = run_passes(model, spec, "fp32", (*EXPORT_PASSES, check_portable))
    written = write_graph(model, Path(out), WritePolicy(name))
    exported = ExportedComponent(
        name, written.path, "fp32", time.perf_counter() - start, written.nodes, written.weight_bytes,
        written.external_data, tuple(notes),
    )  # fmt: skip
    return graph_record(spec, exported, opset)


def export_redux(redux: ReduxSource, out: Path, opset: int = DEFAULT_OPSET) -> ReduxExport:
    """Both Redux components into `out`, then the manifest (written last: a folder with one is whole)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    graphs = {name: export_redux_component(redux, name, out, opset) for name in REDUX_COMPONENTS}
    return write_redux_manifest(out, redux.name, graphs)
