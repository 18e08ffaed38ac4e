"""Traces kept on disk and reused: `FLUXEXPORT_TRACE_CACHE=DIR` (off unless set).

A dynamo trace depends only on the module (its classes, settings, parameter shapes and dtypes, and the values of
its real tensors), the sample inputs, the component's spec, the trace options and the code that runs it. A streamed
export traces a module of *fake* weights, so every checkpoint of one architecture (a fine-tune, a LoRA merged into
the weights, the test suite's tiny models exported by several tests) traces to the same graph: the cache keeps it,
keyed by a digest of all of the above (fluxexport's own sources and the versions of torch, onnxscript, onnx-ir,
onnx, diffusers and transformers included), and the next export of that architecture skips the trace. What a trace
gives is stored as it left the exporter: fake weights as placeholders that become fake tensors again on reading,
so everything after the trace (weights attached from the checkpoint, the optimizer, the graph passes, the write)
runs as without the cache, and the files written are byte for byte the same (tests/test_trace_cache.py).

Not cached: a module holding more than `MAX_REAL_BYTES` of real tensors (an in-memory export at full width: its
weights would be hashed and copied), and a module with a setting the digest cannot describe. Failures are never
kept. Two processes asking for one trace at once trace it once: the second waits on a file lock.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fluxexport.errors import FluxExportError

if TYPE_CHECKING:
    import onnx_ir as ir
    from torch.onnx import ONNXProgram

ENVIRONMENT_VARIABLE = "FLUXEXPORT_TRACE_CACHE"
MAX_REAL_BYTES = 256 * 2**20  # real tensor bytes a module may hold and still be cached
FAKE_LOCATION = "fluxexport-trace-cache:fake-weight"  # the placeholder a fake weight is stored as
LIBRARIES = ("torch", "onnxscript", "onnx_ir", "onnx", "diffusers", "transformers")
# config entries that say where a config came from, not what the module computes
PROVENANCE_KEYS = frozenset({"_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "_diffusers_version",
                             "_use_default_values"})  # fmt: skip
_PRIMITIVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


class Uncacheable(Exception):
    """The module holds something the digest cannot describe (or too many real bytes): trace it as usual."""


def cache_folder() -> Path | None:
    """The trace cache's folder (`FLUXEXPORT_TRACE_CACHE`), or None when the cache is off."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    return Path(value).expanduser() if value else None


@functools.cache
def code_digest() -> str:
    """fluxexport's own sources and the versions of the libraries a trace runs through."""
    from importlib import metadata

    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    for library in LIBRARIES:
        try:
            version = metadata.version(library.replace("_", "-"))
        except metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{library}={version}\0".encode())
    return digest.hexdigest()


class _Digest:
    """A sha256 fed with a canonical description of Python values, modules and tensors."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.real_bytes = 0
        self._open: set[int] = set()  # objects being described (a cycle is described by name only)

    def text(self, *parts: object) -> None:
        for part in parts:
            self.hash.update(str(part).encode() + b"\0")

    def tensor(self, tensor: torch.Tensor) -> None:
        from torch._subclasses.fake_tensor import FakeTensor

        self.text("tensor", tuple(tensor.shape), tensor.dtype, tensor.requires_grad)
        if isinstance(tensor, FakeTensor) or tensor.device.type == "meta":
            self.text("fake")
            return
        self.real_bytes += tensor.numel() * tensor.element_size()
        if self.real_bytes > MAX_REAL_BYTES:
            raise Uncacheable(f"more than {MAX_REAL_BYTES} bytes of real tensors")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self.hash.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")

    def value(self, value: object, depth: int = 0) -> None:
        """Describe `value`; raises Uncacheable for what cannot be described faithfully."""
        if depth > 12:
            raise Uncacheable("nested too deep")
        if isinstance(value, (*_PRIMITIVES, enum.Enum)):
            self.text(type(value).__qualname__, repr(value))
        elif isinstance(value, torch.Tensor):
            self.tensor(value)
        elif isinstance(value, torch.nn.Module):
            self.module(value, depth + 1)
        elif isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, type)):
            self.callable(value, depth)
        elif isinstance(value, functools.partial):
            self.text("partial")
            self.value(value.func, depth + 1)
            self.value(value.args, depth + 1)
            self.value(value.keywords, depth + 1)
        elif isinstance(value, Mapping):
            keys = sorted((key for key in value if key not in PROVENANCE_KEYS), key=repr)
            self.text("mapping", type(value).__qualname__, len(keys))
            for key in keys:
                self.text(repr(key))
                self.value(value[key], depth + 1)
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
            self.text(type(value).__qualname__, len(items))
            for item in items:
                self.value(item, depth + 1)
        elif hasattr(value, "to_dict") and callable(value.to_dict):  # transformers' PretrainedConfig
            self.text("config", type(value).__qualname__)
            self.value(value.to_dict(), depth + 1)
        elif hasattr(value, "__dict__"):
            self.object(value, depth)
        else:
            raise Uncacheable(f"cannot describe a {type(value).__qualname__}")

    def callable(self, value: Callable, depth: int) -> None:
        self.text("callable", getattr(value, "__module__", None), getattr(value, "__qualname__", repr(value)))
        function = getattr(value, "__func__", value)
        if isinstance(value, types.MethodType) and not isinstance(value.__self__, type):
            self.text("bound to", type(value.__self__).__qualname__)
        if getattr(function, "__name__", "") == "<lambda>" or getattr(function, "__closure__", None):
            code = getattr(function, "__code__", None)
            constants = tuple(c for c in code.co_consts if isinstance(c, _PRIMITIVES)) if code else ()
            self.text(code.co_code.hex() if code else "", constants)
            for cell in getattr(function, "__closure__", None) or ():
                self.value(cell.cell_contents, depth + 1)

    def object(self, value: object, depth: int) -> None:
        if id(value) in self._open:
            self.text("cycle", type(value).__qualname__)
            return
        self._open.add(id(value))
        self.text("object", type(value).__module__, type(value).__qualname__)
        for key, item in sorted(vars(value).items()):
            if key in PROVENANCE_KEYS:
                continue
            self.text(key)
            self.value(item, depth + 1)
        self._open.discard(id(value))

    def module(self, module: torch.nn.Module, depth: int = 0) -> None:
        """A module tree: each submodule's class and settings, its parameters and buffers (fake ones by shape and
        dtype, real ones by value) and its hooks."""
        if id(module) in self._open:
            self.text("cycle", type(module).__qualname__)
            return
        self._open.add(id(module))
        self.text("module", type(module).__module__, type(module).__qualname__, module.training)
        for key, item in sorted(vars(module).items()):
            if key in ("_parameters", "_buffers", "_modules") or key in PROVENANCE_KEYS:
                continue
            self.text(key)
            self.value(item, depth + 1)
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(module, kind).items():
                self.text(kind, name)
                if tensor is not None:
                    self.tensor(tensor)
        for name, child in module._modules.items():
            self.text("child", name)
            if child is not None:
                self.module(child, depth + 1)
        self._open.discard(id(module))


def trace_key(module: torch.nn.Module, feeds: Mapping[str, torch.Tensor], *settings: object) -> str | None:
    """The digest a trace of `module` on `feeds` with `settings` (spec, options) is kept under; None when the
    module cannot be described (it is then traced every time)."""
    digest = _Digest()
    try:
        digest.text(code_digest())
        digest.module(module)
        for name, tensor in feeds.items():
            digest.text("feed", name)
            digest.tensor(tensor)
        digest.value(settings)
    except Uncacheable:
        return None
    return digest.hash.hexdigest()


def _fake_of(value: ir.Value) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(getattr(value.const_value, "raw", None), FakeTensor)


def _names_of(graph: ir.Graph) -> dict:
    """The graph's name authority: the counters and every name it has handed out, so that the values and nodes
    the optimizer adds after the trace get the names they get on the exporter's own graph."""
    authority = graph._name_authority
    return {"values": authority._value_counter, "nodes": authority._node_counter,
            "value_names": sorted(authority._value_names), "node_names": sorted(authority._node_names)}  # fmt: skip


def _restore_names(graph: ir.Graph, names: dict) -> None:
    authority = graph._name_authority
    authority._value_counter, authority._node_counter = names["values"], names["nodes"]
    authority._value_names, authority._node_names = set(names["value_names"]), set(names["node_names"])


def store(path: Path, model: ir.Model) -> None:
    """Write `model` (as the exporter left it) to `path` atomically, its fake weights as placeholders, and its
    graph's names beside it (`<path>.json`)."""
    import onnx_ir as ir

    fakes = {name: value.const_value for name, value in model.graph.initializers.items() if _fake_of(value)}
    try:
        for name, tensor in fakes.items():
            model.graph.initializers[name].const_value = ir.ExternalTensor(
                FAKE_LOCATION, None, None, tensor.dtype, shape=tensor.shape, name=name
            )  # fmt: skip
        data = ir.to_proto(model).SerializeToString()
    finally:
        for name, tensor in fakes.items():
            model.graph.initializers[name].const_value = tensor
    for target, payload in ((_sidecar(path), json.dumps(_names_of(model.graph)).encode()), (path, data)):
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_bytes(payload)
        os.replace(temporary, target)  # the graph last: its presence says the entry is whole


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def load(path: Path) -> ir.Model:
    """The model `store` wrote, its placeholders fake tensors again (shapes and dtypes, no memory) and its
    graph's names as they were."""
    import onnx
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import TorchTensor, to_torch_dtype
    from torch._subclasses.fake_tensor import FakeTensorMode

    proto = onnx.ModelProto()
    proto.ParseFromString(path.read_bytes())
    model = ir.from_proto(proto)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.location == FAKE_LOCATION:
            with mode:
                fake = torch.empty(tuple(tensor.shape), dtype=to_torch_dtype(tensor.dtype))
            value.const_value = TorchTensor(fake, name)
    _restore_names(model.graph, json.loads(_sidecar(path).read_text()))
    return model


def cached_trace(key: str | None, trace: Callable[[], ONNXProgram]) -> ONNXProgram:
    """`trace()`, or the program kept under `key` in the cache folder; a fresh trace is kept there. Without a
    cache folder or a key, just `trace()`."""
    folder = cache_folder()
    if folder is None or key is None:
        return trace()
    from filelock import FileLock
    from torch.onnx import ONNXProgram

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FluxExportError(
            f"{ENVIRONMENT_VARIABLE}={folder} is not a folder fluxexport can write ({error.strerror}): point it at "
            "one, or unset it"
        ) from None
    path = folder / f"{key}.onnx"
    with FileLock(str(folder / f"{key}.lock")):
        if path.is_file():
            return ONNXProgram(load(path), None)
        program = trace()
        store(path, program.model)
        return program
