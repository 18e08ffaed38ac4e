"""The CUDA calls the TensorRT backend makes, in one small class: buffers, one stream, CUDA-graph capture.

TensorRT's runtime takes raw device addresses and a stream handle; everything else on the GPU (allocating,
ordering, capturing a launch into a graph) is CUDA's, done here through torch. The backend talks to this class
only, so that its bookkeeping runs on any machine against a host stand-in with the same methods
(`tests/standin_tensorrt.HostDevice`)."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch

from fluxexport.tensorrt.environment import Gpu, current_gpu


class CudaDevice:
    """GPU 0 through torch: one stream for every engine, so engines sharing one scratch block never overlap."""

    def __init__(self) -> None:
        self.torch_device = torch.device("cuda")
        self.stream = torch.cuda.Stream()
        self.stream_handle = self.stream.cuda_stream

    def gpu(self) -> Gpu:
        return current_gpu()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.torch_device)

    def memory_block(self, size: int) -> torch.Tensor:
        """Device memory for contexts created USER_MANAGED (their scratch, shared between engines)."""
        return torch.empty(size, dtype=torch.uint8, device=self.torch_device)

    def free_memory(self) -> int:
        return torch.cuda.mem_get_info()[0]

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        """Work queued inside runs on the engines' stream, ordered after and before the caller's stream."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            yield
        torch.cuda.current_stream().wait_stream(self.stream)

    @contextlib.contextmanager
    def capture(self) -> Iterator[types.SimpleNamespace]:
        """Capture the launches queued inside into a CUDA graph: `holder.graph` once the block ends."""
        holder = types.SimpleNamespace(graph=None)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            yield holder
        holder.graph = graph

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()
