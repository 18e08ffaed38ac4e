"""Compare exported graphs with PyTorch: per component across the dynamic range, and end to end (the metrics
and thresholds are `fluxexport.compare`'s)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fluxexport.artifacts.folders import open_export
from fluxexport.compare import (
    THRESHOLDS,
    CacheQuality,
    Comparison,
    ImageComparison,
    ValidationReport,
    compare_outputs,
    psnr,
    reference_dtype,
)
from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Backend, Component, Feeds
from fluxexport.runtime.cache import CacheSettings
from fluxexport.specs import TRANSFORMER_PARTS, ComponentSpec, component_specs, sample_inputs, validation_sizes


def compare_component(
    spec: ComponentSpec, candidate: Callable, reference: Callable, max_rel_l2: float, within_bounds: bool = False,
    dtype: str | None = None,
) -> list[Comparison]:  # fmt: skip
    """`candidate` against `reference` at the spec's validation shapes; `dtype`: the graph's, when `max_rel_l2`
    is its default bound (`compare.output_limit` then applies per output)."""
    results = []
    for index, (sizes, seen) in enumerate(validation_sizes(spec, within_bounds)):
        feeds = sample_inputs(spec, sizes, seed=index)
        expected, actual = reference(feeds), candidate(feeds)
        results += compare_outputs(spec.name, actual, {t.name: expected[t.name] for t in spec.outputs}, sizes, seen,
                                   max_rel_l2, dtype=dtype)  # fmt: skip
    return results


def validation_resolutions(source: ModelSource, bounds=None) -> list[tuple[int, int]]:
    """The model's default square size and a non-square one (height, width); within `bounds` (ExportBounds:
    engines serve only their profiles' sides) when given, the square side then the engines' largest."""
    side = source.default_size
    if bounds is not None:
        side = max(bounds.min_resolution, min(side, bounds.max_resolution * 4 // 5 // 16 * 16))
    return [(side, side), (side * 3 // 4 // 16 * 16, side * 5 // 4 // 16 * 16)]


def holding_group(name: str) -> str:
    """Which components are held together: one module's (both VAE components), the transformer's parts apart
    from the whole transformer (they are the same weights again)."""
    from fluxexport.models.loaders import MODULE_OF

    return "transformer parts" if name in TRANSFORMER_PARTS else MODULE_OF.get(name, name)


class OneModuleAtATime:
    """A Backend that holds the components of one module at a time (the transformer's parts together, both VAE
    components together, `holding_group`): asking for another module's component closes what is loaded first.
    What validation runs each side through, so that its peak memory is one module's, not the model's."""

    def __init__(self, open_backend: Callable[[], Backend]):
        self.open_backend = open_backend
        self.backend: Backend | None = None
        self.module: str | None = None
        self.name = "one module at a time"
        self.device = self._current().device

    def _current(self) -> Backend:
        if self.backend is None:
            self.backend = self.open_backend()
        return self.backend

    def component(self, name: str) -> Component:
        module = holding_group(name)
        if module != self.module:
            if self.module is not None:
                self.close()
            self.module = module
        return self._current().component(name)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend, self.module = None, None


@dataclass
class SideRun:
    """What one side (candidate or reference) computed: each component's outputs at each validation shape (on
    the host), and the end-to-end images."""

    outputs: dict[str, list[Feeds]] = field(default_factory=dict)
    images: list[np.ndarray] = field(default_factory=list)
    uncached: list[np.ndarray] = field(default_factory=list)  # with a cache: the same requests without it
    decisions: list[list[bool]] = field(default_factory=list)  # with a cache: its skip decisions per request


def run_side(
    open_backend: Callable[[], Backend],
    source: ModelSource,
    specs: dict[str, ComponentSpec],
    sizes: dict[str, list[tuple[dict[str, int], bool]]],
    requests: list,
    cache: CacheSettings | None,
    on_progress: Callable[[str], None] | None = None,
) -> SideRun:
    """Run every component of `sizes` at its shapes, then generate `requests`, through one module at a time of
    the backend `open_backend` opens; everything is closed on return."""
    from fluxexport.runtime.pipeline import family_runtime, generate

    family_runtime(source).check_cache(source, cache or CacheSettings())  # generate checks no state it is given
    run = SideRun()
    backend = OneModuleAtATime(open_backend)
    try:
        for name, shapes in sizes.items():
            if on_progress:
                on_progress(name)
            run.outputs[name] = [
                {t.name: value.cpu() for t, value in _outputs(specs[name], backend.component(name), shape, index)}
                for index, (shape, _) in enumerate(shapes)
            ]  # no reference to the component kept here: the next module's closes it
        for request in requests:
            if on_progress:
                on_progress(f"image {request.width}×{request.height}")
            state = (cache or CacheSettings()).new_state(request.num_inference_steps)
            run.images.append(generate(backend, source, request, cache=state).images)
            if cache is not None and cache.name != "none":  # what the cache costs, on this side's own images
                run.decisions.append(state.decisions)
                run.uncached.append(generate(backend, source, request).images)
    finally:
        backend.close()
    return run


def _outputs(spec: ComponentSpec, component: Component, shape: dict[str, int], index: int):
    """The spec's outputs the component gives (all of them today: a published VAE encoder, which samples inside,
    runs as a copy that gives `latent` and `latent_std` too)."""
    outputs = component(sample_inputs(spec, shape, seed=index))
    return [(tensor, outputs[tensor.name]) for tensor in spec.outputs if tensor.name in outputs]


def validate(
    source: ModelSource,
    open_candidate: Callable[[], Backend],
    open_reference: Callable[[], Backend],
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
    """Compare the candidate (exported graphs, engines) with the reference (PyTorch) component by component,
    then images. Each side runs alone, reference first, one module at a time (`OneModuleAtATime`), and keeps
    only its outputs: the peak memory is the larger side's largest module, never both sides' models.

    `dtypes` maps each component to compare to its graph's dtype, which sets its threshold; the images'
    threshold is the loosest of theirs. `bounds` (ExportBounds): the range the candidate serves, when narrower
    than the model's export defaults (engines), so that every compared shape lies in it. `cache`: the step
    cache both sides generate the images with. `on_progress` is called with each stage's name as it starts,
    on each side."""
    from fluxexport.runtime.pipeline import GenerationRequest
    from fluxexport.runtime.request import sample_conditions

    if min_psnr is None:
        min_psnr = min(thresholds[dtype][1] for dtype in dtypes.values())
    report = ValidationReport(source.name, engines, "+".join(sorted(set(dtypes.values()))))
    report.cache = str(cache or CacheSettings())
    specs = component_specs(source, bounds) if bounds is not None else component_specs(source)
    sizes = {name: validation_sizes(specs[name], within_bounds=bounds is not None) for name in dtypes}
    requests = [
        GenerationRequest("a red fox in the snow", height=height, width=width, num_inference_steps=steps, seed=0,
                          **sample_conditions(source, height, width))  # FLUX.1 Fill's image and mask, Control's map
        for height, width in validation_resolutions(source, bounds)
    ]  # fmt: skip
    theirs = run_side(open_reference, source, specs, sizes, requests, cache, on_progress)
    ours = run_side(open_candidate, source, specs, sizes, requests, cache, on_progress)
    for name, dtype in dtypes.items():
        limit = thresholds[dtype][0] if max_rel_l2 is None else max_rel_l2
        for (shape, seen), actual, expected in zip(sizes[name], ours.outputs[name], theirs.outputs[name], strict=True):
            expected = {output: value for output, value in expected.items() if output in actual}  # the graph's own
            report.components += compare_outputs(
                name, actual, expected, shape, seen, limit, dtype=dtype if max_rel_l2 is None else None
            )
    for request, mine, reference in zip(requests, ours.images, theirs.images, strict=True):
        value = psnr(mine, reference)
        difference = int(np.abs(mine.astype(int) - reference.astype(int)).max())
        report.images.append(ImageComparison(request.height, request.width, value, difference, value >= min_psnr))
    report.cache_quality = cache_quality(requests, ours, theirs)
    return report


def cache_quality(requests: list, ours: SideRun, theirs: SideRun) -> list[CacheQuality]:
    """Per request run with a cache: each side's cached image against its own uncached one, and the decisions."""
    rows = []
    for index, request in enumerate(requests[: len(ours.uncached)]):
        mine, reference = ours.decisions[index], theirs.decisions[index]
        rows.append(CacheQuality(
            request.height, request.width, psnr(ours.images[index], ours.uncached[index]),
            psnr(theirs.images[index], theirs.uncached[index]), mine, reference, mine == reference,
        ))  # fmt: skip
    return rows


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

    def open_candidate(upcast_folder: Path | None = None) -> OnnxRuntimeBackend:
        return OnnxRuntimeBackend(
            source, engines, upcast_bf16=True, fp8=fp8, optimized=optimized, upcast_folder=upcast_folder
        )

    entries = open_candidate().entries
    names = components or list(entries)
    missing = [name for name in names if name not in entries]
    parts = cache.components if cache is not None and cache.components != ("transformer",) else ()  # block skips
    missing += [name for name in parts if name not in entries and name not in missing]
    if missing:  # a cache's transformer parts too, before any comparison runs (fuzzing found it 8 s in)
        raise FluxExportError(
            f"{engines} has no {missing[0]} graph: export it first (fluxexport export --model {source.name} "
            f"--dtype {open_export(Path(engines)).dtype} --components {','.join(missing)} --out {engines})"
        )
    chosen = {name: entries[name] for name in names}
    dtype = reference_dtype(graph.base_dtype for graph in chosen.values())
    dtypes = {name: graph.dtype for name, graph in chosen.items()}
    total, started = 2 * (len(names) + len(validation_resolutions(source))), []

    def stage_started(stage: str) -> None:
        started.append(stage)
        if on_progress:
            on_progress(len(started) - 1, total)

    with upcast_copies(Path(engines)) as upcast_folder:
        report = validate(
            source, lambda: open_candidate(upcast_folder), lambda: TorchBackend(source, dtype=dtype, device="cpu"),
            dtypes, str(engines), steps, max_rel_l2, min_psnr, stage_started, cache=cache,
        )  # fmt: skip
    report.graphs = {name: graph.file for name, graph in entries.items()}
    return report, dtype


@contextmanager
def upcast_copies(folder: Path) -> Iterator[Path]:
    """A folder for the float32 copies of a validation's bf16 graphs (each written once, however many sessions
    open it), beside the graphs (their disk) or in the system's temp folder where theirs is read-only; removed
    on exit."""
    import os
    import shutil

    parent = folder if os.access(folder, os.W_OK) else Path(tempfile.gettempdir())
    upcast_folder = Path(tempfile.mkdtemp(dir=parent, prefix=".fluxexport-upcast-"))
    try:
        yield upcast_folder
    finally:
        shutil.rmtree(upcast_folder, ignore_errors=True)
