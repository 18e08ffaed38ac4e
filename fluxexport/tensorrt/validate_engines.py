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

from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.specs import ComponentSpec, ExportBounds, component_specs, sample_inputs
from fluxexport.validate import Comparison, ValidationReport, metrics, validate, validation_sizes

# Engines against PyTorch (and against ONNX Runtime on their own graph): rel-L2 per component, PSNR end to end
TENSORRT_THRESHOLDS = {"fp32": (1e-3, 40.0), "fp16": (2e-2, 30.0), "bf16": (1e-2, 25.0), "fp8": (6e-2, 20.0)}


def comparisons_from_results(
    spec: ComponentSpec, results, sizes: list[tuple[dict[str, int], bool]], max_rel_l2: float
) -> list[Comparison]:
    """Our rows from polygraphy's RunResults of (engine, ONNX Runtime): rel-L2 of the engine's outputs against
    ONNX Runtime's, iteration by iteration (one iteration per validation shape)."""
    (_, engine_runs), (_, onnx_runs) = list(results.items())
    rows = []
    for (shape, seen), engine, graph in zip(sizes, engine_runs, onnx_runs, strict=True):
        for tensor in spec.outputs:
            actual = torch.as_tensor(engine[tensor.name]).float().cpu()
            expected = torch.as_tensor(graph[tensor.name]).float().cpu()
            max_abs, rel_l2, cosine = metrics(actual, expected)
            passed = rel_l2 == rel_l2 and rel_l2 <= max_rel_l2  # NaN fails
            rows.append(Comparison(spec.name, tensor.name, shape, seen, max_abs, rel_l2, cosine, passed, "onnxruntime"))
    return rows


def component_runner(component: Callable, spec: ComponentSpec, device: torch.device, name: str):
    """A polygraphy runner around one of our backend's components (feeds and outputs as host arrays)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    class ComponentRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name, prefix="fluxexport-runner")

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
            outputs = {key: value.float().cpu().numpy() for key, value in component(feeds).items()}
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
    spec: ComponentSpec, engine: Callable, device: torch.device, session, max_rel_l2: float,
    sizes: list[tuple[dict[str, int], bool]],
) -> list[Comparison]:  # fmt: skip
    """Run the engine (through the backend: the profile each shape needs) and ONNX Runtime (on the graph the
    engine came from) on `sizes` through polygraphy's Comparator."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    feeds = [
        {key: value.numpy() for key, value in sample_inputs(spec, shape, seed=index).items()}
        for index, (shape, _) in enumerate(sizes)
    ]
    runners = [
        component_runner(engine, spec, device, f"{spec.name}-tensorrt"),
        OnnxrtRunner(session, name=f"{spec.name}-onnxruntime"),
    ]
    results = Comparator.run(runners, data_loader=feeds)
    return comparisons_from_results(spec, results, sizes, max_rel_l2)


def graph_session(source: ModelSource, name: str, entry: dict, loras: list):
    """ONNX Runtime on the graph `entry`'s engine was built from, with the LoRAs a refit put in the engine
    swapped in (their merged weights as replacement initializers)."""
    from fluxexport.backends.onnxruntime_backend import create_session, default_providers, swapped_initializers
    from fluxexport.models.loaders import MODULE_OF
    from fluxexport.tensorrt.refit import graph_entry

    onnx_path = Path(entry["onnx"])
    if not onnx_path.is_file():
        raise FluxExportError(f"{name}: its graph {onnx_path} is gone: the engine cannot be compared with it")
    overrides = {}
    if "base_file" in entry and loras:  # refitted: the graph with the same LoRAs
        overrides = swapped_initializers(source, source.lora_set, MODULE_OF[name], graph_entry(entry))
    bf16_base = entry["precision"] in ("bf16", "fp8")
    return create_session(onnx_path, bf16_base, default_providers(), overrides=overrides)


def validate_engines(
    source: ModelSource,
    engines: Path,
    components: list[str] | None = None,
    steps: int = 4,
    max_rel_l2: float | None = None,
    min_psnr: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    device=None,
) -> tuple[ValidationReport, str]:
    """Validate a folder of TensorRT engines: (report, PyTorch reference dtype). Refuses in one line where
    TensorRT or polygraphy is missing. `device`: the CUDA calls (`tensorrt/cuda.CudaDevice` by default)."""
    from fluxexport.backends.torch_backend import TorchBackend
    from fluxexport.tensorrt.backend import TensorRTBackend
    from fluxexport.tensorrt.builder import POLYGRAPHY_HELP
    from fluxexport.tensorrt.engines import read_engine_manifest
    from fluxexport.tensorrt.environment import import_tensorrt
    from fluxexport.tensorrt.profiles import profile_bounds

    import_tensorrt()
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise FluxExportError(f"polygraphy is not installed: {POLYGRAPHY_HELP}") from None
    engines = Path(engines)
    manifest = read_engine_manifest(engines)
    entries = manifest["components"]
    names = components or list(entries)
    missing = [name for name in names if name not in entries]
    if missing:
        raise FluxExportError(f"{engines} has no {missing[0]} engine: fluxexport build --components {missing[0]}")
    precisions = {name: entries[name]["precision"] for name in names}
    reference = "fp32" if "fp32" in precisions.values() else "bf16"
    bounds = ExportBounds(**manifest["builder"]["bounds"])  # every compared shape within the engines' profiles
    specs = component_specs(source, bounds)
    buckets = [
        component_specs(source, bucket) for bucket in profile_bounds(bounds, manifest["builder"]["resolution_buckets"])
    ]
    total, started = len(names) * 2 + 2, [0]
    loras = manifest["model"].get("loras", [])

    def stage_started(_stage: str) -> None:
        if on_progress:
            on_progress(started[0], total)
        started[0] += 1

    with TensorRTBackend(source, engines, device=device) as candidate:
        with TorchBackend(source, reference, candidate.device.type) as torch_reference:
            report = validate(
                source, candidate, torch_reference, precisions, str(engines), steps, max_rel_l2, min_psnr,
                stage_started, thresholds=TENSORRT_THRESHOLDS, bounds=bounds,
            )  # fmt: skip
        for name in names:
            stage_started(name)
            entry = entries[name]
            limit = TENSORRT_THRESHOLDS[entry["precision"]][0] if max_rel_l2 is None else max_rel_l2
            session = graph_session(source, name, entry, loras)
            engine = candidate.component(name)
            sizes = bucket_sizes(specs[name], [bucket[name] for bucket in buckets])
            report.components += compare_with_onnxruntime(specs[name], engine, candidate.device, session, limit, sizes)
    return report, reference
