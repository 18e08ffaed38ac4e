"""`fluxexport bench`: per-stage and end-to-end latency of one request on any backend."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from fluxexport.commands.run import ReduxPrior
    from fluxexport.models.source import ModelSource
    from fluxexport.runtime.backend import Backend
    from fluxexport.runtime.request import GenerationRequest

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
    # --redux: a FLUX.1 Redux prior in front of the model, varying a picture of bench's own (no prompt), its stages
    # timed as rows of their own; --redux-engines: its graphs (onnxruntime) or engines (tensorrt), else PyTorch
    redux: str | None = None
    redux_engines: Path | None = None


@dataclass(frozen=True)
class BenchResult:
    """The backend measured, `benchmark.run_benchmark`'s numbers, and the JSON file written (when asked)."""

    backend: str
    numbers: dict
    json_path: Path | None


def run_bench(options: BenchOptions, progress: Progress = no_progress, log: Log = no_log) -> BenchResult:
    """Warm up, then time `options.repeats` generations of one fixed prompt on the chosen backend."""
    from fluxexport.benchmark import run_benchmark
    from fluxexport.commands.run import open_redux_backend
    from fluxexport.runtime.cache import parse_cache
    from fluxexport.runtime.redux import placeholder_conditioning, with_conditioning
    from fluxexport.runtime.request import GenerationRequest, resolve_request, sample_conditions

    cache = parse_cache(options.cache)
    if options.repeats < 1 or options.warmup < 0:
        raise FluxExportError("--repeats must be ≥ 1 and --warmup ≥ 0")
    if options.redux_engines is not None and options.redux is None:
        raise FluxExportError("--redux-engines is the Redux prior's folder: add --redux PRIOR")
    source = open_source(options.model)
    size = tuple(source.default_size if side is None else side for side in (options.height, options.width))
    request = GenerationRequest(BENCH_PROMPT, height=size[0], width=size[1], num_inference_steps=options.steps,
                                num_images_per_prompt=options.batch, **sample_conditions(source, *size))  # fmt: skip
    prior = None if options.redux is None else check_prior(options, source, *size)
    if prior is not None:  # the base takes the prior's embeddings instead of the prompt (their shapes, for now)
        request = with_conditioning(request, placeholder_conditioning(prior.redux, source))
    resolve_request(source, request)  # every value checked before any weight loads
    backend = choose_backend(options.runner.backend, options.runner.engines)
    engine = open_backend(options.runner, source, backend, log)
    prior_backend: Backend | None = None
    prepare: Callable[[], tuple[GenerationRequest, dict[str, float]]] | None = None
    if prior is not None:  # loaded before the clock starts, as the base's components are
        prior_backend = open_redux_backend(prior.redux, options.runner, options.redux_engines)
        prepare = prior_stage(prior_backend, engine, source, prior, request)
    try:
        with progress(f"bench {backend}", options.warmup + options.repeats) as advance:
            numbers = run_benchmark(
                engine, source, request, options.warmup, options.repeats, on_run=advance, cache=cache, prepare=prepare
            )  # fmt: skip
    finally:
        if prior_backend is not None:
            prior_backend.close()
    if options.json_path:
        write_text_atomic(options.json_path, json.dumps(numbers, indent=2) + "\n")
    return BenchResult(backend, numbers, options.json_path)


def check_prior(options: BenchOptions, source: ModelSource, height: int, width: int) -> ReduxPrior:
    """The Redux prior `options.redux` names with bench's own request to it (one picture of the output's size, no
    prompt), refused in one line as `run --redux` refuses it (a base it cannot feed, a folder of another prior)."""
    from fluxexport.commands.run import RunOptions, check_redux
    from fluxexport.runtime.redux import sample_redux_image

    asked = RunOptions(None, redux=options.redux, redux_engines=options.redux_engines)
    return check_redux(asked, source, [sample_redux_image(height, width)])


def prior_stage(
    prior_backend: Backend, engine: Backend, source: ModelSource, prior: ReduxPrior, request: GenerationRequest
) -> Callable[[], tuple[GenerationRequest, dict[str, float]]]:
    """`run_benchmark`'s stage before the pipeline: the prior's conditioning of its picture, and its stages' seconds."""
    from fluxexport.runtime.redux import redux_conditioning, with_conditioning

    def prepare() -> tuple[GenerationRequest, dict[str, float]]:
        conditioning = redux_conditioning(prior_backend, engine, source, prior.redux, prior.request)
        return with_conditioning(request, conditioning), conditioning.timings

    return prepare
