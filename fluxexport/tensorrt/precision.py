"""Per-component precision policy for engines, and which exported graph each engine is built from.

Networks are strongly typed, so an engine's precision is its ONNX graph's: building `fp8` means building the
transformer, whole and in parts, from the FP8 Q/DQ graphs (`transformer.fp8.onnx`, `transformer_head.fp8.onnx`,
…, beside the bf16 ones) and the rest from bf16 graphs, so one export folder builds both engine sets. `nvfp4`
likewise builds the transformer from `quantize --precision nvfp4`'s graphs (`transformer.nvfp4.onnx`, …), and only
on Blackwell (compute capability 10.0 and newer: FP4 tensor cores).
"""

from __future__ import annotations

from fluxexport.artifacts.folders import FP8_COMPONENTS, ExportFolder
from fluxexport.artifacts.records import GraphRecord
from fluxexport.dtypes import ENGINE_PRECISIONS, component_precision
from fluxexport.errors import FluxExportError
from fluxexport.specs import TRANSFORMER_PARTS

NVFP4_MIN_COMPUTE_CAPABILITY = (10, 0)  # Blackwell (B200, GB200, RTX 50): FP4 tensor cores


def require_nvfp4(name: str, compute_capability: tuple[int, int]) -> None:
    """Refuse NVFP4 engines on a GPU below compute capability 10.0, in one line."""
    if tuple(compute_capability) < NVFP4_MIN_COMPUTE_CAPABILITY:
        major, minor = compute_capability
        raise FluxExportError(
            f"NVFP4 needs compute capability 10.0 or newer (Blackwell: B200, RTX 50); {name} is {major}.{minor}: "
            "build with --precision fp8 or bf16"
        )


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
    """The graph each wanted engine is built from: the FP8 (or NVFP4) transformer and parts, beside the base ones,
    for fp8 (nvfp4)."""
    if "nvfp4" not in wanted.values():
        return folder.graphs(fp8="fp8" in wanted.values())
    chosen = {name: graph for name, graph in folder.graphs(fp8=False).items() if name not in FP8_COMPONENTS}
    return chosen | {name: graph for name, graph in folder.nvfp4.items() if name in FP8_COMPONENTS}


def quantize_command(folder: ExportFolder, component: str, precision: str = "fp8") -> str:
    """The command that makes `component`'s FP8 (or NVFP4) graph in `folder`."""
    parts = " --transformer-parts" if component in TRANSFORMER_PARTS else ""
    nvfp4 = " --precision nvfp4" if precision == "nvfp4" else ""
    return f"fluxexport quantize --model {folder.model.name}{nvfp4}{parts} --out {folder.path}"


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
        quantized = dtype in ("fp8", "nvfp4")
        fix = quantize_command(folder, name, dtype) if quantized else export_command(folder, name, dtype)
        if graph is None:
            problems.append(f"{name}: no graph in {folder.path} (run {fix})")
        elif graph.dtype != dtype:
            problems.append(f"{name}: the graph is {graph.dtype}, a {dtype} engine needs a {dtype} graph (run {fix})")
    return problems
