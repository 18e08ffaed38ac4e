"""`fluxexport bench`: per-stage and end-to-end latency of one request on any backend."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fluxexport.atomic import write_text_atomic
from fluxexport.backend_factory import choose_backend
from fluxexport.commands.common import (
    BackendOptions,
    Log,
    ModelOptions,
    Progress,
    no_log,
    no_progress,
    open_backend,
    open_source,
)
from fluxexport.errors import FluxExportError

BENCH_PROMPT = "a photo of a red fox in the snow"


@dataclass(frozen=True)
class BenchOptions:
    """`fluxexport bench`'s options; None means the model's default."""

    model: ModelOptions = field(default_factory=ModelOptions)
    runner: BackendOptions = field(default_factory=BackendOptions)
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    batch: int = 1
    warmup: int = 1
    repeats: int = 5
    cache: str | None = None
    json_path: Path | None = None


@dataclass(frozen=True)
class BenchResult:
    """The backend measured, `benchmark.run_benchmark`'s numbers, and the JSON file written (when asked)."""

    backend: str
    numbers: dict
    json_path: Path | None


def run_bench(options: BenchOptions, progress: Progress = no_progress, log: Log = no_log) -> BenchResult:
    """Warm up, then time `options.repeats` generations of one fixed prompt on the chosen backend."""
    from fluxexport.benchmark import run_benchmark
    from fluxexport.runtime.cache import parse_cache
    from fluxexport.runtime.request import GenerationRequest, resolve_request, sample_conditions

    cache = parse_cache(options.cache)
    if options.repeats < 1 or options.warmup < 0:
        raise FluxExportError("--repeats must be ≥ 1 and --warmup ≥ 0")
    source = open_source(options.model)
    size = tuple(source.default_size if side is None else side for side in (options.height, options.width))
    request = GenerationRequest(BENCH_PROMPT, height=size[0], width=size[1], num_inference_steps=options.steps,
                                num_images_per_prompt=options.batch, **sample_conditions(source, *size))  # fmt: skip
    resolve_request(source, request)  # every value checked before any weight loads
    backend = choose_backend(options.runner.backend, options.runner.engines)
    engine = open_backend(options.runner, source, backend, log)
    with progress(f"bench {backend}", options.warmup + options.repeats) as advance:
        numbers = run_benchmark(engine, source, request, options.warmup, options.repeats, on_run=advance, cache=cache)
    if options.json_path:
        write_text_atomic(options.json_path, json.dumps(numbers, indent=2) + "\n")
    return BenchResult(backend, numbers, options.json_path)
