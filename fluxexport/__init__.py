"""fluxexport: FLUX.1 from PyTorch to ONNX and TensorRT, and a small runtime that runs it."""

from fluxexport.errors import FluxExportError

__version__ = "0.1.0"
__all__ = ["FluxExportError", "__version__"]
