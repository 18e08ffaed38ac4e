"""`fluxexport export`, `check` and `upgrade`: ONNX graphs of a checkpoint, linted for TensorRT."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxexport.commands.common import ModelOptions, open_source

OnBytes = Callable[[str, int, int], None]  # (component, bytes written, bytes in all)


def ignore_bytes(_name: str, _done: int, _total: int) -> None:
    """An `OnBytes` that shows nothing."""


@dataclass(frozen=True)
class CheckResult:
    """The TensorRT check's report per graph, and the one-line refusal when one failed (None when all pass)."""

    reports: list
    failure: str | None


def check_result(reports: Sequence[Any], failed: str) -> CheckResult:
    """`reports` with the refusal naming `failed` (the graphs) when one of them fails."""
    ok = all(report.ok for report in reports)
    return CheckResult(list(reports), None if ok else f"{failed} fail the TensorRT check (see the table above)")


def check_export(folder: Path, tensorrt: str | None = None) -> CheckResult:
    """`fluxexport check`: lint every graph in `folder` for TensorRT `tensorrt` (default the bundled list's)."""
    from fluxexport.export.check import check_folder

    return check_result(check_folder(folder, tensorrt), f"graphs in {folder}")


@dataclass(frozen=True)
class ReduxExportResult:
    """What `export --redux` wrote: the folder, the Redux graphs' records, and the TensorRT check (None without)."""

    out: Path
    redux: str
    graphs: dict
    check: CheckResult | None


def export_redux_prior(
    reference: str, out: Path | None = None, opset: int | None = None, run_check: bool = True
) -> ReduxExportResult:
    """`fluxexport export --redux`: a FLUX.1 Redux prior's image encoder and embedder as ONNX graphs (fp32; the
    batch their one dynamic axis) in `out` (default engines/<prior>/onnx), then linted for TensorRT."""
    from fluxexport.artifacts.files import default_folder
    from fluxexport.export.redux import export_redux
    from fluxexport.export.trace import DEFAULT_OPSET
    from fluxexport.models.redux import resolve_redux

    redux = resolve_redux(reference)
    folder = Path(out) if out is not None else default_folder(redux.name)
    exported = export_redux(redux, folder, DEFAULT_OPSET if opset is None else opset)
    check = check_export(folder) if run_check else None
    return ReduxExportResult(folder, redux.name, exported.graphs, check)


def upgrade_folders(folders: Sequence[Path], on_folder: Callable[[Path, int], None]) -> None:
    """`fluxexport upgrade`: each folder's manifest rewritten in this fluxexport's format (`on_folder(folder,
    format)` after each)."""
    from fluxexport.artifacts.files import FORMAT
    from fluxexport.artifacts.folders import upgrade_folder

    for folder in folders:
        upgrade_folder(folder)
        on_folder(folder, FORMAT)


@dataclass(frozen=True)
class ExportOptions:
    """`fluxexport export`'s options; None means the model's default."""

    model: ModelOptions = field(default_factory=ModelOptions)
    out: Path | None = None
    components: list[str] | None = None
    dtype: str = "fp32"
    opset: int | None = None
    max_batch: int | None = None
    min_resolution: int | None = None
    max_resolution: int | None = None
    external_data: bool | None = None
    run_check: bool = True
    transformer_parts: bool = False
    replace: bool = False
    max_references: int | None = None
    max_reference_area: int | None = None
    max_reference_aspect: float | None = None
    native_attention: bool = False  # ONNX's Attention / RMSNormalization (opset ≥ 23, TensorRT ≥ 10.15)


@dataclass(frozen=True)
class ExportPlan:
    """What `run_export` will do: the checkpoint, the folder, the graphs in order, the bounds, and a note per
    graph written in another precision than asked (fp16 keeps T5 in bf16, the VAE in fp32)."""

    options: ExportOptions
    source: Any  # ModelSource
    out: Path
    names: list[str]
    bounds: Any  # specs.ExportBounds
    notes: list[str]


@dataclass(frozen=True)
class ExportedRow:
    """One graph written: its component, dtype, nodes, bytes on disk (graph and weights) and export seconds."""

    component: str
    dtype: str
    nodes: int
    bytes: int
    seconds: float


def plan_export(options: ExportOptions) -> ExportPlan:
    """Resolve the checkpoint, the bounds, the graphs and the folder; refuse (without --replace) a folder holding
    another model's, dtype's or bounds' graphs, before anything is written."""
    from fluxexport.artifacts.files import default_folder
    from fluxexport.dtypes import component_precision
    from fluxexport.export.native_ops import require_native_opset
    from fluxexport.export.target_folder import prepare_export_folder
    from fluxexport.specs import TRANSFORMER_PARTS, ExportBounds

    if options.native_attention and options.opset is not None:
        require_native_opset(options.opset)
    source = open_source(options.model)
    bounds = ExportBounds.for_model(
        source, max_batch=options.max_batch, min_resolution=options.min_resolution,
        max_resolution=options.max_resolution, max_references=options.max_references,
        max_reference_area=options.max_reference_area, max_reference_aspect=options.max_reference_aspect,
    )  # fmt: skip
    names = list(options.components or source.components)
    names += [part for part in TRANSFORMER_PARTS if options.transformer_parts and part not in names]
    out = options.out or default_folder(source.name)
    if not options.replace:  # --replace removes the graphs once the export starts
        prepare_export_folder(out, source, options.dtype, bounds)
    notes = []
    for name in names:
        _, reason = component_precision(name, options.dtype)
        if reason:
            notes.append(f"{name}: {reason}")
    return ExportPlan(options, source, out, names, bounds, notes)


@dataclass(frozen=True)
class ExportResult:
    """The graphs written, and the TensorRT check of the folder (None with --no-check)."""

    out: Path
    graphs: list[ExportedRow]
    check: CheckResult | None


def run_export(plan: ExportPlan, on_bytes: OnBytes = ignore_bytes) -> ExportResult:
    """Export `plan`'s graphs (each written atomically, the manifest kept in step), then, unless the options say
    --no-check, lint the folder for TensorRT."""
    from fluxexport.export.check import check_folder
    from fluxexport.export.native_ops import NATIVE_OPSET
    from fluxexport.export.onnx_export import DEFAULT_OPSET, export_model
    from fluxexport.tensorrt.environment import NATIVE_OPS, tensorrt_for, version_text

    options, rows = plan.options, []
    opset = options.opset or (NATIVE_OPSET if options.native_attention else DEFAULT_OPSET)
    # a graph with native ops is checked against the first TensorRT that parses them (10.15), others against 10.1
    tensorrt = version_text(tensorrt_for(NATIVE_OPS) or ()) if options.native_attention else None

    def on_component(name: str, exported) -> None:
        if exported is None:  # the bar starts with the first weight written: its rate is the write rate
            return
        on_bytes(name, exported.weight_bytes, exported.weight_bytes)
        size = exported.path.stat().st_size + (
            exported.path.with_name(exported.external_data).stat().st_size if exported.external_data else 0
        )
        rows.append(ExportedRow(name, exported.dtype, exported.nodes, size, exported.seconds))

    export_model(
        plan.source, plan.out, plan.names, options.dtype, opset, plan.bounds,
        options.external_data, on_component, on_bytes, options.replace, options.native_attention,
    )  # fmt: skip
    check = check_result(check_folder(plan.out, tensorrt), f"graphs in {plan.out}") if options.run_check else None
    return ExportResult(plan.out, rows, check)
