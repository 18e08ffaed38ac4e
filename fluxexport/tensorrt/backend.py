"""TensorRT backend: engines deserialized once, one device-memory block shared by all contexts, buffers
preallocated per shape, one stream, and CUDA graphs replayed for the transformer's repeated shapes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fluxexport.backends.base import Component, Feeds
from fluxexport.dtypes import ELEMENT_TORCH, TENSORRT_ELEMENT
from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource, made_from
from fluxexport.tensorrt.engines import check_engine_set, profiles_from_json, read_engine_manifest
from fluxexport.tensorrt.environment import current_gpu, import_tensorrt, require_tensorrt_version, tensorrt_version
from fluxexport.tensorrt.profiles import select_profile

if TYPE_CHECKING:  # typed by tensorrt-stubs (TensorRT 10.13's API): tests/test_typing.py
    import tensorrt as trt

RUNTIME_CONFIG_VERSION = (11,)  # contexts get their allocation strategy from an IRuntimeConfig


def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    """A trt.DataType as torch's dtype (by member name: FLOAT, HALF, BF16, INT32, …)."""
    return ELEMENT_TORCH[TENSORRT_ELEMENT[dtype.name]]


def _create_context(engine: trt.ICudaEngine) -> trt.IExecutionContext:
    """A context without its own device memory: from TensorRT 11 through an IRuntimeConfig, before it with
    the strategy argument (both are in the 10.13 API)."""
    import tensorrt as trt

    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    if tensorrt_version(trt) >= RUNTIME_CONFIG_VERSION:
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        return engine.create_execution_context(config)
    return engine.create_execution_context(strategy)


def _device_memory_size(engine: trt.ICudaEngine) -> int:
    """Scratch memory the largest profile needs, weight-streaming scratch included (the _v2 queries)."""
    if engine.num_optimization_profiles:
        return max(engine.get_device_memory_size_for_profile_v2(i) for i in range(engine.num_optimization_profiles))
    return engine.device_memory_size_v2


class _EngineRunner:
    """One engine and its context: buffers per input shape and, when enabled, a CUDA graph per shape.

    The first call with a shape runs normally (TensorRT does its shape-dependent setup there), the second
    captures the execution into a CUDA graph, every later one replays it: per step, only the input copies
    and one graph launch reach the GPU."""

    def __init__(
        self, engine: trt.ICudaEngine, name: str, entry: dict, stream: torch.cuda.Stream, use_cuda_graphs: bool
    ):
        self.engine, self.name, self.stream = engine, name, stream
        self.context = _create_context(engine)
        self.profiles = profiles_from_json(entry["profiles"])
        self.inputs = [t["name"] for t in entry["inputs"]]
        self.outputs = [t["name"] for t in entry["outputs"]]
        self.dtypes = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in self.inputs + self.outputs}
        self.use_cuda_graphs = use_cuda_graphs
        self.profile = -1
        self.buffers: dict[tuple, dict[str, torch.Tensor]] = {}
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.calls: dict[tuple, int] = {}

    def bind_memory(self, block: torch.Tensor) -> None:
        self.context.set_device_memory(block.data_ptr(), block.numel())
        # captured graphs point into the previous block: capture again on the new one
        self.graphs.clear()
        self.calls.clear()

    def _prepare(self, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
        key = tuple(shapes.values())
        profile = select_profile(self.profiles, shapes, self.name)
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.profile = profile
        for name, shape in shapes.items():
            self.context.set_input_shape(name, shape)
        if key not in self.buffers:
            buffers = {n: torch.empty(s, dtype=self.dtypes[n], device="cuda") for n, s in shapes.items()}
            for name in self.outputs:
                dims = self.context.get_tensor_shape(name)  # trt.Dims: indexable, not iterable by its stubs
                shape = tuple(dims[axis] for axis in range(len(dims)))
                buffers[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.buffers[key] = buffers
        for name, tensor in self.buffers[key].items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        return self.buffers[key]

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise FluxExportError(f"TensorRT failed to run {self.name}")

    def __call__(self, feeds: Feeds) -> Feeds:
        present = [name for name in self.inputs if name in feeds]
        shapes = {name: tuple(feeds[name].shape) for name in present}
        key = tuple(shapes.values())
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            buffers = self._prepare(shapes)
            for name in present:
                buffers[name].copy_(feeds[name], non_blocking=True)
            calls = self.calls[key] = self.calls.get(key, 0) + 1
            if key in self.graphs:
                self.graphs[key].replay()
            elif self.use_cuda_graphs and calls >= 2:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self._execute()
                self.graphs[key] = graph
                graph.replay()
            else:
                self._execute()
            # copies: the buffers are overwritten by the next call with this shape
            outputs = {name: buffers[name].to(torch.float32, copy=True) for name in self.outputs}
        torch.cuda.current_stream().wait_stream(self.stream)
        return outputs


class TensorRTBackend:
    """Runs a folder of engines built by `fluxexport build`; the runtime's tensors stay on the GPU."""

    name = "tensorrt"

    def __init__(self, source: ModelSource, engines: Path, cuda_graphs: bool = True, low_vram: bool = False):
        import_tensorrt()
        import tensorrt as trt

        require_tensorrt_version(trt)
        self.source, self.engines = source, Path(engines)
        self.manifest = read_engine_manifest(self.engines)
        check_engine_set(self.manifest, trt.__version__, current_gpu(), self.engines)
        if self.manifest["model"]["fingerprint"] != source.fingerprint():
            raise FluxExportError(
                f"the engines in {self.engines} were built from {made_from(self.manifest['model']['name'], source)}: "
                "pass the same --model as at build time"
            )
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream()
        self.cuda_graphs = cuda_graphs
        self.low_vram = low_vram  # keep one engine in memory at a time
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.runners: dict[str, _EngineRunner] = {}
        self.shared_memory: torch.Tensor | None = None

    def _load(self, name: str) -> _EngineRunner:
        entries = self.manifest["components"]
        if name not in entries:
            raise FluxExportError(f"{self.engines} has no {name} engine: run fluxexport build --components {name}")
        engine = self.runtime.deserialize_cuda_engine((self.engines / entries[name]["file"]).read_bytes())
        if engine is None:
            raise FluxExportError(f"TensorRT cannot deserialize {entries[name]['file']}: rebuild it")
        # CUDA graphs pay off for the transformer, called once per step with the same shapes.
        graphs = self.cuda_graphs and name == "transformer"
        return _EngineRunner(engine, name, entries[name], self.stream, graphs)

    def _share_memory(self, runner: _EngineRunner) -> None:
        """One device block, as large as the largest engine needs, backs every context: they run in turn
        on one stream, so they never need their scratch memory at the same time."""
        needed = _device_memory_size(runner.engine)
        if self.shared_memory is None or self.shared_memory.numel() < needed:
            self.shared_memory = torch.empty(needed, dtype=torch.uint8, device="cuda")
            for other in self.runners.values():
                other.bind_memory(self.shared_memory)
        runner.bind_memory(self.shared_memory)

    def close(self) -> None:
        """Free every engine, context and the shared device memory."""
        self.runners.clear()
        self.shared_memory = None
        torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def component(self, name: str) -> Component:
        if name not in self.runners:
            if self.low_vram:
                self.runners.clear()  # engines are freed with their runners
                torch.cuda.empty_cache()
            runner = self._load(name)
            self._share_memory(runner)
            self.runners[name] = runner
        return self.runners[name]
