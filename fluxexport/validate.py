"""Compare exported graphs with PyTorch: per component across the dynamic range, and end to end."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Backend
from fluxexport.specs import ComponentSpec, component_specs, sample_inputs, validation_sizes

# Per export dtype: the largest rel-L2 a component may show, and the lowest end-to-end PSNR (dB).
THRESHOLDS = {"fp32": (1e-5, 50.0), "fp16": (2e-2, 30.0), "bf16": (5e-2, 25.0), "fp8": (6e-2, 20.0)}


@dataclass
class Comparison:
    component: str
    output: str
    sizes: dict[str, int]
    seen_at_export: bool
    max_abs: float
    rel_l2: float
    cosine: float
    passed: bool
    against: str = "pytorch"  # or "onnxruntime": a TensorRT engine against the graph it was built from


@dataclass
class ImageComparison:
    height: int
    width: int
    psnr: float
    max_abs_diff: int
    passed: bool


@dataclass
class ValidationReport:
    model: str
    engines: str
    dtype: str
    components: list[Comparison] = field(default_factory=list)
    images: list[ImageComparison] = field(default_factory=list)
    graphs: dict[str, str] = field(default_factory=dict)  # component → the graph file that ran

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.components) and all(i.passed for i in self.images)

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps({**asdict(self), "passed": self.passed}, indent=2, default=float) + "\n")
        return path


def metrics(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, float]:
    """(max abs, rel-L2, cosine) of `actual` against `expected`, in float64."""
    a, e = actual.double().flatten(), expected.double().flatten()
    difference = (a - e).norm().item()
    reference = e.norm().item()
    rel_l2 = difference / reference if reference else difference
    cosine = torch.nn.functional.cosine_similarity(a, e, dim=0).item() if reference else 1.0
    return (a - e).abs().max().item(), rel_l2, cosine


def compare_component(
    spec: ComponentSpec, candidate: Callable, reference: Callable, max_rel_l2: float, within_bounds: bool = False
) -> list[Comparison]:
    results = []
    for index, (sizes, seen) in enumerate(validation_sizes(spec, within_bounds)):
        feeds = sample_inputs(spec, sizes, seed=index)
        expected, actual = reference(feeds), candidate(feeds)
        for tensor in spec.outputs:
            max_abs, rel_l2, cosine = metrics(actual[tensor.name], expected[tensor.name])
            passed = math.isfinite(rel_l2) and rel_l2 <= max_rel_l2
            results.append(Comparison(spec.name, tensor.name, sizes, seen, max_abs, rel_l2, cosine, passed))
    return results


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


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
) -> ValidationReport:
    """Compare `candidate` (exported graphs) with `reference` (PyTorch) component by component, then images.

    `dtypes` maps each component to compare to its graph's dtype, which sets its threshold; the images'
    threshold is the loosest of theirs. `bounds` (ExportBounds): the range the candidate serves, when narrower
    than the model's export defaults (engines), so that every compared shape lies in it."""
    from fluxexport.runtime.pipeline import GenerationRequest, generate

    if min_psnr is None:
        min_psnr = min(thresholds[dtype][1] for dtype in dtypes.values())
    report = ValidationReport(source.name, engines, "+".join(sorted(set(dtypes.values()))))
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
        ours = generate(candidate, source, request).images
        theirs = generate(reference, source, request).images
        value = psnr(ours, theirs)
        difference = int(np.abs(ours.astype(int) - theirs.astype(int)).max())
        report.images.append(ImageComparison(height, width, value, difference, value >= min_psnr))
    return report


def reference_dtype(entries: dict[str, dict]) -> str:
    """The PyTorch dtype to compare graphs with: bf16 (or fp16) when they all compute in it — an FP8 graph
    computes the rest in its base dtype — else fp32."""
    bases = {entry.get("base_dtype", entry["dtype"]) for entry in entries.values()}
    return "bf16" if bases == {"bf16"} else "fp16" if bases == {"fp16"} else "fp32"


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
) -> tuple[ValidationReport, str]:
    """Validate the graphs of `engines` (all, or `components`) against PyTorch: (report, reference dtype).
    `on_progress(done, total)` is called as each component and image comparison starts; `fp8` picks the
    transformer graph as the ONNX Runtime backend does (the FP8 one when the folder has it), `optimized` the
    fused graphs of `optimize` (the default when present: validate checks what `run` runs)."""
    from fluxexport.backends.onnxruntime_backend import OnnxRuntimeBackend
    from fluxexport.backends.torch_backend import TorchBackend
    from fluxexport.errors import FluxExportError

    with OnnxRuntimeBackend(source, engines, upcast_bf16=True, fp8=fp8, optimized=optimized) as candidate:
        entries = candidate.entries
        names = components or list(entries)
        missing = [name for name in names if name not in entries]
        if missing:
            raise FluxExportError(
                f"{engines} has no {missing[0]} graph: export it first (fluxexport export --components {missing[0]})"
            )
        chosen = {name: entries[name] for name in names}
        dtype = reference_dtype(chosen)
        with TorchBackend(source, dtype=dtype, device="cpu") as reference:
            dtypes = {name: entry["dtype"] for name, entry in chosen.items()}
            total, started = len(names) + len(validation_resolutions(source)), []

            def stage_started(stage: str) -> None:
                started.append(stage)
                if on_progress:
                    on_progress(len(started) - 1, total)

            report = validate(
                source, candidate, reference, dtypes, str(engines), steps, max_rel_l2, min_psnr, stage_started
            )
        report.graphs = {name: entry["file"] for name, entry in entries.items()}
    return report, dtype
