"""A stand-in for TensorRT (and for the CUDA stream/graph calls around it) that runs on CPU.

It replaces only what TensorRT and CUDA themselves do, behind the calls of TensorRT's documented Python API that
polygraphy's loaders and our code make: parsing an ONNX file into a network, `build_serialized_network`, the
runtime (engines, execution contexts, profiles, tensor addresses, device memory, weight streaming) and the
Refitter. Everything around those calls is the real code: our builder drives polygraphy's real
`NetworkFromOnnxPath` / `CreateConfig` / `EngineBytesFromNetwork`, and our backend, refit, validation and Triton
writer read the folders that build wrote.

What an "engine" is here: the ONNX graph itself (external data read in), its I/O, profiles and builder flags,
serialized into the plan. A context runs it with ONNX Runtime on the bytes behind the addresses it was given,
with the shapes it was set to, and writes the outputs behind the output addresses — so a wrong address, shape or
profile gives a wrong answer, as on a GPU. bf16 graphs run upcast to float32 (ONNX Runtime has no bf16 kernels).

CUDA graphs are modelled on what NVIDIA documents about them: a captured launch keeps the addresses, shapes,
profile and device memory of its context at capture; replayed after the same context ran other shapes, another
profile or another memory block, it computes garbage (NaN here, counted in `stale_replays`). The first launch
after a shape change does setup work that cannot be captured (trtexec launches once before each capture), and a
launch that streams weights is not capturable either.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import json
import struct
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

PLAN_MAGIC = b"FLUXEXPORT-STANDIN-PLAN\n"

# ONNX element type → (DataType member name, bytes per element)
_ONNX_TO_TRT = {
    onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.FLOAT8E4M3FN: "FP8", onnx.TensorProto.INT8: "INT8",
}  # fmt: skip
_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
          "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8, "FP8": torch.float8_e4m3fn,
          "INT8": torch.int8}  # fmt: skip


class Dims(tuple):
    """trt.Dims: a shape, indexable and sized."""


class HostMemory(bytes):
    """trt.IHostMemory: a buffer (the bytes here) that also works as a context manager (polygraphy saves timing
    caches that way). The real one has no `__bytes__`: `bytes(memory)` copies it through the buffer protocol, a
    second host copy of a plan (≈ 24 GB for FLUX.1-dev's bf16 transformer); here every such copy is counted in
    `copies`, so a test can see it."""

    copies = 0  # bytes(...) of any HostMemory since the module was made (make_tensorrt resets it)

    def __bytes__(self) -> bytes:
        type(self).copies += 1
        return bytes(memoryview(self))

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        return False

    @property
    def nbytes(self) -> int:
        return len(self)


def _tensor_at(address: int, shape: tuple[int, ...], dtype_name: str) -> torch.Tensor:
    """A copy of the tensor behind a host address (what a kernel would read from device memory)."""
    dtype = _TORCH[dtype_name]
    count = int(np.prod(shape)) if shape else 1
    size = count * torch.empty((), dtype=dtype).element_size()
    raw = bytes((ctypes.c_uint8 * size).from_address(address))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def _write_at(address: int, tensor: torch.Tensor) -> None:
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    ctypes.memmove(address, data, len(data))


@dataclass
class StandInState:
    """What a test can inspect after a run: launches, captures, replays and what went wrong."""

    launches: int = 0
    captures: int = 0
    replays: int = 0
    stale_replays: int = 0
    failed_captures: int = 0
    contexts_created: int = 0
    live_engines: int = 0
    errors: list[str] = field(default_factory=list)
    capturing: list | None = None  # the launches recorded while a CUDA graph is being captured
    fail_launches: int = 0  # make the next N launches fail (execute_async_v3 returns False)
    # TensorRT's automatic weight-streaming budget before the binding's int32 cast (None: half the streamable size)
    automatic_budget: int | None = None
    streamable_bytes: int | None = None  # what engines built WEIGHT_STREAMING report streamable (None: their weights)
    freed_runtime_configs: int = 0


def make_tensorrt(version: str = "10.13.0.35") -> types.ModuleType:
    """A fresh `tensorrt` module (its own state in `.state`), to put in sys.modules for a test."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    state = StandInState()
    HostMemory.copies = 0
    trt.state = state

    class DataType(enum.IntEnum):
        FLOAT, HALF, INT8, INT32, BOOL, UINT8, FP8, BF16, INT64, INT4 = range(10)

    class TensorIOMode(enum.IntEnum):
        NONE, INPUT, OUTPUT = range(3)

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH, STRONGLY_TYPED = 0, 5

    class BuilderFlag(enum.IntEnum):
        FP16, BF16, INT8, DEBUG, GPU_FALLBACK, REFIT, DISABLE_TIMING_CACHE, TF32, SPARSE_WEIGHTS = range(9)
        FP8, STRIP_PLAN, REFIT_IDENTICAL, WEIGHT_STREAMING, REFIT_INDIVIDUAL = 20, 21, 22, 23, 24

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE, DLA_MANAGED_SRAM, DLA_LOCAL_DRAM, DLA_GLOBAL_DRAM, TACTIC_DRAM = range(5)

    class DeviceType(enum.IntEnum):
        GPU, DLA = range(2)

    class OnnxParserFlag(enum.IntEnum):
        NATIVE_INSTANCENORM = 0

    class ExecutionContextAllocationStrategy(enum.IntEnum):
        STATIC, ON_PROFILE_CHANGE, USER_MANAGED = range(3)

    class ILogger:
        def __init__(self):
            pass

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, severity=2):
            super().__init__()
            self.min_severity = severity

        def log(self, severity, msg):
            state.errors.append(msg)

    def error(message: str) -> None:
        state.errors.append(message)

    # ---- build --------------------------------------------------------------------------------------------------

    class ITensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype, self.is_shape_tensor = name, Dims(shape), dtype, False

    class INetworkDefinition:
        def __init__(self, flags):
            self.flags, self.inputs, self.outputs, self.path = flags, [], [], None

        def get_flag(self, flag):
            return bool(self.flags & (1 << int(flag)))

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))
        num_layers = property(lambda self: 0)

        def get_input(self, index):
            return self.inputs[index]

        def get_output(self, index):
            return self.outputs[index]

        def __iter__(self):
            return iter(())

    def _io(value) -> ITensor:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        return ITensor(value.name, dims, DataType[_ONNX_TO_TRT[value.type.tensor_type.elem_type]])

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors, self.flags = network, [], 0

        def clear_flag(self, flag):
            pass

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, index):
            return self.errors[index]

        def parse_from_file(self, path):
            try:
                graph = onnx.load(path, load_external_data=False).graph
            except Exception as failure:  # noqa: BLE001 - the parser reports any unreadable file the same way
                self.errors.append(f"cannot parse {path}: {failure}")
                return False
            self.network.path = str(path)
            self.network.inputs = [_io(value) for value in graph.input]
            self.network.outputs = [_io(value) for value in graph.output]
            return True

    class IOptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's parameter names
            self.shapes[name] = [list(min), list(opt), list(max)]

        def __bool__(self):
            return True

    class ITimingCache:
        def __init__(self, data=b""):
            self.data = bytes(data)

        def serialize(self):
            return HostMemory(self.data or b"standin-timing-cache")

        def combine(self, other, ignore_mismatch):
            return True

    class IBuilderConfig:
        def __init__(self):
            # TensorRT's default flags: TF32 is on unless cleared
            self.flag_set, self.profiles, self.pools = {BuilderFlag.TF32}, [], {}
            self.builder_optimization_level, self.DLA_core, self.default_device_type = 3, -1, DeviceType.GPU
            self.cache = None

        def set_flag(self, flag):
            self.flag_set.add(BuilderFlag(flag))

        def clear_flag(self, flag):
            self.flag_set.discard(BuilderFlag(flag))

        def get_flag(self, flag):
            return BuilderFlag(flag) in self.flag_set

        def set_memory_pool_limit(self, pool, size):
            self.pools[MemoryPoolType(pool)] = size

        def get_memory_pool_limit(self, pool):
            return self.pools.get(MemoryPoolType(pool), 0)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        num_optimization_profiles = property(lambda self: len(self.profiles))

        def create_timing_cache(self, data):
            return ITimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return INetworkDefinition(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            """The plan: the graph (weights read in) and everything the runtime needs to run it."""
            dynamic = [t.name for t in network.inputs if -1 in t.shape]
            if dynamic and not config.profiles:
                error(f"dynamic inputs {dynamic} need an optimization profile")
                return None
            for profile in config.profiles:
                for tensor in network.inputs:
                    if tensor.name not in profile.shapes:
                        error(f"profile lacks {tensor.name}")
                        return None
                    low, opt, high = profile.shapes[tensor.name]
                    fixed = all(d in (-1, a) for d, a in zip(tensor.shape, low, strict=True))
                    if not fixed or not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
                        error(f"profile shapes {low}/{opt}/{high} do not fit {tensor.name} {list(tensor.shape)}")
                        return None
            model = onnx.load(network.path)  # external data read in: the plan holds its weights
            header = {
                "version": trt.__version__,
                "inputs": [[t.name, t.dtype.name, list(t.shape)] for t in network.inputs],
                "outputs": [[t.name, t.dtype.name, list(t.shape)] for t in network.outputs],
                "profiles": [profile.shapes for profile in config.profiles],
                "flags": sorted(flag.name for flag in config.flag_set),
                "strongly_typed": network.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED),
                "optimization_level": config.builder_optimization_level,
                "memory_pools": {pool.name: size for pool, size in config.pools.items()},
                "timing_cache": config.cache.data.decode(errors="replace") if config.cache else None,
                "source": network.path,
            }
            return HostMemory(_pack(header, model.SerializeToString()))

    def init_libnvinfer_plugins(logger, namespace):
        return True

    # ---- runtime ------------------------------------------------------------------------------------------------

    class IRuntimeConfig:
        """TensorRT 11's runtime configuration. The binding does not tie its lifetime to the contexts created with
        it (`create_execution_context(runtime_config)` keeps only the engine alive): a context whose config was
        freed uses freed memory. Here such a context refuses to run, loudly."""

        def __init__(self):
            self.strategy = ExecutionContextAllocationStrategy.STATIC
            weakref.finalize(self, _config_freed, state)

        def set_execution_context_allocation_strategy(self, strategy):
            self.strategy = strategy

    class Weights:
        def __init__(self, dtype=DataType.FLOAT, ptr=0, count=0):
            self.dtype, self.ptr, self.size = dtype, ptr, count

    class ICudaEngine:
        def __init__(self, header: dict, model: onnx.ModelProto):
            self.header, self.model = header, model
            self.io = {name: (TensorIOMode.INPUT, DataType[dtype], shape) for name, dtype, shape in header["inputs"]}
            self.io |= {name: (TensorIOMode.OUTPUT, DataType[d], shape) for name, d, shape in header["outputs"]}
            self.names = list(self.io)
            self.contexts: weakref.WeakSet = weakref.WeakSet()
            streams = "WEIGHT_STREAMING" in header["flags"]
            weights = sum(_nbytes(t) for t in model.graph.initializer)
            # TensorRT may find nothing to stream in an engine built WEIGHT_STREAMING: 0 then
            self.streamable = (weights if state.streamable_bytes is None else state.streamable_bytes) if streams else 0
            self._budget = self.streamable  # TensorRT's default: stream nothing
            self._session = None
            self._output_shapes: dict[tuple, dict[str, tuple]] = {}
            state.live_engines += 1
            weakref.finalize(self, _engine_freed, state)

        num_io_tensors = property(lambda self: len(self.names))
        num_optimization_profiles = property(lambda self: len(self.header["profiles"]))
        refittable = property(lambda self: "REFIT" in self.header["flags"])

        def get_tensor_name(self, index):
            return self.names[index]

        def get_tensor_mode(self, name):
            return self.io[name][0] if name in self.io else TensorIOMode.NONE

        def get_tensor_dtype(self, name):
            return self.io[name][1]

        def get_tensor_shape(self, name):
            return Dims(self.io[name][2])

        def get_tensor_profile_shape(self, name, profile):
            return [Dims(shape) for shape in self.header["profiles"][profile][name]]

        def get_device_memory_size_for_profile_v2(self, profile):
            # scratch grows with the profile's largest inputs (deterministic, so sharing can be checked)
            shapes = self.header["profiles"][profile]
            return 1024 + 16 * sum(int(np.prod(high)) for _, _, high in shapes.values())

        @property
        def device_memory_size_v2(self):
            count = self.num_optimization_profiles
            return max((self.get_device_memory_size_for_profile_v2(i) for i in range(count)), default=1024)

        # weight streaming
        streamable_weights_size = property(lambda self: self.streamable)

        @property
        def weight_streaming_budget_v2(self):
            return self._budget

        @weight_streaming_budget_v2.setter
        def weight_streaming_budget_v2(self, budget):
            if len(self.contexts):
                error("the weight streaming budget cannot change while execution contexts exist")
                return
            if not self.streamable:
                error("the engine has no streamable weights (or was not built with BuilderFlag.WEIGHT_STREAMING)")
                return
            if int(budget) < 0:  # any non-negative value; streamable_weights_size or more streams nothing
                error(f"weight streaming budget {budget} is negative")
                return
            self._budget = int(budget)

        def get_weight_streaming_automatic_budget(self):
            """What the binding returns: TensorRT's int64 budget cast to int32 (pyCore.cpp), so ≥ 2 GiB wraps."""
            automatic = self.streamable // 2 if state.automatic_budget is None else state.automatic_budget
            return ctypes.c_int32(automatic).value

        @property
        def weight_streaming_scratch_memory_size(self):
            return 4096 if self.streamable else 0

        streaming = property(lambda self: self._budget < self.streamable)

        def create_runtime_config(self):
            return IRuntimeConfig()

        def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
            config = None
            if isinstance(strategy, IRuntimeConfig):
                if tuple(int(p) for p in trt.__version__.split(".")[:1]) < (11,):
                    raise TypeError("IRuntimeConfig contexts need TensorRT 11")
                config, strategy = weakref.ref(strategy), strategy.strategy
            context = IExecutionContext(self, strategy, config)
            self.contexts.add(context)
            state.contexts_created += 1
            return context

        def serialize(self):
            return HostMemory(_pack(self.header, self.model.SerializeToString()))

        # what the contexts run
        def session(self):
            if self._session is None:
                import onnx_ir as ir
                import onnxruntime

                from fluxexport.onnxruntime.upcast import upcast_bf16_to_fp32

                model = ir.to_proto(upcast_bf16_to_fp32(ir.from_proto(self.model)))
                options = onnxruntime.SessionOptions()
                options.log_severity_level = 3
                self._session = onnxruntime.InferenceSession(model.SerializeToString(), options)
            return self._session

        def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            session = self.session()
            arrays = {}
            for value in session.get_inputs():
                tensor = feeds[value.name]
                tensor = tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor
                arrays[value.name] = tensor.numpy()
            names = [value.name for value in session.get_outputs()]
            return {
                name: torch.from_numpy(np.asarray(out))
                for name, out in zip(names, session.run(names, arrays), strict=True)
            }

        def output_shapes(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
            key = tuple(sorted(shapes.items()))
            if key not in self._output_shapes:
                zeros = {
                    name: torch.zeros(shape, dtype=_TORCH[self.io[name][1].name]) for name, shape in shapes.items()
                }
                self._output_shapes[key] = {name: tuple(v.shape) for name, v in self.run(zeros).items()}
            return self._output_shapes[key]

    class IExecutionContext:
        def __init__(self, engine, strategy, config=None):
            self.engine, self.strategy, self.config = engine, strategy, config
            self.ordinal = state.contexts_created  # creation order, for tests that single out a context
            self.profile, self.shapes, self.addresses = 0, {}, {}
            self.memory = None if strategy == ExecutionContextAllocationStrategy.USER_MANAGED else (0, 1 << 62)
            self.device_state = None  # (shapes, profile) the last launch left in the context's device memory

        active_optimization_profile = property(lambda self: self.profile)

        def set_optimization_profile_async(self, index, stream):
            self._check_config()
            if not 0 <= index < self.engine.num_optimization_profiles:
                error(f"profile {index} does not exist")
                raise RuntimeError("Error in set optimization profile async.")  # the binding raises, never False
            self.profile = index
            self.shapes = {}  # TensorRT: input shapes must be set again after a profile change
            return True

        def set_input_shape(self, name, shape):
            if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
                error(f"{name} is not an input")
                return False
            low, _, high = self.engine.header["profiles"][self.profile][name]
            shape = tuple(shape)
            if len(shape) != len(low) or not all(a <= s <= b for a, s, b in zip(low, shape, high, strict=True)):
                error(f"{name}: shape {shape} is outside profile {self.profile}'s {low}..{high}")
                return False
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name):
            if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
                return Dims(self.shapes.get(name, self.engine.io[name][2]))
            inputs = [n for n in self.engine.names if self.engine.get_tensor_mode(n) == TensorIOMode.INPUT]
            if any(n not in self.shapes for n in inputs):
                return Dims(self.engine.io[name][2])
            return Dims(self.engine.output_shapes(self.shapes)[name])

        def set_tensor_address(self, name, address):
            if name not in self.engine.io:
                error(f"{name} is not a tensor of this engine")
                return False
            self.addresses[name] = int(address)
            return True

        def set_device_memory(self, address, size):
            self._check_config()
            self.memory = (int(address), int(size))

        def _check_config(self):
            if self.config is not None and self.config() is None:
                raise RuntimeError(
                    "stand-in: this context's IRuntimeConfig was freed while the context uses it (a use after free "
                    "on a GPU): keep the config alive as long as its contexts, or create them with a strategy"
                )

        def execute_async_v3(self, stream_handle):
            self._check_config()
            engine = self.engine
            if state.fail_launches:
                state.fail_launches -= 1
                error("an injected launch failure")
                return False
            if self.memory is None:
                error("a USER_MANAGED context launched without set_device_memory")
                return False
            if self.memory[1] < engine.get_device_memory_size_for_profile_v2(self.profile):
                error(f"device memory of {self.memory[1]} bytes is too small for profile {self.profile}")
                return False
            missing = [name for name in engine.names if name not in self.addresses]
            inputs = [n for n in engine.names if engine.get_tensor_mode(n) == TensorIOMode.INPUT]
            if missing or any(n not in self.shapes for n in inputs):
                error(f"launched with unset addresses or shapes: {missing}")
                return False
            snapshot = {"shapes": dict(self.shapes), "addresses": dict(self.addresses), "profile": self.profile,
                        "memory": self.memory}  # fmt: skip
            if state.capturing is not None:
                if engine.streaming:
                    error("a launch that streams weights is not capturable")
                    return False
                if self.device_state != (snapshot["shapes"], self.profile):
                    error("the first launch after a shape or profile change cannot be captured: launch it once first")
                    return False
                state.capturing.append(lambda: self._replay(snapshot))
                return True
            self._launch(snapshot)
            return True

        def _launch(self, snapshot):
            state.launches += 1
            self.device_state = (snapshot["shapes"], snapshot["profile"])
            feeds = {name: _tensor_at(snapshot["addresses"][name], shape, self.engine.io[name][1].name)
                     for name, shape in snapshot["shapes"].items()}  # fmt: skip
            for name, value in self.engine.run(feeds).items():
                _write_at(snapshot["addresses"][name], value.to(_TORCH[self.engine.io[name][1].name]))

        def _replay(self, snapshot):
            state.replays += 1
            if self.device_state != (snapshot["shapes"], snapshot["profile"]) or self.memory != snapshot["memory"]:
                # the captured kernels read state another launch (or another memory block) left behind
                state.stale_replays += 1
                outputs = [n for n in self.engine.names if self.engine.get_tensor_mode(n) == TensorIOMode.OUTPUT]
                for name in outputs:
                    shape = self.engine.output_shapes(snapshot["shapes"])[name]
                    dtype = _TORCH[self.engine.io[name][1].name]
                    _write_at(snapshot["addresses"][name], torch.full(shape, float("nan")).to(dtype))
                return
            self._launch(snapshot)
            state.launches -= 1  # a replay, not a launch from Python

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, plan):
            unpacked = _unpack(bytes(memoryview(plan)))
            if unpacked is None:
                error("not a serialized engine")
                return None
            header, model = unpacked
            if header["version"] != trt.__version__:
                error(f"the plan was built by TensorRT {header['version']}, this is {trt.__version__}")
                return None
            return ICudaEngine(header, model)

    class Refitter:
        """Weights by ONNX initializer name. Every refittable weight is reported missing until set (TensorRT may
        ask for weights you did not change; NVIDIA's demo sets them all), names TensorRT folded have a prototype
        of size -1, and the values are read when `refit_cuda_engine` runs (the host buffers must live until
        then)."""

        def __init__(self, engine, logger):
            if not engine.refittable:
                raise RuntimeError("the engine is not refittable")
            self.engine, self.pending = engine, {}
            self.initializers = {t.name: t for t in engine.model.graph.initializer}

        def _refittable(self, name):
            tensor = self.initializers.get(name)
            return tensor is not None and len(tensor.dims) >= 1 and tensor.data_type in _ONNX_TO_TRT

        def get_weights_prototype(self, name):
            if not self._refittable(name):
                return Weights(DataType.FLOAT, 0, -1)
            tensor = self.initializers[name]
            return Weights(DataType[_ONNX_TO_TRT[tensor.data_type]], 0, int(np.prod(tensor.dims)))

        def set_named_weights(self, name, weights):
            prototype = self.get_weights_prototype(name)
            if prototype.size < 0 or prototype.size != weights.size or prototype.dtype != weights.dtype:
                error(f"weights for {name} do not match its prototype")
                return False
            self.pending[name] = weights
            return True

        def get_missing_weights(self):
            return [name for name in self.initializers if self._refittable(name) and name not in self.pending]

        def refit_cuda_engine(self):
            if self.get_missing_weights():
                error("refit with weights missing")
                return False
            for name, weights in self.pending.items():
                tensor = self.initializers[name]
                values = _tensor_at(weights.ptr, tuple(tensor.dims), weights.dtype.name)
                tensor.ClearField("float_data")
                tensor.ClearField("int32_data")
                tensor.ClearField("int64_data")
                tensor.raw_data = values.contiguous().view(torch.uint8).numpy().tobytes()
            self.engine._session = None
            self.pending = {}
            return True

    for name, value in dict(locals()).items():
        if isinstance(value, type) or callable(value) and not name.startswith("_"):
            setattr(trt, name, value)
    trt.IHostMemory = HostMemory
    trt.Dims = Dims
    return trt


def _engine_freed(state: StandInState) -> None:
    state.live_engines -= 1


def _config_freed(state: StandInState) -> None:
    state.freed_runtime_configs += 1


def _nbytes(tensor: onnx.TensorProto) -> int:
    size = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4}.get(tensor.data_type, 2)
    if tensor.data_type in (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL):
        size = 1
    return size * int(np.prod(tensor.dims))


def _pack(header: dict, model: bytes) -> bytes:
    text = json.dumps(header).encode()
    return PLAN_MAGIC + struct.pack("<Q", len(text)) + text + model


def _unpack(plan: bytes) -> tuple[dict, onnx.ModelProto] | None:
    if not plan.startswith(PLAN_MAGIC):
        return None
    start = len(PLAN_MAGIC)
    (length,) = struct.unpack("<Q", plan[start : start + 8])
    header = json.loads(plan[start + 8 : start + 8 + length])
    return header, onnx.load_from_string(plan[start + 8 + length :])


def read_plan(path: Path) -> dict:
    """A plan's header (flags, profiles, I/O): what a test checks about what was built."""
    unpacked = _unpack(Path(path).read_bytes())
    assert unpacked is not None, f"{path} is not a stand-in plan"
    return unpacked[0]


# ---- the CUDA side on the host --------------------------------------------------------------------------------


class HostGraph:
    """A captured CUDA graph: the launches recorded while capturing, replayed in order."""

    def __init__(self, launches: list):
        self.launches = launches

    def replay(self) -> None:
        for launch in self.launches:
            launch()


class HostDevice:
    """The CUDA calls the TensorRT backend makes (allocation, streams, graph capture), on host memory, paired with
    the stand-in TensorRT so that a launch during capture is recorded instead of run."""

    name = "stand-in GPU"

    def __init__(self, trt: types.ModuleType, memory_bytes: int = 80 * 2**30, compute_capability=(9, 0),
                 free_bytes: int | None = None):  # fmt: skip
        self.trt, self.memory_bytes, self.compute_capability = trt, memory_bytes, compute_capability
        self.free_bytes = memory_bytes if free_bytes is None else free_bytes  # what cudaMemGetInfo reports free
        self.torch_device = torch.device("cpu")
        self.stream_handle = 0
        self.allocated_blocks: list[int] = []  # sizes of the shared device-memory blocks allocated, in order

    def gpu(self):
        from fluxexport.tensorrt.environment import Gpu

        return Gpu(self.name, self.compute_capability, self.memory_bytes)

    def empty(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def memory_block(self, size: int) -> torch.Tensor:
        self.allocated_blocks.append(size)
        return torch.empty(size, dtype=torch.uint8)

    def free_memory(self) -> int:
        return self.free_bytes

    @contextlib.contextmanager
    def on_stream(self):
        yield

    @contextlib.contextmanager
    def capture(self):
        """Record launches; yields a holder whose `.graph` is the captured graph when the block ends."""
        state = self.trt.state
        holder = types.SimpleNamespace(graph=None)
        state.capturing = []
        try:
            yield holder
            holder.graph = HostGraph(state.capturing)
            state.captures += 1
        except BaseException:
            state.failed_captures += 1
            raise
        finally:
            state.capturing = None

    def empty_cache(self) -> None:
        pass


def read_plan_weights(path: Path) -> dict[str, np.ndarray]:
    """Initializer name → the values a plan holds (after a refit: the refitted ones), as raw ONNX arrays."""
    from onnx import numpy_helper

    unpacked = _unpack(Path(path).read_bytes())
    assert unpacked is not None, f"{path} is not a stand-in plan"
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in unpacked[1].graph.initializer}
