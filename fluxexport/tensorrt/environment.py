"""What the host offers: TensorRT's bindings, the GPU and its compute capability; clear refusals otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from fluxexport.errors import FluxExportError

FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores
TENSORRT_HELP = (
    "build inside the Dockerfile's NGC image (docker build -t fluxexport .), or `pip install tensorrt` on a "
    "Linux CUDA host (its libraries come from NVIDIA's package index)"
)


def import_tensorrt() -> ModuleType:
    """The tensorrt module, or a one-line error that says how to get it. Typed code calls it to refuse
    clearly, then imports `tensorrt` itself, which tensorrt-stubs types (tests/test_typing.py).

    A `tensorrt` folder with only type stubs (what `pip install tensorrt-stubs` leaves) imports as an empty
    namespace package: that is not TensorRT either."""
    try:
        import tensorrt
    except ImportError:
        raise FluxExportError(f"TensorRT is not installed: {TENSORRT_HELP}") from None
    except OSError as error:  # the bindings are there, NVIDIA's libraries are not
        raise FluxExportError(f"TensorRT's libraries cannot be loaded ({error}): {TENSORRT_HELP}") from None
    if not isinstance(getattr(tensorrt, "__version__", None), str):
        raise FluxExportError(f"TensorRT is not installed (only its type stubs are): {TENSORRT_HELP}")
    return tensorrt


def tensorrt_version(trt: ModuleType) -> tuple[int, ...]:
    """TensorRT's version as numbers, e.g. (10, 13, 0, 35), for the guards of newer calls."""
    return tuple(int(part) for part in trt.__version__.split(".") if part.isdigit())


MIN_TENSORRT = (10, 1)  # the _v2 device-memory queries, set_device_memory, execute_async_v3 by name


# ONNX's own ops (opset 23) that newer ONNX parsers map to TensorRT's native layers: the first TensorRT whose
# parser takes each, and where that is written (read, not run: no TensorRT ≥ 10.14 has parsed one here yet).
# torch writes Attention and RMSNormalization (export --native-attention); onnxscript's optimizer fuses a text
# encoder's rotary embedding into RotaryEmbedding at opset 23 with or without the flag.
_RELEASE_10_14 = 'onnx/onnx-tensorrt#1043 (10.14-GA release): "Added support for the Attention operator"'
_RELEASE_10_15 = (
    'onnx/onnx-tensorrt#1048 (10.15-GA release): "Added support for RotaryEmbedding, RMSNormalization and '
    'TensorScatter"'
)
NATIVE_OP_TENSORRT: dict[str, tuple[tuple[int, int], str]] = {
    "Attention": ((10, 14), _RELEASE_10_14),
    "RMSNormalization": ((10, 15), _RELEASE_10_15),
    "RotaryEmbedding": ((10, 15), _RELEASE_10_15),
}
NATIVE_OPS = tuple(NATIVE_OP_TENSORRT)

# TensorRT's own operators (ONNX domain `trt`, as ModelOpt exports them), keyed `domain::op` as check reports
# them: the first TensorRT whose ONNX parser maps each to its layer, and where that is written (read, not run).
TENSORRT_DOMAIN_OPS: dict[str, tuple[tuple[int, int], str]] = {
    "trt::TRT_FP4DynamicQuantize": (
        (10, 8),
        "TensorRT's operator docs (DynamicQuantize: IDynamicQuantizeLayer, FP4 since 10.8) and ModelOpt's "
        "modelopt/onnx/export/nvfp4_exporter.py (quantize/nvfp4.py)",
    ),
}


def tensorrt_for(ops) -> tuple[int, int] | None:
    """The oldest TensorRT whose ONNX parser takes every native op among `ops` (None: none of them is native)."""
    versions = [NATIVE_OP_TENSORRT[name][0] for name in ops if name in NATIVE_OP_TENSORRT]
    return max(versions) if versions else None


def version_text(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def native_op_refusal(graphs: dict, version: tuple[int, ...], version_name: str) -> str | None:
    """The one-line refusal for building `graphs` (component → manifest GraphRecord) with TensorRT `version` when
    one holds native ops its ONNX parser does not take (None when it parses them all)."""
    for name, graph in graphs.items():
        held = graph.extra.get("native_ops") or {}
        needed = tensorrt_for(held)
        if needed and version[:2] < needed:
            return (
                f"{name}'s graph holds ONNX {' / '.join(held)} (opset 23's own ops), which TensorRT {version_name}'s "
                f"ONNX parser does not take (needs {version_text(needed)} or newer): build with TensorRT "
                f"{version_text(needed)}+ or export again without --native-attention at the default opset"
            )
    return None


def require_tensorrt_version(trt: ModuleType) -> None:
    if tensorrt_version(trt)[:2] < MIN_TENSORRT:
        raise FluxExportError(
            f"TensorRT {trt.__version__} is too old: fluxexport needs 10.1 or newer (use a newer NGC image)"
        )


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except FluxExportError:
        return False
    return True


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int


def current_gpu(index: int = 0) -> Gpu:
    import torch

    if not torch.cuda.is_available():
        raise FluxExportError("no CUDA GPU is visible: TensorRT engines are built and run on a GPU host")
    properties = torch.cuda.get_device_properties(index)
    return Gpu(properties.name, (properties.major, properties.minor), properties.total_memory)


def require_fp8(gpu: Gpu) -> None:
    if gpu.compute_capability < FP8_MIN_COMPUTE_CAPABILITY:
        major, minor = gpu.compute_capability
        raise FluxExportError(
            f"FP8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); {gpu.name} is {major}.{minor}: "
            "build with --precision bf16"
        )
