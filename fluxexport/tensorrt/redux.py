"""`build --redux`: TensorRT engines of a FLUX.1 Redux prior's two graphs (`export --redux`), one profile each over
the batch (images; the image side and token count are the prior's own, fixed), with a manifest of their own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fluxexport.artifacts.files import file_sha256, now
from fluxexport.artifacts.records import EngineRecord
from fluxexport.artifacts.redux import ReduxEngines, open_redux_engines, open_redux_export, write_redux_engines
from fluxexport.errors import FluxExportError
from fluxexport.models.redux import REDUX_COMPONENTS, ReduxSource
from fluxexport.runtime.backend import Component, LoadedComponents
from fluxexport.specs.core import Axis
from fluxexport.specs.redux import REDUX_BATCH, redux_specs
from fluxexport.tensorrt.builder import TIMING_CACHE, BuildOptions, build_engine, check_build_host
from fluxexport.tensorrt.engines import engine_filename, profiles_to_json
from fluxexport.tensorrt.environment import Gpu, import_tensorrt
from fluxexport.tensorrt.profiles import Profile, build_profile


def redux_profiles(redux: ReduxSource, batch: Axis = REDUX_BATCH) -> dict[str, list[Profile]]:
    """Each Redux component's one profile: its inputs' (min, opt, max) shapes over the `batch` axis."""
    return {name: [build_profile(spec)] for name, spec in redux_specs(redux, batch).items()}


def build_redux_engines(
    redux: ReduxSource, onnx_dir: Path, out_dir: Path, options: BuildOptions, batch: Axis = REDUX_BATCH,
    device_gpu: Callable[[], Gpu] | None = None,
) -> ReduxEngines:  # fmt: skip
    """Build the prior's engines from `onnx_dir` (graphs of this prior, refused in one line otherwise) into
    `out_dir`, in their graphs' precision (strongly typed: fp32 graphs give fp32 engines, TF32 on)."""
    import tensorrt as trt

    check_build_host(options, device_gpu)
    export = open_redux_export(onnx_dir, redux.name)
    profiles = redux_profiles(redux, batch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for name in REDUX_COMPONENTS:
        graph = export.graphs[name]
        engine = out_dir / engine_filename(name, graph.dtype, trt.__version__)
        seconds = build_engine(Path(onnx_dir) / graph.file, engine, profiles[name], options, out_dir / TIMING_CACHE)
        records[name] = EngineRecord(
            file=engine.name, precision=graph.dtype, profiles=tuple(profiles_to_json(profiles[name])),
            inputs=graph.inputs, outputs=graph.outputs, onnx=str((Path(onnx_dir) / graph.file).resolve()),
            engine_sha256=file_sha256(engine),
            extra={"onnx_sha256": graph.sha256, "build_seconds": round(seconds, 1), "built_at": now()},
        )  # fmt: skip
    return write_redux_engines(out_dir, redux.name, trt.__version__, records)


class TensorRTReduxBackend(LoadedComponents):
    """The prior's engines (`build --redux`) on the GPU (`device`: the CUDA calls, `tensorrt/cuda.CudaDevice` on GPU
    hosts); one scratch block shared by both (they run in turn). Engines built by another TensorRT or from another
    prior are refused in one line."""

    name = "tensorrt"

    def __init__(self, redux: ReduxSource, engines: Path, device=None):
        super().__init__()
        import_tensorrt()
        import tensorrt as trt

        self.folder = open_redux_engines(engines, redux.name)
        if self.folder.tensorrt != trt.__version__:
            raise FluxExportError(
                f"the Redux engines in {engines} were built by TensorRT {self.folder.tensorrt}, this is "
                f"{trt.__version__}: build them again (fluxexport build --redux {redux.name})"
            )
        if device is None:
            from fluxexport.tensorrt.cuda import CudaDevice

            device = CudaDevice()
        self.cuda, self.device = device, device.torch_device
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.memory: torch.Tensor | None = None

    def _load(self, name: str) -> Component:
        from fluxexport.tensorrt.backend import _device_memory_size, _EngineRunner

        record = self.folder.engines[name]
        engine = self.runtime.deserialize_cuda_engine((self.folder.folder / record.file).read_bytes())
        if engine is None:
            raise FluxExportError(f"TensorRT cannot deserialize {record.file}: rebuild it")
        runner = _EngineRunner(engine, name, record, self.cuda, False)  # called once per request: no CUDA graphs
        needed = _device_memory_size(engine)
        if self.memory is None or self.memory.numel() < needed:
            self.memory = self.cuda.memory_block(needed)
            for other in self._components.values():
                other.bind_memory(self.memory)  # type: ignore[attr-defined]
        runner.bind_memory(self.memory)
        return runner

    def close(self) -> None:
        super().close()
        self.memory = None
