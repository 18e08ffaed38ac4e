"""`fluxexport validate --engines TRT_DIR`: each engine against ONNX Runtime on the graph it was built from
(polygraphy's Comparator runs a TrtRunner and an OnnxrtRunner on the same inputs) and against PyTorch, then
end-to-end images against PyTorch — the same report, table and JSON as the CPU validation of graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.specs import ComponentSpec, component_specs, sample_inputs
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


def compare_with_onnxruntime(
    spec: ComponentSpec, engine_path: Path, onnx_path: Path, bf16_base: bool, max_rel_l2: float
) -> list[Comparison]:
    """Run the engine and ONNX Runtime (on the graph the engine came from) on the validation shapes through
    polygraphy's Comparator. Inputs are float32 / int32 torch tensors: polygraphy casts them to each runner's
    input types (bf16 for a bf16 engine; ONNX Runtime runs a bf16 graph upcast to float32)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    from fluxexport.backends.onnxruntime_backend import create_session, default_providers

    sizes = validation_sizes(spec)
    feeds = [sample_inputs(spec, shape, seed=index) for index, (shape, _) in enumerate(sizes)]
    session = create_session(onnx_path, bf16_base, default_providers())
    runners = [
        TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))), name=f"{spec.name}-tensorrt"),
        OnnxrtRunner(session, name=f"{spec.name}-onnxruntime"),
    ]
    results = Comparator.run(runners, data_loader=feeds)
    return comparisons_from_results(spec, results, sizes, max_rel_l2)


def validate_engines(
    source: ModelSource,
    engines: Path,
    components: list[str] | None = None,
    steps: int = 4,
    max_rel_l2: float | None = None,
    min_psnr: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[ValidationReport, str]:
    """Validate a folder of TensorRT engines: (report, PyTorch reference dtype). Refuses in one line where
    TensorRT or polygraphy is missing."""
    from fluxexport.backends.torch_backend import TorchBackend
    from fluxexport.export.manifest import read_manifest
    from fluxexport.tensorrt.backend import TensorRTBackend
    from fluxexport.tensorrt.builder import POLYGRAPHY_HELP
    from fluxexport.tensorrt.environment import import_tensorrt

    import_tensorrt()
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise FluxExportError(f"polygraphy is not installed: {POLYGRAPHY_HELP}") from None
    engines = Path(engines)
    entries = read_manifest(engines)["components"]
    names = components or list(entries)
    missing = [name for name in names if name not in entries]
    if missing:
        raise FluxExportError(f"{engines} has no {missing[0]} engine: fluxexport build --components {missing[0]}")
    precisions = {name: entries[name]["precision"] for name in names}
    reference = "fp32" if "fp32" in precisions.values() else "bf16"
    specs = component_specs(source)
    total, started = len(names) * 2 + 2, [0]

    def stage_started(_stage: str) -> None:
        if on_progress:
            on_progress(started[0], total)
        started[0] += 1

    with TensorRTBackend(source, engines) as candidate, TorchBackend(source, reference, "cuda") as torch_reference:
        report = validate(
            source, candidate, torch_reference, precisions, str(engines), steps, max_rel_l2, min_psnr,
            stage_started, thresholds=TENSORRT_THRESHOLDS,
        )  # fmt: skip
    for name in names:
        stage_started(name)
        entry = entries[name]
        onnx_path = Path(entry["onnx"])
        if not onnx_path.is_file():
            raise FluxExportError(f"{name}: its graph {onnx_path} is gone: the engine cannot be compared with it")
        limit = TENSORRT_THRESHOLDS[entry["precision"]][0] if max_rel_l2 is None else max_rel_l2
        bf16_base = entry["precision"] in ("bf16", "fp8")
        report.components += compare_with_onnxruntime(specs[name], engines / entry["file"], onnx_path, bf16_base, limit)
    return report, reference
