"""`fluxexport bench`: latency per stage and end to end for any backend, with peak GPU memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from fluxexport.backends.base import Backend
from fluxexport.models.source import ModelSource
from fluxexport.runtime.pipeline import GenerationRequest, generate, resolve_request


def run_benchmark(
    backend: Backend,
    source: ModelSource,
    request: GenerationRequest,
    warmup: int = 1,
    repeats: int = 5,
    on_run: Callable[[int, int], None] | None = None,
) -> dict:
    """Warm up, then time `repeats` generations; the runtime's own stage timings (synced once per stage)."""
    resolved = resolve_request(source, request)
    cuda = backend.device.type == "cuda"
    runs: list[dict[str, float]] = []
    for index in range(warmup + repeats):
        if cuda and index == warmup:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = generate(backend, source, request)
        timings = dict(result.timings, wall=time.perf_counter() - start)
        if index >= warmup:
            runs.append(timings)
        if on_run:
            on_run(index + 1, warmup + repeats)
    stages = [stage for stage in runs[0] if stage != "total"] + ["total"]
    return {
        "backend": backend.name,
        "device": str(torch.cuda.get_device_name() if cuda else "cpu"),
        "model": source.name,
        "height": resolved.height,
        "width": resolved.width,
        "steps": resolved.steps,
        "batch": resolved.batch,
        "repeats": repeats,
        "median_ms": {stage: 1000 * statistics.median(run[stage] for run in runs) for stage in stages},
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
