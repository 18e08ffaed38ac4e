"""Export components to ONNX with dynamo: dynamic axes from the specs, checked and cleaned, written atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fluxexport.adapters import build_adapter
from fluxexport.artifacts.files import file_sha256, library_versions, now
from fluxexport.artifacts.folders import ExportFolder, new_export
from fluxexport.artifacts.records import GraphRecord, TensorRecord, WeightOrigin
from fluxexport.dtypes import component_precision, element_type, torch_dtype
from fluxexport.errors import FluxExportError
from fluxexport.export import graph as passes
from fluxexport.export.streaming import streamed_program, surviving_origins
from fluxexport.export.target_folder import prepare_export_folder
from fluxexport.models.source import ModelSource
from fluxexport.specs import KNOWN_COMPONENTS, ComponentSpec, ExportBounds, component_specs, sample_inputs

if TYPE_CHECKING:
    import onnx_ir as ir

DEFAULT_OPSET = 20  # the newest opset TensorRT 10.1's ONNX parser documents (see data/tensorrt_onnx_ops.json)
MIN_OPSET, MAX_OPSET = 18, 23  # what torch's dynamo exporter emits
PROTOBUF_LIMIT = 2**31 - 2**24  # weights are never inline near protobuf's 2 GiB message limit
# Weights go to `<stem>.onnx_data` past this size unless asked otherwise. An inline graph is one protobuf message
# that every reader (onnx.load, the checker, shape inference, ONNX Runtime, TensorRT's parser) parses, and often
# copies, whole: a 1.37 GB bf16 transformer inline peaks at 4.6 GB RSS in `export` (and took 7.2 GB in `check`
# before it skipped weights), against 0.76 GB with its weights beside it (scripts/bench_scale.py --steps check).
# Every real FLUX component is well above 32 MiB (the smallest, the VAE encoder, holds 34M parameters: 69 MB in
# 16 bits); below it the copies cost little and one self-contained file is handier (tiny models, tests).
EXTERNAL_DATA_THRESHOLD = 32 * 2**20


def weights_external(weight_bytes: int, external_data: bool | None = None) -> bool:
    """Whether a graph with `weight_bytes` of initializers keeps them in a data file beside it: as asked
    (`--external-data` True, `--inline-weights` False), else past EXTERNAL_DATA_THRESHOLD."""
    return weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data


@dataclass(frozen=True)
class ExportedComponent:
    name: str
    path: Path
    dtype: str
    seconds: float
    nodes: int
    weight_bytes: int
    external_data: str | None
    notes: tuple[str, ...] = ()
    weights: dict[str, WeightOrigin] | None = None  # initializer → its checkpoint tensor (streamed exports)


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


def _export_program(
    module: torch.nn.Module, spec: ComponentSpec, feeds, opset: int, translations: dict | None, optimize: bool = True
):
    with torch.no_grad():
        return torch.onnx.export(
            module,
            tuple(feeds.values()),
            dynamo=True,
            dynamic_shapes=dynamic_shapes(spec),
            input_names=[tensor.name for tensor in spec.inputs],
            output_names=[tensor.name for tensor in spec.outputs],
            opset_version=opset,
            optimize=optimize,  # onnxscript optimizer: constant folding, dead-node removal
            custom_translation_table=translations,
            verbose=False,
        )


def export_component(
    source: ModelSource,
    spec: ComponentSpec,
    out_dir: Path,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    module: torch.nn.Module | None = None,
    translations: dict | None = None,
    notes: Sequence[str] = (),
    streaming: bool = True,
    on_bytes: Callable[[int, int], None] | None = None,
    graph_pass: Callable[[ir.Model], str | None] | None = None,
    prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    stem: str | None = None,
) -> ExportedComponent:
    """Export one component into `out_dir/<stem>.onnx` (+ `.onnx_data`; the stem is the component's name unless
    given), replacing any older file atomically.

    By default the weights stream from the checkpoint (`export/streaming.py`: the model is never held in
    memory); `streaming=False` loads the model and exports it in memory. `prepare` rewrites the module before
    it is traced, in both modes (the FP8 fake quantization); `module` replaces the adapter altogether (in
    memory); `translations` maps custom ops to ONNX functions.
    `on_bytes(written, total)` follows the weights as they are written; `graph_pass` rewrites the graph
    before it is written (and returns a note for the manifest, or None)."""
    import onnx
    import onnx_ir as ir

    start = time.perf_counter()
    compute, note = component_precision(spec.name, dtype)
    feeds = sample_inputs(spec, spec.export_sizes, torch_dtype(compute))
    try:
        origins: dict | None = {} if module is None and streaming else None
        if origins is not None:
            model: ir.Model = streamed_program(
                source, spec, torch_dtype(compute),
                lambda adapter, optimize: _export_program(adapter, spec, feeds, opset, translations, optimize),
                prepare, origins,
            )  # fmt: skip
        else:
            module = module or build_adapter(spec, source, torch_dtype(compute), prepare)
            model = _export_program(module, spec, feeds, opset, translations).model
    except FluxExportError:
        raise
    except Exception as error:  # torch.export's errors are pages long: keep the first line, point to the cause
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise FluxExportError(f"exporting {spec.name} failed: {first}") from error
    passes.strip_exporter_metadata(model)
    passes.name_axes_from_spec(model, spec)
    passes.check_io_dtypes(model, spec, compute)
    doubles = passes.double_tensors(model)
    if doubles:
        raise FluxExportError(
            f"{spec.name}: the graph holds float64 tensors ({', '.join(doubles[:3])}); TensorRT has no DOUBLE"
        )
    notes = [*notes, note] if note else list(notes)
    if compute == "bf16" and (count := passes.wrap_bf16_resize_in_casts(model)):
        notes.append(f"{count} BF16 Resize nodes wrapped in fp32 casts")
    if graph_pass is not None and (pass_note := graph_pass(model)):
        notes.append(pass_note)
    weights = surviving_origins(model, origins) if origins is not None else None
    weight_bytes = sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value)
    external = weights_external(weight_bytes, external_data)
    if not external and weight_bytes > PROTOBUF_LIMIT:
        raise FluxExportError(
            f"{spec.name}: {weight_bytes / 1e9:.2f} GB of weights cannot be inline in one ONNX protobuf (2 GB at "
            "most): drop --inline-weights"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    check_free_space(out_dir, weight_bytes)
    stem = stem or spec.name
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".staging-{stem}-"))
    try:
        graph_file = staging / f"{stem}.onnx"
        data_name = f"{stem}.onnx_data" if external else None
        written = [0]

        def progress(tensor, _info) -> None:
            written[0] += tensor.nbytes
            if on_bytes:
                on_bytes(written[0], weight_bytes)

        ir.save(model, graph_file, external_data=data_name, callback=progress if data_name else None)
        if on_bytes:
            on_bytes(weight_bytes, weight_bytes)
        onnx.checker.check_model(str(graph_file), full_check=False)
        if not external:  # a stale data file of an earlier external-data export must not linger
            (out_dir / f"{stem}.onnx_data").unlink(missing_ok=True)
        if data_name:
            os.replace(staging / data_name, out_dir / data_name)
        os.replace(graph_file, out_dir / graph_file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportedComponent(
        spec.name, out_dir / f"{stem}.onnx", compute, time.perf_counter() - start, model.graph.num_nodes(),
        weight_bytes, data_name, tuple(notes), weights,
    )  # fmt: skip


def check_free_space(folder: Path, needed: int, margin: float = 1.05) -> None:
    """Refuse before writing when `folder`'s file system cannot hold `needed` bytes (and 5% to spare)."""
    free = shutil.disk_usage(folder).free
    if free < needed * margin:
        raise FluxExportError(
            f"not enough disk space in {folder}: the graph needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are "
            "free: free some space or export to another --out"
        )


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
        | extra,
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
) -> ExportFolder:
    """Export `components` of `source` (default: every component of its family) into `out_dir` and keep
    `manifest.json` in step after each one. `replace`: None updates the folder graph by graph (what `build`
    does); False refuses a folder holding graphs of another checkpoint, dtype or bounds; True removes the
    folder's graphs first (`export --replace`; see target_folder)."""
    components = list(components or source.components)
    unknown = [name for name in components if name not in KNOWN_COMPONENTS]
    if unknown:
        raise FluxExportError(
            f"unknown component {unknown[0]!r}: choose from {', '.join(KNOWN_COMPONENTS)} (--components)"
        )
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise FluxExportError(f"opset {opset} is outside {MIN_OPSET}..{MAX_OPSET} (--opset)")
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
        exported = export_component(source, specs[name], out_dir, dtype, opset, external_data, on_bytes=progress)
        folder.components[name] = graph_record(specs[name], exported, opset)
        folder.write()
        if on_component:
            on_component(name, exported)
    return folder
