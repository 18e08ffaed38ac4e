"""A backend by the name a user gives it: PyTorch, ONNX Runtime or TensorRT.

It sits above every backend (TensorRT's included, imported only when asked for), so no backend imports it.
"""

from __future__ import annotations

from pathlib import Path

from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Backend

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def choose_backend(name: str | None, engines: str | Path | None) -> str:
    """The backend a command runs: the one named; else the one `engines` holds (exported graphs → onnxruntime,
    TensorRT engines → tensorrt, read from its manifest); else torch. A folder with the torch backend is refused:
    torch reads the checkpoint, not the folder."""
    if name is None:
        if engines is None:
            return "torch"
        from fluxexport.artifacts.folders import TENSORRT, open_folder

        return "tensorrt" if open_folder(Path(engines)).kind == TENSORRT else "onnxruntime"
    if name == "torch" and engines is not None:
        raise FluxExportError("--engines is for --backend onnxruntime or tensorrt: drop it or pick one")
    return name


def create_backend(
    name: str,
    source: ModelSource,
    dtype: str = "fp32",
    device: str | None = None,
    engines: str | None = None,
    low_vram: bool = False,
    fp8: bool | None = None,
    optimized: bool | None = None,
    cuda_graphs: bool = True,
    weight_streaming_budget: str | None = None,
) -> Backend:
    """Build the backend a user named on the command line; TensorRT-only settings are refused elsewhere."""
    tensorrt_only = [flag for flag, given in (("--weight-streaming-budget", weight_streaming_budget is not None),
                                              ("--low-vram", low_vram), ("--no-cuda-graphs", not cuda_graphs)) if given]  # fmt: skip
    if name != "tensorrt" and tensorrt_only:
        raise FluxExportError(f"{tensorrt_only[0]} applies to --backend tensorrt only")
    if name == "torch":
        from fluxexport.pytorch.backend import TorchBackend

        return TorchBackend(source, dtype=dtype, device=device)
    if name == "onnxruntime":
        from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

        if engines is None:
            raise FluxExportError("the onnxruntime backend runs exported graphs: add --engines DIR")
        return OnnxRuntimeBackend(source, engines, fp8=fp8, optimized=optimized)
    if name == "tensorrt":
        from fluxexport.tensorrt.backend import TensorRTBackend

        if engines is None:
            raise FluxExportError("the tensorrt backend runs built engines: add --engines DIR")
        from fluxexport.tensorrt.weight_streaming import parse_budget

        budget = parse_budget(weight_streaming_budget) if weight_streaming_budget is not None else None
        return TensorRTBackend(
            source, engines, cuda_graphs=cuda_graphs, low_vram=low_vram, weight_streaming_budget=budget
        )
    raise FluxExportError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
