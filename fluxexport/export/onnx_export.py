"""Export components to ONNX in three stages: trace (`export/trace.py`), graph passes (`export/graph.py`), and
the write (here: the `WritePolicy` says where the weights go, `write_graph` writes through one staging folder);
`export_component` composes them, `export_model` does it for a model's components and keeps its manifest."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fluxexport.artifacts.files import file_sha256, library_versions, now
from fluxexport.artifacts.folders import ExportFolder, new_export
from fluxexport.artifacts.records import GraphRecord, TensorRecord, WeightOrigin
from fluxexport.atomic import staged_files
from fluxexport.dtypes import component_precision, element_type, torch_dtype
from fluxexport.errors import FluxExportError
from fluxexport.export.graph import EXPORT_PASSES, run_passes
from fluxexport.export.native_ops import (
    check_native,
    check_portable,
    native_ops_in,
    portable_translations,
    require_native_opset,
)
from fluxexport.export.streaming import surviving_origins
from fluxexport.export.target_folder import prepare_export_folder
from fluxexport.export.trace import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, TraceOptions, trace_component
from fluxexport.models.source import ModelSource
from fluxexport.specs import KNOWN_COMPONENTS, ComponentSpec, ExportBounds, component_specs

if TYPE_CHECKING:
    import onnx_ir as ir

PROTOBUF_LIMIT = 2**31 - 2**24  # weights are never inline near protobuf's 2 GiB message limit
# Weights go to `<stem>.onnx_data` past this size unless asked otherwise. An inline graph is one protobuf message
# that every reader (onnx.load, the checker, shape inference, ONNX Runtime, TensorRT's parser) parses, and often
# copies, whole: a 1.37 GB bf16 transformer inline peaks at 4.6 GB RSS in `export` (and took 7.2 GB in `check`
# before it skipped weights), against 0.76 GB with its weights beside it (scripts/bench_scale.py --steps check).
# Every real FLUX component is well above 32 MiB (the smallest, the VAE encoder, holds 34M parameters: 69 MB in
# 16 bits); below it the copies cost little and one self-contained file is handier (tiny models, tests).
EXTERNAL_DATA_THRESHOLD = 32 * 2**20
DATA_SUFFIX = ".onnx_data"


@dataclass(frozen=True)
class WritePolicy:
    """How a graph is written: `<stem>.onnx`, its weights inline or in `<stem>.onnx_data`: as asked
    (`external_data` True: `--external-data`, False: `--inline-weights`), else (None) beside the graph past
    `threshold` bytes. Inline weights past protobuf's limit are refused."""

    stem: str
    external_data: bool | None = None
    threshold: int = field(default_factory=lambda: EXTERNAL_DATA_THRESHOLD)

    @property
    def graph_file(self) -> str:
        return f"{self.stem}.onnx"

    @property
    def data_file(self) -> str:
        return f"{self.stem}{DATA_SUFFIX}"

    def data_file_for(self, weight_bytes: int) -> str | None:
        """The data file a graph with `weight_bytes` of weights gets (None: inline); refuses inline weights that
        one protobuf message cannot hold."""
        external = weight_bytes > self.threshold if self.external_data is None else self.external_data
        if not external and weight_bytes > PROTOBUF_LIMIT:
            raise FluxExportError(
                f"{self.stem}: {weight_bytes / 1e9:.2f} GB of weights cannot be inline in one ONNX protobuf (2 GB at "
                "most): drop --inline-weights"
            )
        return self.data_file if external else None


@dataclass(frozen=True)
class WrittenGraph:
    """What the write stage put in the folder."""

    path: Path
    external_data: str | None  # the data file's name beside the graph, None when the weights are inline
    weight_bytes: int
    nodes: int


def weight_bytes_of(model: ir.Model) -> int:
    """Bytes of the graph's initializers (lazy ones by their declared size: nothing is read)."""
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value)


def write_graph(
    model: ir.Model, folder: Path, policy: WritePolicy, on_bytes: Callable[[int, int], None] | None = None
) -> WrittenGraph:
    """Stage 3 of an export: write `model` into `folder` as `policy` says, replacing an older graph of the same
    stem (and its data file, gone when the new graph is inline) only once the new one is whole and passes
    ONNX's checker; refuses before writing when the disk cannot hold it. `on_bytes(written, total)` follows the
    weights as they are written (lazy ones are read from the checkpoint then)."""
    import onnx
    import onnx_ir as ir

    weight_bytes = weight_bytes_of(model)
    data_name = policy.data_file_for(weight_bytes)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    check_free_space(folder, weight_bytes)
    written = [0]

    def progress(tensor, _info) -> None:
        written[0] += tensor.nbytes
        if on_bytes:
            on_bytes(written[0], weight_bytes)

    with staged_files(folder, policy.stem, last=policy.graph_file, stale=[policy.data_file]) as staging:
        ir.save(model, staging / policy.graph_file, external_data=data_name, callback=progress if data_name else None)
        if on_bytes:
            on_bytes(weight_bytes, weight_bytes)
        onnx.checker.check_model(str(staging / policy.graph_file), full_check=False)
    return WrittenGraph(folder / policy.graph_file, data_name, weight_bytes, model.graph.num_nodes())


def check_free_space(folder: Path, needed: int, margin: float = 1.05) -> None:
    """Refuse before writing when `folder`'s file system cannot hold `needed` bytes (and 5% to spare)."""
    free = shutil.disk_usage(folder).free
    if free < needed * margin:
        raise FluxExportError(
            f"not enough disk space in {folder}: the graph needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are "
            "free: free some space or export to another --out"
        )


@dataclass(frozen=True)
class ExportedComponent:
    """One exported component as `export_component` made it (what its manifest record is built from)."""

    name: str
    path: Path
    dtype: str
    seconds: float
    nodes: int
    weight_bytes: int
    external_data: str | None
    notes: tuple[str, ...] = ()
    weights: dict[str, WeightOrigin] | None = None  # initializer → its checkpoint tensor (streamed exports)
    native_ops: dict[str, int] = field(default_factory=dict)  # ONNX Attention / RMSNormalization it holds


def export_component(
    source: ModelSource,
    spec: ComponentSpec,
    out_dir: Path,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    *,
    translations: dict | None = None,
    streaming: bool = True,
    on_bytes: Callable[[int, int], None] | None = None,
    graph_pass: Callable[[ir.Model], str | None] | None = None,
    prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    stem: str | None = None,
    native_attention: bool = False,
) -> ExportedComponent:
    """Export one component into `out_dir/<stem>.onnx` (+ `.onnx_data`; the stem is the component's name unless
    given), replacing any older file atomically: `trace_component`, then `run_passes` (`EXPORT_PASSES`, then
    `graph_pass`, which may return a note for the manifest), then `write_graph`.

    By default the weights stream from the checkpoint (`export/streaming.py`: the model is never held in
    memory); `streaming=False` loads the model and exports it in memory; `prepare` and `translations` are
    `TraceOptions`' (a module of one's own: `trace_component` with `TraceOptions(module=…)`). `on_bytes(written,
    total)` follows the weights as they are written. `native_attention` (opset ≥ 23) keeps attention and RMS norms
    as ONNX's Attention / RMSNormalization (`export/native_ops.py`); otherwise they are decomposed at any opset."""
    start = time.perf_counter()
    if native_attention:
        require_native_opset(opset)
    compute, note = component_precision(spec.name, dtype)
    translations = portable_translations(opset, native_attention) | (translations or {})
    options = TraceOptions(
        opset, streaming, prepare=prepare, translations=translations or None, native_ops=native_attention
    )
    traced = trace_component(source, spec, compute, options)
    extra = (lambda model, _spec, _compute: graph_pass(model),) if graph_pass else ()
    native = check_native if native_attention else check_portable
    notes = (*([note] if note else []), *run_passes(traced.model, spec, compute, (*EXPORT_PASSES, native, *extra)))
    weights = surviving_origins(traced.model, traced.origins) if traced.origins is not None else None
    written = write_graph(traced.model, Path(out_dir), WritePolicy(stem or spec.name, external_data), on_bytes)
    return ExportedComponent(
        spec.name, written.path, compute, time.perf_counter() - start, written.nodes, written.weight_bytes,
        written.external_data, notes, weights, native_ops_in(traced.model),
    )  # fmt: skip


def _tensors(tensors, compute: str) -> tuple[TensorRecord, ...]:
    return tuple(TensorRecord(t.name, element_type(t.dtype, compute), tuple(t.dims)) for t in tensors)


def graph_record(spec: ComponentSpec, exported: ExportedComponent, opset: int, base_dtype: str | None = None,
                 **extra) -> GraphRecord:  # fmt: skip
    """The manifest record of a freshly exported graph: its contract (the spec's I/O in the graph's types),
    digests, weight origins and how it was made; `base_dtype` for an FP8 graph (its other math)."""
    files = [exported.path] + ([exported.path.with_name(exported.external_data)] if exported.external_data else [])
    return GraphRecord(
        file=exported.path.name, dtype=exported.dtype, base_dtype=base_dtype or exported.dtype, opset=opset,
        inputs=_tensors(spec.inputs, exported.dtype), outputs=_tensors(spec.outputs, exported.dtype),
        axes={name: vars(axis) for name, axis in spec.axes.items()}, external_data=exported.external_data,
        sha256={path.name: file_sha256(path) for path in files}, weights=exported.weights or None,
        extra={"nodes": exported.nodes, "weight_bytes": exported.weight_bytes,
               "export_seconds": round(exported.seconds, 2), "notes": list(exported.notes), "exported_at": now()}
        | ({"native_ops": exported.native_ops} if exported.native_ops else {}) | extra,
    )  # fmt: skip


def open_folder_for(source: ModelSource, out_dir: Path, dtype: str, bounds: ExportBounds) -> ExportFolder:
    """The folder's record to extend: the existing one if it describes this checkpoint, else a new one."""
    return new_export(out_dir, source, dtype, vars(bounds), library_versions())


def export_model(
    source: ModelSource,
    out_dir: Path,
    components: Sequence[str] | None = None,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    bounds: ExportBounds | None = None,
    external_data: bool | None = None,
    on_component: Callable[[str, ExportedComponent | None], None] | None = None,
    on_bytes: Callable[[str, int, int], None] | None = None,
    replace: bool | None = None,
    native_attention: bool = False,
) -> ExportFolder:
    """Export `components` of `source` (default: every component of its family) into `out_dir` and keep
    `manifest.json` in step after each one. `replace`: None updates the folder graph by graph (what `build`
    does); False refuses a folder holding graphs of another checkpoint, dtype or bounds; True removes the
    folder's graphs first (`export --replace`; see target_folder). `native_attention`: ONNX's Attention and
    RMSNormalization in the graphs (opset ≥ 23, TensorRT ≥ 10.15: `export/native_ops.py`)."""
    components = list(components or source.components)
    unknown = [name for name in components if name not in KNOWN_COMPONENTS]
    if unknown:
        raise FluxExportError(
            f"unknown component {unknown[0]!r}: choose from {', '.join(KNOWN_COMPONENTS)} (--components)"
        )
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise FluxExportError(f"opset {opset} is outside {MIN_OPSET}..{MAX_OPSET} (--opset)")
    if native_attention:
        require_native_opset(opset)
    torch_dtype(dtype)
    bounds = bounds or ExportBounds.for_model(source)
    specs = component_specs(source, bounds)
    foreign = [name for name in components if name not in specs]
    if foreign:
        raise FluxExportError(
            f"{source.family.title} has no component {foreign[0]!r}: choose from {', '.join(specs)} (--components)"
        )
    out_dir = Path(out_dir)
    if replace is not None:
        prepare_export_folder(out_dir, source, dtype, bounds, replace)
    folder = open_folder_for(source, out_dir, dtype, bounds)
    folder.dtype = dtype
    for name in components:
        if on_component:
            on_component(name, None)
        progress = (lambda done, total, name=name: on_bytes(name, done, total)) if on_bytes else None
        exported = export_component(source, specs[name], out_dir, dtype, opset, external_data, on_bytes=progress,
                                    native_attention=native_attention)  # fmt: skip
        folder.components[name] = graph_record(specs[name], exported, opset)
        folder.write()
        if on_component:
            on_component(name, exported)
    return folder
