"""`fluxexport calibrate-teacache`: fit TeaCache's rescaling polynomial for one model, as ali-vilab fit theirs,
and write it with its provenance for `--cache teacache:coefficients=FILE`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fluxexport import __version__
from fluxexport.backend_factory import choose_backend
from fluxexport.commands.common import (
    BackendOptions,
    Log,
    ModelOptions,
    Progress,
    check_out_file,
    no_log,
    no_progress,
    open_backend,
    open_source,
)
from fluxexport.errors import FluxExportError
from fluxexport.runtime.request import GenerationRequest, ResolvedRequest

# Prompts of different content, for a fit that is not one image's (ali-vilab fit over many prompts)
DEFAULT_PROMPTS = (
    "a photo of a red fox in the snow at dawn",
    "an oil painting of a harbour town with sailing boats",
    "a close-up of a bowl of ramen on a wooden table",
    "a watercolour map of an imaginary island",
)


@dataclass(frozen=True)
class TeaCalibrateOptions:
    """`fluxexport calibrate-teacache`'s options: every prompt runs as one batch, once per seed."""

    out: Path
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: tuple[int, ...] = (0,)
    model: ModelOptions = field(default_factory=ModelOptions)
    runner: BackendOptions = field(default_factory=BackendOptions)
    steps: int = 28
    height: int | None = None
    width: int | None = None
    guidance: float | None = None


@dataclass(frozen=True)
class TeaCalibrateResult:
    request: ResolvedRequest
    pairs: list[tuple[float, float]]  # (input change, output change), every step after the first of every run
    coefficients: tuple[float, ...]  # highest power first
    path: Path


def calibrate_teacache(
    options: TeaCalibrateOptions, progress: Progress = no_progress, log: Log = no_log
) -> TeaCalibrateResult:
    """Run `options`' prompts uncached through the transformer's parts once per seed, record each step's
    (input change, output change), fit the degree-4 polynomial and write it to `options.out`."""
    from fluxexport.runtime.pipeline import generate, resolve_request
    from fluxexport.runtime.teacache import TeaCalibration, check_enough_pairs, fit_polynomial, write_coefficients

    source = open_source(options.model)
    requests = [
        GenerationRequest(
            list(options.prompts),
            height=options.height,
            width=options.width,
            num_inference_steps=options.steps,
            guidance_scale=options.guidance,
            seed=seed,
        )  # fmt: skip
        for seed in options.seeds
    ]
    resolved = [resolve_request(source, request) for request in requests]  # every request checked before loading
    check_enough_pairs(resolved[0].steps, len(resolved))
    check_out_file(options.out)
    backend = choose_backend(options.runner.backend, options.runner.engines)
    engine = open_backend(options.runner, source, backend, log)
    pairs: list[tuple[float, float]] = []
    first = resolved[0]
    for request, seed in zip(requests, options.seeds, strict=True):
        title = f"calibrate teacache {source.name} {first.width}×{first.height} · batch {first.batch} · seed {seed}"
        calibration = TeaCalibration()
        with progress(title, first.steps) as advance:
            generate(engine, source, request, advance, calibration)
        pairs += calibration.pairs
    polynomial = fit_polynomial(pairs)
    try:
        path = write_coefficients(
            options.out, polynomial, model=source.name, transformer_class=source.family.transformer_class,
            steps=first.steps, prompts=first.prompts, seeds=list(options.seeds), height=first.height,
            width=first.width, guidance=first.guidance_scale, backend=engine.name, pairs=[list(p) for p in pairs],
            fluxexport_version=__version__,
        )  # fmt: skip
    except OSError as error:
        raise FluxExportError(f"cannot write {options.out}: {error.strerror or error} (--out)") from None
    return TeaCalibrateResult(first, pairs, polynomial, path)
