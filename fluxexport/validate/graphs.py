"""Compare exported graphs with PyTorch: per component across the dynamic range, and end to end (the metrics
and thresholds are `fluxexport.compare`'s)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fluxexport.compare import (
    THRESHOLDS,
    Comparison,
    ImageComparison,
    ValidationReport,
    compare_outputs,
    psnr,
    reference_dtype,
)
from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Backend
from fluxexport.runtime.cache import CacheSettings
from fluxexport.specs import ComponentSpec, component_specs, sample_inputs, validation_sizes


def compare_component(
    spec: ComponentSpec, candidate: Callable, reference: Callable, max_rel_l2: float, within_bounds: bool = False
) -> list[Comparison]:
    results = []
    for index, (sizes, seen) in enumerate(validation_sizes(spec, within_bounds)):
        feeds = sample_inputs(spec, sizes, seed=index)
        expected, actual = reference(feeds), candidate(feeds)
        results += compare_outputs(spec.name, actual, {t.name: expected[t.name] for t in spec.outputs}, sizes, seen,
                                   max_rel_l2)  # fmt: skip
    return results


def validation_resolutions(source: ModelSource) -> list[tuple[int, int]]:
    """The model's default square size and a non-square one (height, width)."""
    side = source.default_size
    return [(side, side), (side * 3 // 4 // 16 * 16, side * 5 // 4 // 16 * 16)]


def validate(
    source: ModelSource,
    candidate: Backend,
    reference: Backend,
    dtypes: dict[str, str],
    engines: str = "",
    steps: int = 4,
    max_rel_l2: float | None = None,
    min_psnr: float | None = None,
    on_progress: Callable[[str], None] | None = None,
    thresholds: dict[str, tuple[float, float]] = THRESHOLDS,
    bounds=None,
    cache: CacheSettings | None = None,
) -> ValidationReport:
    """Compare `candidate` (exported graphs) with `reference` (PyTorch) component by component, then images.

    `dtypes` maps each component to compare to its graph's dtype, which sets its threshold; the images'
    threshold is the loosest of theirs. `bounds` (ExportBounds): the range the candidate serves, when narrower
    than the model's export defaults (engines), so that every compared shape lies in it. `cache`: the step
    cache both sides generate the images with."""
    from fluxexport.runtime.pipeline import GenerationRequest, generate

    if min_psnr is None:
        min_psnr = min(thresholds[dtype][1] for dtype in dtypes.values())
    report = ValidationReport(source.name, engines, "+".join(sorted(set(dtypes.values()))))
    report.cache = str(cache or CacheSettings())
    specs = component_specs(source, bounds) if bounds is not None else component_specs(source)
    for name, dtype in dtypes.items():
        if on_progress:
            on_progress(name)
        limit = thresholds[dtype][0] if max_rel_l2 is None else max_rel_l2
        report.components += compare_component(
            specs[name], candidate.component(name), reference.component(name), limit, within_bounds=bounds is not None
        )
    for height, width in validation_resolutions(source):
        if on_progress:
            on_progress(f"image {width}×{height}")
        request = GenerationRequest(
            "a red fox in the snow", height=height, width=width, num_inference_steps=steps, seed=0
        )
        ours = generate(candidate, source, request, cache=cache).images
        theirs = generate(reference, source, request, cache=cache).images
        value = psnr(ours, theirs)
        difference = int(np.abs(ours.astype(int) - theirs.astype(int)).max())
        report.images.append(ImageComparison(height, width, value, difference, value >= min_psnr))
    return report


def validate_folder(
    source: ModelSource,
    engines: Path,
    components: list[str] | None = None,
    steps: int = 4,
    max_rel_l2: float | None = None,
    min_psnr: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    fp8: bool | None = None,
    optimized: bool | None = None,
    cache: CacheSettings | None = None,
) -> tuple[ValidationReport, str]:
    """Validate the graphs of `engines` (all, or `components`) against PyTorch: (report, reference dtype).
    `on_progress(done, total)` is called as each component and image comparison starts; `fp8` picks the
    transformer graph as the ONNX Runtime backend does (the FP8 one when the folder has it), `optimized` the
    fused graphs of `optimize` (the default when present: validate checks what `run` runs)."""
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.pytorch.backend import TorchBackend

    with OnnxRuntimeBackend(source, engines, upcast_bf16=True, fp8=fp8, optimized=optimized) as candidate:
        entries = candidate.entries
        names = components or list(entries)
        missing = [name for name in names if name not in entries]
        if missing:
            raise FluxExportError(
                f"{engines} has no {missing[0]} graph: export it first (fluxexport export --components {missing[0]})"
            )
        chosen = {name: entries[name] for name in names}
        dtype = reference_dtype(graph.base_dtype for graph in chosen.values())
        with TorchBackend(source, dtype=dtype, device="cpu") as reference:
            dtypes = {name: graph.dtype for name, graph in chosen.items()}
            total, started = len(names) + len(validation_resolutions(source)), []

            def stage_started(stage: str) -> None:
                started.append(stage)
                if on_progress:
                    on_progress(len(started) - 1, total)

            report = validate(
                source, candidate, reference, dtypes, str(engines), steps, max_rel_l2, min_psnr, stage_started,
                cache=cache,
            )  # fmt: skip
        report.graphs = {name: graph.file for name, graph in entries.items()}
    return report, dtype
