"""How close a candidate is to its reference, with no backend in sight: the metrics, the thresholds per dtype,
the rows of a validation report, and the PyTorch dtype a set of graphs or engines is compared with."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

# Per dtype: the largest rel-L2 a component may show, and the lowest end-to-end PSNR (dB).
# nvfp4: FP8's bound keeps ~21x its worst measured error (6e-2 over 2.3-2.8e-3 rel-L2 against fp32); NVFP4 measured
# 0.93-1.09e-2 on tiny-dev, and the same ~21x over 1.09e-2 is 0.23, rounded up to 0.25. Its images keep FP8's 20 dB
# (not measured: no NVFP4 engine has run here, and ONNX Runtime runs no NVFP4 graph).
NVFP4_THRESHOLD = (2.5e-1, 20.0)
THRESHOLDS = {
    "fp32": (1e-5, 50.0), "fp16": (2e-2, 30.0), "bf16": (5e-2, 25.0), "fp8": (6e-2, 20.0), "nvfp4": NVFP4_THRESHOLD,
}  # fmt: skip
# Engines against PyTorch (and against ONNX Runtime on their own graph): TensorRT picks its own kernels
TENSORRT_THRESHOLDS = {
    "fp32": (1e-3, 40.0), "fp16": (2e-2, 30.0), "bf16": (1e-2, 25.0), "fp8": (6e-2, 20.0), "nvfp4": NVFP4_THRESHOLD,
}  # fmt: skip
# The embedded timestep/guidance vector (`temb`, an output of the transformer's head) in fp32: its sinusoids take
# timestep and guidance × 1000 as phase (up to ~4000 rad at guidance 4), and the exporter folds their frequencies
# (exp of a constant) with another exp than PyTorch's, a few ulp apart (1.8e-7 relative measured on tiny-dev):
# phase errors up to ~1e-3 rad, 1.2–1.35e-5 rel-L2 on tiny-dev's guidance-distilled head. Every other output,
# and `temb` in every other dtype, keeps its dtype's bound.
FP32_OUTPUT_LIMITS = {"temb": 1e-4}


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
class CacheQuality:
    """What a step cache costs, per end-to-end image: PSNR of the cached image against the uncached one of the
    same seed on the same side (candidate; `reference_psnr` PyTorch's), and each side's skip decisions (per
    transformer call: whether it computed)."""

    height: int
    width: int
    psnr: float
    reference_psnr: float
    decisions: list[bool]
    reference_decisions: list[bool]
    same_decisions: bool


@dataclass
class ValidationReport:
    model: str
    engines: str
    dtype: str
    components: list[Comparison] = field(default_factory=list)
    images: list[ImageComparison] = field(default_factory=list)
    graphs: dict[str, str] = field(default_factory=dict)  # component → the graph file that ran
    subject: str = "graphs"  # or "engines"
    cache: str = "none"  # the step cache of the end-to-end images
    cache_quality: list[CacheQuality] = field(default_factory=list)  # with a cache: what it costs, per image

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


def within(rel_l2: float, limit: float) -> bool:
    """A rel-L2 passes when finite and at most `limit` (NaN and inf fail)."""
    return math.isfinite(rel_l2) and rel_l2 <= limit


def output_limit(output: str, dtype: str, limit: float) -> float:
    """The rel-L2 bound of `output` in a `dtype` graph whose outputs are bounded by `limit` (`FP32_OUTPUT_LIMITS`
    loosens only the fp32 outputs it names, never below `limit`)."""
    return max(limit, FP32_OUTPUT_LIMITS.get(output, limit)) if dtype == "fp32" else limit


def compare_outputs(
    component: str, actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], sizes: dict[str, int],
    seen: bool, limit: float, against: str = "pytorch", dtype: str | None = None,
) -> list[Comparison]:  # fmt: skip
    """One row per output of `expected`: the candidate's outputs at one shape against the reference's. `dtype`:
    the graph's, when `limit` is its default bound (then `output_limit` applies per output)."""
    rows = []
    for name, reference in expected.items():
        max_abs, rel_l2, cosine = metrics(actual[name], reference)
        bound = output_limit(name, dtype, limit) if dtype else limit
        rows.append(Comparison(component, name, sizes, seen, max_abs, rel_l2, cosine, within(rel_l2, bound), against))
    return rows


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def reference_dtype(base_dtypes: Iterable[str]) -> str:
    """The PyTorch dtype to compare with: bf16 (or fp16) when every graph or engine computes in it (an FP8 one
    computes the rest in its base dtype), else fp32."""
    bases = set(base_dtypes)
    return "bf16" if bases == {"bf16"} else "fp16" if bases == {"fp16"} else "fp32"
