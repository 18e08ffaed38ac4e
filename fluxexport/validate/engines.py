"""`fluxexport validate --engines TRT_DIR`: each engine against ONNX Runtime on the graph it was built from
(polygraphy's Comparator runs both on the same inputs) and against PyTorch, then end-to-end images against
PyTorch — the same report, table and JSON as the CPU validation of graphs.

The engine side runs through our TensorRT backend, so each shape gets the optimization profile that serves it
(engines built with several resolution buckets are compared in every bucket), and a refitted engine is compared
with its graph carrying the same LoRAs (swapped in as ONNX Runtime runs them), not with the base graph.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fluxexport.artifacts.folders import EngineFolder, open_engines
from fluxexport.compare import TENSORRT_THRESHOLDS, Comparison, ValidationReport, compare_outputs, reference_dtype
from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.runtime.cache import CacheSettings
from fluxexport.specs import ComponentSpec, ExportBounds, component_specs, sample_inputs, validation_sizes
from fluxexport.validate.graphs import upcast_copies, validate

BASE_OF_PRECISION = {"fp8": "bf16", "nvfp4": "bf16"}  # a quantized engine computes the rest in bf16 (its graph's)
# ONNX Runtime runs no NVFP4 graph (no FLOAT4E2M1 DequantizeLinear, no trt::TRT_FP4DynamicQuantize): NVFP4 engines
# are compared with PyTorch only (components and images), at NVFP4's bound
WITHOUT_ONNXRUNTIME = frozenset({"nvfp4"})


def base_precision(precision: str) -> str:
    """The dtype an engine of `precision` computes in outside its quantized layers (the PyTorch it is held to)."""
    return BASE_OF_PRECISION.get(precision, precision)


def onnxruntime_limits(precisions: dict[str, str], max_rel_l2: float | None = None) -> dict[str, float]:
    """Component → the rel-L2 bound of its engine against ONNX Runtime on its own graph (`max_rel_l2`, else its
    precision's TensorRT bound), for the components whose graph ONNX Runtime can run."""
    return {
        name: TENSORRT_THRESHOLDS[precision][0] if max_rel_l2 is None else max_rel_l2
        for name, precision in precisions.items()
        if precision not in WITHOUT_ONNXRUNTIME
    }


def comparisons_from_results(
    spec: ComponentSpec, results, sizes: list[tuple[dict[str, int], bool]], max_rel_l2: float
) -> list[Comparison]:
    """Our rows from polygraphy's RunResults of (engine, ONNX Runtime): rel-L2 of the engine's outputs against
    ONNX Runtime's, iteration by iteration (one iteration per validation shape); the runners are told apart by
    their names (`…-tensorrt`, `…-onnxruntime`), whichever ran first."""
    runs = dict(results.items())
    engine_runs, onnx_runs = (next(value for key, value in runs.items() if key.endswith(suffix))
                              for suffix in ("-tensorrt", "-onnxruntime"))  # fmt: skip
    rows = []
    for (shape, seen), engine, graph in zip(sizes, engine_runs, onnx_runs, strict=True):
        actual, expected = ({t.name: torch.as_tensor(run[t.name]).float().cpu() for t in spec.outputs}
                            for run in (engine, graph))  # fmt: skip
        rows += compare_outputs(spec.name, actual, expected, shape, seen, max_rel_l2, "onnxruntime")
    return rows


def component_runner(
    component: Callable, spec: ComponentSpec, device: torch.device, name: str, release: Callable[[], None] = lambda: None
):  # fmt: skip
    """A polygraphy runner around one of our backend's components (feeds and outputs as host arrays).
    `component` is called with no argument when the runner is activated, for the component; `release` when it is
    deactivated (polygraphy's Comparator activates its runners one after the other)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    class ComponentRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name, prefix="fluxexport-runner")
            self.component: Callable | None = None

        def activate_impl(self):
            self.component = component()

        def deactivate_impl(self):
            self.component = None
            release()

        def get_input_metadata_impl(self):
            metadata = TensorMetadata()
            for tensor in spec.inputs:
                host = np.int32 if tensor.dtype == "int32" else np.float32
                metadata.add(tensor.name, dtype=DataType.from_dtype(np.dtype(host)), shape=[-1] * len(tensor.dims))
            return metadata

        def infer_impl(self, feed_dict):
            import time

            feeds = {key: torch.as_tensor(np.asarray(value)).to(device) for key, value in feed_dict.items()}
            start = time.perf_counter()
            outputs = {key: value.float().cpu().numpy() for key, value in self.component(feeds).items()}
            self.inference_time = time.perf_counter() - start  # polygraphy's Comparator reports it
            return outputs

    return ComponentRunner()


def bucket_sizes(spec: ComponentSpec, buckets: list[ComponentSpec]) -> list[tuple[dict[str, int], bool]]:
    """The validation shapes of an engine: `validation_sizes` within its bounds, plus, per resolution bucket, the
    bucket's largest image at batch 1 — so an engine with several profiles is compared in each of them."""
    sizes = validation_sizes(spec, within_bounds=True)
    varying = {axis for axis in spec.axes if len({bucket.axes[axis].max for bucket in buckets}) > 1}
    for bucket in buckets if varying else ():
        shape = {axis: bucket.axes[axis].max if axis in varying else sizes[1][0][axis] for axis in spec.axes}
        if all(shape != known for known, _ in sizes):
            sizes.append((shape, False))
    return sizes


def compare_with_onnxruntime(
    spec: ComponentSpec, engine: Callable, device: torch.device, session: Callable, max_rel_l2: float,
    sizes: list[tuple[dict[str, int], bool]], release: Callable[[], None] = lambda: None,
) -> list[Comparison]:  # fmt: skip
    """Run ONNX Runtime (on the graph the engine came from) and then the engine (through the backend: the profile
    each shape needs) on `sizes` through polygraphy's Comparator. `session` and `engine` are called for the
    session and the component when their runner starts, and each is dropped when it ends (`release` for the
    engine): the float32 graph and the engine are never in memory together."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    feeds = [
        {key: value.numpy() for key, value in sample_inputs(spec, shape, seed=index).items()}
        for index, (shape, _) in enumerate(sizes)
    ]
    runners = [
        OnnxrtRunner(session, name=f"{spec.name}-onnxruntime"),
        component_runner(engine, spec, device, f"{spec.name}-tensorrt", release),
    ]
    results = Comparator.run(runners, data_loader=feeds)
    return comparisons_from_results(spec, results, sizes, max_rel_l2)


def graph_session(source: ModelSource, folder: EngineFolder, name: str, upcast_folder: Path | None = None):
    """ONNX Runtime on the graph `name`'s engine was built from, with the LoRAs a refit put in the engine
    swapped in (their merged weights as replacement initializers); a bf16 graph's float32 copy is written into
    `upcast_folder` (or a temporary folder)."""
    from fluxexport.models.loaders import MODULE_OF
    from fluxexport.onnxruntime.backend import create_session, default_providers, swapped_initializers

    engine = folder.components[name]
    onnx_path = Path(engine.onnx)
    if not onnx_path.is_file():
        raise FluxExportError(f"{name}: its graph {onnx_path} is gone: the engine cannot be compared with it")
    overrides = {}
    if engine.is_refitted and folder.model.loras:  # refitted: the graph with the same LoRAs
        overrides = swapped_initializers(source, source.lora_set, MODULE_OF[name], folder.built_from(name))
    bf16_base = base_precision(engine.precision) == "bf16"
    return create_session(onnx_path, bf16_base, default_providers(), overrides=overrides, upcast_folder=upcast_folder)


def validate_engines(
    source: ModelSource,
    engines: Path,
    components: list[str] | None = None,
    steps: int = 4,
    max_rel_l2: float | None = None,
    min_psnr: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    device=None,
    cache: CacheSettings | None = None,
) -> tuple[ValidationReport, str]:
    """Validate a folder of TensorRT engines: (report, PyTorch reference dtype). Refuses in one line where
    TensorRT or polygraphy is missing. `device`: the CUDA calls (`tensorrt/cuda.CudaDevice` by default)."""
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.tensorrt.backend import TensorRTBackend
    from fluxexport.tensorrt.builder import POLYGRAPHY_HELP
    from fluxexport.tensorrt.environment import import_tensorrt
    from fluxexport.tensorrt.profiles import profile_bounds

    import_tensorrt()
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise FluxExportError(f"polygraphy is not installed: {POLYGRAPHY_HELP}") from None
    engines = Path(engines)
    folder = open_engines(engines)
    names = components or list(folder.components)
    missing = [name for name in names if name not in folder.components]
    if missing:
        raise FluxExportError(
            f"{engines} has no {missing[0]} engine: fluxexport build --model {folder.model.name} --precision "
            f"{folder.precision} --components {missing[0]} --out {engines}"
        )
    precisions = {name: folder.components[name].precision for name in names}
    reference = reference_dtype(base_precision(precision) for precision in precisions.values())
    bounds = ExportBounds.from_json(folder.bounds, built=True)  # every compared shape within the engines' profiles
    specs = component_specs(source, bounds)
    buckets = [component_specs(source, bucket) for bucket in profile_bounds(bounds, folder.resolution_buckets)]
    total, started = len(names) * 2 + len(onnxruntime_limits(precisions)) + 4, [0]

    def stage_started(_stage: str) -> None:
        if on_progress:
            on_progress(started[0], total)
        started[0] += 1

    candidate = TensorRTBackend(source, engines, device=device)  # opens no engine yet
    cuda = candidate.cuda
    report = validate(
        source, lambda: TensorRTBackend(source, engines, device=cuda),
        lambda: TorchBackend(source, reference, candidate.device.type), precisions, str(engines), steps, max_rel_l2,
        min_psnr, stage_started, thresholds=TENSORRT_THRESHOLDS, bounds=bounds, cache=cache,
    )  # fmt: skip
    report.subject = "engines"
    with upcast_copies(graphs_folder(folder, names)) as upcast_folder:
        for name, limit in onnxruntime_limits(precisions, max_rel_l2).items():
            stage_started(name)
            sizes = bucket_sizes(specs[name], [bucket[name] for bucket in buckets])
            report.components += compare_with_onnxruntime(
                specs[name], lambda name=name: candidate.component(name), candidate.device,
                lambda name=name: graph_session(source, folder, name, upcast_folder), limit, sizes, candidate.close,
            )  # fmt: skip
    return report, reference


def graphs_folder(folder: EngineFolder, names: list[str]) -> Path:
    """The folder of the graphs the engines `names` were built from (the first one's)."""
    return Path(folder.components[names[0]].onnx).parent
