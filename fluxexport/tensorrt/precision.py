"""Per-component precision policy for engines, and which exported graph each engine is built from.

Networks are strongly typed, so an engine's precision is its ONNX graph's: building `fp8` means building the
transformer from the FP8 Q/DQ graph (`transformer.fp8.onnx`, beside the bf16 one) and the rest from bf16
graphs, so one export folder builds both engine sets.
"""

from __future__ import annotations

from fluxexport.dtypes import ENGINE_PRECISIONS, component_precision
from fluxexport.errors import FluxExportError
from fluxexport.export.manifest import graph_entries


def graph_dtypes(precision: str, components) -> dict[str, str]:
    """The graph dtype each engine is built from, by the shared precision policy (`dtypes.component_precision`)."""
    if precision not in ENGINE_PRECISIONS:
        raise FluxExportError(
            f"unknown precision {precision!r}: choose one of {', '.join(ENGINE_PRECISIONS)} (--precision)"
        )
    return {name: component_precision(name, precision)[0] for name in components}


def engine_graphs(manifest: dict, wanted: dict[str, str]) -> dict[str, dict]:
    """The graph each wanted engine is built from: the FP8 transformer (beside the base one) for fp8."""
    return graph_entries(manifest, fp8=wanted.get("transformer") == "fp8")


def graph_problems(manifest: dict, wanted: dict[str, str], folder) -> list[str]:
    """Why the exported graphs in `folder` cannot make the wanted engines, each with the command that fixes it."""
    problems = []
    graphs = engine_graphs(manifest, wanted)
    for name, dtype in wanted.items():
        entry = graphs.get(name)
        fix = (
            f"fluxexport quantize --out {folder}"
            if dtype == "fp8"
            else f"fluxexport export --components {name} --dtype {dtype} --out {folder}"
        )
        if entry is None:
            problems.append(f"{name}: no graph in {folder} (run {fix})")
        elif entry["dtype"] != dtype:
            problems.append(
                f"{name}: the graph is {entry['dtype']}, a {dtype} engine needs a {dtype} graph (run {fix})"
            )
    return problems


def prepare_graphs(source, onnx_dir, precision: str, components, calibration=None, log=print) -> dict:
    """Export or quantize whatever graph the wanted engines lack (`build --precision fp8` implies `quantize`).

    Graphs already of the right dtype are kept; others are (re)written in `onnx_dir` by the same export and
    quantize code as the commands. Returns the folder's manifest afterwards."""
    from pathlib import Path

    from fluxexport.export.manifest import read_manifest
    from fluxexport.export.onnx_export import export_model
    from fluxexport.quantize.qdq_export import quantize_transformer

    onnx_dir = Path(onnx_dir)
    wanted = graph_dtypes(precision, components)
    manifest = read_manifest(onnx_dir) if (onnx_dir / "manifest.json").is_file() else {"components": {}}
    present = engine_graphs(manifest, wanted)
    stale = {name: dtype for name, dtype in wanted.items() if present.get(name, {}).get("dtype") != dtype}
    exports: dict[str, list[str]] = {}
    for name, dtype in stale.items():
        if dtype != "fp8":  # the FP8 transformer comes from quantize, below
            exports.setdefault(dtype, []).append(name)
    for dtype, names in exports.items():
        log(f"exporting {', '.join(names)} as {dtype} into {onnx_dir}")
        export_model(source, onnx_dir, names, dtype)
    if stale.get("transformer") == "fp8":
        log(f"calibrating and quantizing the transformer to FP8 into {onnx_dir}")
        quantize_transformer(source, onnx_dir, calibration, base_dtype="bf16")
    return read_manifest(onnx_dir)
