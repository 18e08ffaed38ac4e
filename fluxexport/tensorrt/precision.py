"""Per-component precision policy for engines, and which exported graph each engine is built from.

Networks are strongly typed, so an engine's precision is its ONNX graph's: building `fp8` means building the
transformer, whole and in parts, from the FP8 Q/DQ graphs (`transformer.fp8.onnx`, `transformer_head.fp8.onnx`,
…, beside the bf16 ones) and the rest from bf16 graphs, so one export folder builds both engine sets.
"""

from __future__ import annotations

from fluxexport.artifacts.folders import ExportFolder
from fluxexport.artifacts.records import GraphRecord
from fluxexport.dtypes import ENGINE_PRECISIONS, component_precision
from fluxexport.errors import FluxExportError
from fluxexport.specs import TRANSFORMER_PARTS


def graph_dtypes(precision: str, components) -> dict[str, str]:
    """The graph dtype each engine is built from, by the shared precision policy (`dtypes.component_precision`):
    the transformer's parts follow the transformer."""
    if precision not in ENGINE_PRECISIONS:
        raise FluxExportError(
            f"unknown precision {precision!r}: choose one of {', '.join(ENGINE_PRECISIONS)} (--precision)"
        )
    return {name: component_precision(_policy_name(name), precision)[0] for name in components}


def _policy_name(component: str) -> str:
    return "transformer" if component in TRANSFORMER_PARTS else component


def engine_graphs(folder: ExportFolder, wanted: dict[str, str]) -> dict[str, GraphRecord]:
    """The graph each wanted engine is built from: the FP8 transformer and parts (beside the base ones) for fp8."""
    return folder.graphs(fp8="fp8" in wanted.values())


def quantize_command(folder: ExportFolder, component: str) -> str:
    """The command that makes `component`'s FP8 graph in `folder`."""
    parts = " --transformer-parts" if component in TRANSFORMER_PARTS else ""
    return f"fluxexport quantize --model {folder.model.name}{parts} --out {folder.path}"


def export_command(folder: ExportFolder, component: str, dtype: str) -> str:
    """The command that makes `component`'s `dtype` graph: into `folder` when its graphs are of that dtype, else
    a whole export of that dtype into a folder of its own (`export` never mixes dtypes in one folder)."""
    model = f"--model {folder.model.name}"
    if component_precision(component, folder.dtype)[0] == dtype:
        return f"fluxexport export {model} --components {component} --dtype {dtype} --out {folder.path}"
    return f"fluxexport export {model} --dtype {dtype} --out DIR, then build --onnx DIR"


def graph_problems(folder: ExportFolder, wanted: dict[str, str]) -> list[str]:
    """Why the exported graphs in `folder` cannot make the wanted engines, each with the command that fixes it."""
    problems = []
    graphs = engine_graphs(folder, wanted)
    for name, dtype in wanted.items():
        graph = graphs.get(name)
        fix = quantize_command(folder, name) if dtype == "fp8" else export_command(folder, name, dtype)
        if graph is None:
            problems.append(f"{name}: no graph in {folder.path} (run {fix})")
        elif graph.dtype != dtype:
            problems.append(f"{name}: the graph is {graph.dtype}, a {dtype} engine needs a {dtype} graph (run {fix})")
    return problems
