"""TensorRT backend: engines deserialized once, one device-memory block shared by all contexts, buffers
preallocated per shape, one stream, and CUDA graphs replayed for the repeated shapes of the transformer and of
its parts (head, tail, out: what the block-skipping step caches run).

A captured CUDA graph is tied to the state of the context it was captured on (shapes, profile, addresses, device
memory): NVIDIA's guidance is one context per captured graph. So every engine has a *plain* context that runs any
shape, and each shape that repeats gets a context of its own, bound once to that shape's buffers, launched once
(the setup work TensorRT does after a shape change cannot be captured) and then captured; the graph is only
replayed on that context. All contexts share one scratch block: they run in turn on one stream. A failing capture
is reported once and the shape runs without a graph from then on.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fluxexport.artifacts.folders import open_engines
from fluxexport.artifacts.records import EngineRecord
from fluxexport.dtypes import ELEMENT_TORCH, TENSORRT_ELEMENT
from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Component, Feeds
from fluxexport.specs import TRANSFORMER_PARTS
from fluxexport.tensorrt.engines import check_engine_set, profiles_from_json
from fluxexport.tensorrt.environment import import_tensorrt, require_tensorrt_version
from fluxexport.tensorrt.profiles import select_profile
from fluxexport.tensorrt.weight_streaming import WeightBudget, automatic_budget

if TYPE_CHECKING:  # typed by tensorrt-stubs (TensorRT 10.13's API): tests/test_typing.py
    import tensorrt as trt

    from fluxexport.runtime.request import ResolvedRequest

MAX_SHAPES = 8  # shapes whose buffers (and captured context and graph) an engine keeps, least recently used out

Shapes = dict[str, tuple[int, ...]]


def torch_dtype_of(dtype: trt.DataType) -> torch.dtype:
    """A trt.DataType as torch's dtype (by member name: FLOAT, HALF, BF16, INT32, FP8, …)."""
    return ELEMENT_TORCH[TENSORRT_ELEMENT[dtype.name]]


def _create_context(engine: trt.ICudaEngine) -> trt.IExecutionContext:
    """A context without its own device memory, through the strategy overload (10.x and 11.x alike, as trtexec):
    TensorRT 11's `create_runtime_config()` object is not kept alive by the contexts made from it, which would
    use it after it is freed."""
    import tensorrt as trt

    context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    if context is None:
        raise FluxExportError("TensorRT could not create an execution context (see its log above)")
    return context


def _device_memory_size(engine: trt.ICudaEngine) -> int:
    """Scratch memory the largest profile needs, weight-streaming scratch included (the _v2 queries)."""
    if engine.num_optimization_profiles:
        return max(engine.get_device_memory_size_for_profile_v2(i) for i in range(engine.num_optimization_profiles))
    return engine.device_memory_size_v2


@dataclass
class _Captured:
    """A context bound to one shape's buffers, and the CUDA graph captured on it."""

    context: trt.IExecutionContext
    graph: Any  # torch.cuda.CUDAGraph (or the host stand-in's)


class _EngineRunner:
    """One engine: a plain context for any shape, buffers per shape and, when enabled, a context and a CUDA graph
    per repeated shape. The first call with a shape runs on the plain context; the second launches the shape on
    a context of its own and captures that launch; every later one replays the graph there: per step, only the
    input copies and one graph launch reach the GPU."""

    def __init__(self, engine: trt.ICudaEngine, name: str, entry: EngineRecord, device, use_cuda_graphs: bool):
        self.engine, self.name, self.device = engine, name, device
        self.plain = _create_context(engine)
        self.plain_profile = -1
        self.profiles = profiles_from_json(entry.profiles)
        self.inputs = entry.input_names()
        self.outputs = self.output_names = entry.output_names()  # output_names: what a step cache checks
        self.dtypes = {n: torch_dtype_of(engine.get_tensor_dtype(n)) for n in self.inputs + self.outputs}
        self.use_cuda_graphs = use_cuda_graphs
        self.file = entry.file
        self.memory: torch.Tensor | None = None
        # per shape, least recently used first: its buffers, and the context and graph captured on them
        self.buffers: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self.captured: dict[tuple, _Captured] = {}
        self.calls: dict[tuple, int] = {}
        self.uncapturable: set[tuple] = set()

    def bind_memory(self, block: torch.Tensor) -> None:
        self.memory = block
        self.plain.set_device_memory(block.data_ptr(), block.numel())
        # captured graphs point into the previous block: drop them (and their contexts), capture again later
        self.captured.clear()
        self.calls.clear()

    def _check(self, done: bool, what: str) -> None:
        if not done:
            raise FluxExportError(f"TensorRT refused to {what} for {self.name} (see its log above)")

    def _select_profile(self, context: trt.IExecutionContext, profile: int, shapes: Shapes) -> None:
        """Switch `context` to `profile`; the binding raises RuntimeError on refusal (it never returns False)."""
        try:
            done = context.set_optimization_profile_async(profile, self.device.stream_handle)
        except RuntimeError:
            done = False
        if not done:
            sizes = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
            raise FluxExportError(
                f"TensorRT refused optimization profile {profile} of {self.name} ({self.file}) for {sizes} "
                "(see its log above)"
            )

    def _bind(
        self, context: trt.IExecutionContext, shapes: Shapes, buffers: dict[str, torch.Tensor], profile: int | None
    ) -> None:
        """Set `context`'s profile (when it changes), input shapes and every tensor address, checking each."""
        if profile is not None:
            self._select_profile(context, profile, shapes)
        for name, shape in shapes.items():
            self._check(context.set_input_shape(name, shape), f"set {name} to shape {shape}")
        for name, tensor in buffers.items():
            self._check(context.set_tensor_address(name, tensor.data_ptr()), f"bind {name}")

    def _buffers(self, key: tuple, shapes: Shapes) -> dict[str, torch.Tensor]:
        """This shape's input and output buffers (outputs sized by the plain context once it holds `shapes`).
        At most MAX_SHAPES shapes keep theirs: the least recently used goes, with the graph captured on it."""
        if key in self.buffers:
            self.buffers.move_to_end(key)
            return self.buffers[key]
        while len(self.buffers) >= MAX_SHAPES:
            self._forget(next(iter(self.buffers)))
        buffers = {n: self.device.empty(s, self.dtypes[n]) for n, s in shapes.items()}
        for name in self.outputs:
            dims = self.plain.get_tensor_shape(name)  # trt.Dims: indexable, not iterable by its stubs
            buffers[name] = self.device.empty(tuple(dims[a] for a in range(len(dims))), self.dtypes[name])
        self.buffers[key] = buffers
        return buffers

    def _forget(self, key: tuple) -> None:
        """Free a shape's buffers, its captured context and graph (they point into those buffers) and its count."""
        self.buffers.pop(key, None)
        self.captured.pop(key, None)
        self.calls.pop(key, None)

    def _launch(self, context: trt.IExecutionContext) -> None:
        if not context.execute_async_v3(self.device.stream_handle):
            raise FluxExportError(f"TensorRT failed to run {self.name} (see its log above)")

    def _run_plain(self, key: tuple, shapes: Shapes, profile: int) -> dict[str, torch.Tensor]:
        changed = profile != self.plain_profile
        self._bind(self.plain, shapes, {}, profile if changed else None)
        self.plain_profile = profile
        buffers = self._buffers(key, shapes)
        self._bind(self.plain, {}, buffers, None)
        return buffers

    def _capture(self, key: tuple, shapes: Shapes, profile: int, buffers: dict[str, torch.Tensor]) -> None:
        """Launch `shapes` on a context of its own (this call's result), then capture one more launch of it. A
        capture that fails, or a context that cannot be set up for it, is reported once; the shape then runs on the
        plain context."""
        failure = None
        try:
            context = _create_context(self.engine)
            assert self.memory is not None, "bind_memory comes before any call"
            context.set_device_memory(self.memory.data_ptr(), self.memory.numel())
            self._bind(context, shapes, buffers, profile)
            self._launch(context)  # TensorRT's setup work for these shapes happens here, outside the capture
            with self.device.capture() as holder:
                if not context.execute_async_v3(self.device.stream_handle):
                    failure = "execute_async_v3 failed inside the capture"
                    raise RuntimeError(failure)
        except Exception as error:  # noqa: BLE001 - any CUDA or TensorRT refusal ends capturing for this shape
            self.uncapturable.add(key)
            warnings.warn(
                f"{self.name}: no CUDA graph for shapes {tuple(shapes.values())} ({failure or error}); "
                "running them without one",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self.captured[key] = _Captured(context, holder.graph)

    def __call__(self, feeds: Feeds) -> Feeds:
        present = [name for name in self.inputs if name in feeds]
        shapes = {name: tuple(feeds[name].shape) for name in present}
        key = tuple(shapes.values())
        with self.device.on_stream():
            captured = self.captured.get(key)
            if captured is not None:
                self.buffers.move_to_end(key)
                buffers = self.buffers[key]
                for name in present:
                    buffers[name].copy_(feeds[name], non_blocking=True)
                captured.graph.replay()
            else:
                profile = select_profile(self.profiles, shapes, self.name)
                calls = self.calls[key] = self.calls.get(key, 0) + 1
                capture = self.use_cuda_graphs and calls >= 2 and key not in self.uncapturable
                buffers = self._run_plain(key, shapes, profile)
                for name in present:
                    buffers[name].copy_(feeds[name], non_blocking=True)
                if capture:
                    self._capture(key, shapes, profile, buffers)
                if key not in self.captured:  # not captured (or the capture failed): the plain launch
                    self._launch(self.plain)
            # copies: the buffers are overwritten by the next call with this shape
            return {name: buffers[name].to(torch.float32, copy=True) for name in self.outputs}


def _resident_with(name: str) -> tuple[str, ...]:
    """The engines `--low-vram` keeps in memory beside `name`'s: the transformer's parts hold each other (First
    Block Cache and MagCache run all of them at every step; together they are the transformer's size)."""
    return TRANSFORMER_PARTS if name in TRANSFORMER_PARTS else (name,)


class TensorRTBackend:
    """Runs a folder of engines built by `fluxexport build`; the runtime's tensors stay on the GPU.

    `weight_streaming_budget`: engines built with `--weight-streaming` keep that much of their weights on the
    GPU and stream the rest from host memory on each launch (no CUDA graphs then: such launches cannot be
    captured). `device`: the CUDA calls (`tensorrt/cuda.CudaDevice` on GPU hosts)."""

    name = "tensorrt"

    def __init__(
        self,
        source: ModelSource,
        engines: Path,
        cuda_graphs: bool = True,
        low_vram: bool = False,
        weight_streaming_budget: WeightBudget | None = None,
        device=None,
    ):
        import_tensorrt()
        import tensorrt as trt

        require_tensorrt_version(trt)
        self.source, self.engines = source, Path(engines)
        self.folder = open_engines(self.engines)
        if device is None:
            from fluxexport.tensorrt.cuda import CudaDevice

            device = CudaDevice()
        self.cuda = device
        check_engine_set(self.folder, trt.__version__, device.gpu())
        self.folder.check_made_from(source)
        if weight_streaming_budget is not None and not self.folder.weight_streaming:
            raise FluxExportError(
                f"the engines in {self.engines} were built without --weight-streaming: rebuild them with "
                "fluxexport build --weight-streaming, or run without --weight-streaming-budget"
            )
        self.device = device.torch_device
        self.cuda_graphs = cuda_graphs
        self.low_vram = low_vram  # keep one engine in memory at a time
        self.weight_streaming_budget = weight_streaming_budget
        self.streamed: dict[str, tuple[int, int]] = {}  # component → (budget, streamable bytes), as set
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.runners: dict[str, _EngineRunner] = {}
        self.shared_memory: torch.Tensor | None = None

    def check_request(self, resolved: ResolvedRequest) -> None:
        """Refuse, before any work, FLUX.2 references past the reference budget these engines were built for
        (`generate` asks, through `runtime.backend.check_request`)."""
        from fluxexport.specs import check_folder_serves

        check_folder_serves(self.source, self.folder, resolved)

    def _set_budget(self, name: str, engine: trt.ICudaEngine) -> bool:
        """Apply the weight-streaming budget before any context exists; True when weights are streamed. `auto` is
        computed here from the GPU's free memory, less the engine's scratch memory (streaming scratch included) and
        a margin for buffers: the binding's `get_weight_streaming_automatic_budget` returns TensorRT's budget cast
        to int32, so every budget ≥ 2 GiB comes back wrapped."""
        if self.weight_streaming_budget is None:
            return False
        streamable = engine.streamable_weights_size
        if streamable <= 0:
            return False  # nothing of this engine streams (e.g. a tiny text encoder)
        available = 0
        if self.weight_streaming_budget.kind == "auto":
            scratch = _device_memory_size(engine) + engine.weight_streaming_scratch_memory_size
            held = 0 if self.shared_memory is None else self.shared_memory.numel()  # the block grows to `scratch`
            available = automatic_budget(self.cuda.free_memory(), max(scratch - held, 0))
        budget = self.weight_streaming_budget.bytes_for(streamable, available)
        engine.weight_streaming_budget_v2 = budget
        if engine.weight_streaming_budget_v2 != budget:
            raise FluxExportError(f"TensorRT refused a weight-streaming budget of {budget} bytes for {name}")
        self.streamed[name] = (budget, streamable)
        return budget < streamable

    def _load(self, name: str) -> _EngineRunner:
        record = self.folder.components.get(name)
        if record is None:
            raise FluxExportError(
                f"{self.engines} has no {name} engine: run fluxexport build --model {self.folder.model.name} "
                f"--precision {self.folder.precision} --components {name} --out {self.engines}"
            )
        engine = self.runtime.deserialize_cuda_engine((self.engines / record.file).read_bytes())
        if engine is None:
            raise FluxExportError(f"TensorRT cannot deserialize {record.file}: rebuild it")
        streaming = self._set_budget(name, engine)
        # CUDA graphs pay off for the transformer and its parts (what the block-skipping caches run), each called
        # once per step with the same shapes; a launch that streams weights cannot be captured
        graphs = self.cuda_graphs and name in ("transformer", *TRANSFORMER_PARTS) and not streaming
        return _EngineRunner(engine, name, record, self.cuda, graphs)

    def _share_memory(self, runner: _EngineRunner) -> None:
        """One device block, as large as the largest engine needs, backs every context: they run in turn
        on one stream, so they never need their scratch memory at the same time."""
        needed = _device_memory_size(runner.engine)
        if self.shared_memory is None or self.shared_memory.numel() < needed:
            self.shared_memory = self.cuda.memory_block(needed)
            for other in self.runners.values():
                other.bind_memory(self.shared_memory)
        runner.bind_memory(self.shared_memory)

    def close(self) -> None:
        """Free every engine, context and the shared device memory."""
        self.runners.clear()
        self.shared_memory = None
        self.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def component(self, name: str) -> Component:
        if name not in self.runners:
            if self.low_vram and not set(self.runners) <= set(_resident_with(name)):
                # engines are freed with their runners (graphs and contexts first); the transformer's parts stay
                # together, as the transformer would: a step cache runs all of them at every step
                self.runners.clear()
                self.shared_memory = None
                self.cuda.empty_cache()
            runner = self._load(name)
            self._share_memory(runner)
            self.runners[name] = runner
        return self.runners[name]
