"""`fluxexport run` and `calibrate-magcache`: a request checked whole before any weight loads, then one
backend that runs it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fluxexport.backend_factory import choose_backend
from fluxexport.commands.common import (
    BackendOptions,
    Log,
    ModelOptions,
    Progress,
    check_out_file,
    check_output_paths,
    no_log,
    no_progress,
    open_backend,
    open_source,
)
from fluxexport.errors import FluxExportError
from fluxexport.runtime.request import GenerationRequest, GenerationResult, ResolvedRequest

if TYPE_CHECKING:
    from fluxexport.models.redux import ReduxSource
    from fluxexport.models.source import ModelSource
    from fluxexport.runtime.backend import Backend
    from fluxexport.runtime.redux import ReduxConditioning, ReduxRequest


@dataclass(frozen=True)
class RunOptions:
    """`fluxexport run`'s options; None means the model's default."""

    prompt: str | None  # optional with `redux` only
    model: ModelOptions = field(default_factory=ModelOptions)
    runner: BackendOptions = field(default_factory=BackendOptions)
    prompt_2: str | None = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    num_images: int = 1
    max_sequence_length: int | None = None
    references: tuple[Path, ...] = ()  # --image: reference images (Kontext, FLUX.2), Fill's image to repaint
    mask: Path | None = None  # --mask: FLUX.1 Fill's mask
    control_image: Path | None = None  # --control-image: FLUX.1 Canny/Depth's edge or depth map
    keep_reference_size: bool = False
    cache: str | None = None
    output: Path = Path("flux.png")
    # --redux: a FLUX.1 Redux prior in front of the model (`references` are its images, the prompt is optional);
    # --redux-engines: its exported graphs (onnxruntime); the per-image scales of its text and pooled embeddings
    redux: str | None = None
    redux_engines: Path | None = None
    prompt_embeds_scale: tuple[float, ...] = (1.0,)
    pooled_prompt_embeds_scale: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class RunResult:
    """What `run_images` did: the backend it ran on, the request as resolved, the PNGs written and the run's
    timings, warnings and cache counts (`generation`)."""

    backend: str
    model: str
    request: ResolvedRequest
    generation: GenerationResult
    paths: list[Path]


def run_images(options: RunOptions, progress: Progress = no_progress, log: Log = no_log) -> RunResult:
    """Check the whole request (values, references within the engines' budget, the output folder) before any
    weight loads, generate on the backend, and write each image atomically."""
    from fluxexport.runtime.cache import parse_cache
    from fluxexport.runtime.images import load_reference, save_png_atomic
    from fluxexport.runtime.pipeline import generate, resolve_request
    from fluxexport.runtime.redux import placeholder_conditioning, with_conditioning
    from fluxexport.specs import check_served

    cache = parse_cache(options.cache)
    source = open_source(options.model)
    references = [load_reference(path) for path in options.references]  # as diffusers' load_image reads them
    mask, control = (
        None if path is None else load_reference(path, option)
        for path, option in ((options.mask, "--mask"), (options.control_image, "--control-image"))
    )
    prior = None if options.redux is None else check_redux(options, source, references)
    request = GenerationRequest(
        prompt=options.prompt, prompt_2=options.prompt_2, height=options.height, width=options.width,
        num_inference_steps=options.steps, guidance_scale=options.guidance, seed=options.seed,
        num_images_per_prompt=options.num_images, max_sequence_length=options.max_sequence_length,
        image=references or None, auto_resize_reference=not options.keep_reference_size,
        negative_prompt=options.negative_prompt, mask=mask, control_image=control,
    )  # fmt: skip
    if prior is not None:  # the prompt and images are the prior's; the base takes its embeddings (shapes, for now)
        request = with_conditioning(request, placeholder_conditioning(prior.redux, source))
    resolved = resolve_request(source, request)  # validate everything before any weight is loaded
    backend = choose_backend(options.runner.backend, options.runner.engines)
    check_served(source, backend, options.runner.engines, resolved)  # references within the engines' budget
    paths = check_output_paths(options.output, resolved.batch)
    engine = open_backend(options.runner, source, backend, log)
    prior_seconds = None
    if prior is not None:
        start = time.perf_counter()
        request = with_conditioning(request, run_prior(prior, source, engine, options.runner, options.redux_engines))
        prior_seconds = time.perf_counter() - start
    with progress(f"{source.name} {resolved.width}×{resolved.height}", resolved.steps) as advance:
        generation = generate(engine, source, request, on_step=advance, cache=cache)
    if prior_seconds is not None:  # the Redux prior ran before the pipeline (its modules' loading included)
        generation.timings = {"redux_prior": prior_seconds} | generation.timings
    for image, path in zip(generation.images, paths, strict=True):
        save_png_atomic(image, path)
    return RunResult(backend, source.name, resolved, generation, paths)


@dataclass(frozen=True)
class ReduxPrior:
    """A run's FLUX.1 Redux prior (`--redux`) and what it is asked, checked before any weight loads."""

    redux: ReduxSource
    request: ReduxRequest


def check_redux(options: RunOptions, source: ModelSource, images: list) -> ReduxPrior:
    """The prior `options.redux` names, refused in one line where it cannot feed `source` or take the request."""
    from fluxexport.models.redux import resolve_redux
    from fluxexport.runtime.redux import ReduxRequest, check_redux_request

    redux = resolve_redux(options.redux)  # type: ignore[arg-type]
    redux.check_base(source)
    request = ReduxRequest(
        tuple(images), options.prompt, options.prompt_2, options.prompt_embeds_scale,
        options.pooled_prompt_embeds_scale, options.keep_reference_size,
    )  # fmt: skip
    check_redux_request(redux, request)
    if options.redux_engines is not None:  # graphs or engines of this prior, refused before any weight loads
        from fluxexport.artifacts.redux import is_redux_engines, open_redux_engines, open_redux_export

        folder = options.redux_engines
        _ = (
            open_redux_engines(folder, redux.name)
            if is_redux_engines(folder)
            else open_redux_export(folder, redux.name)
        )
    return ReduxPrior(redux, request)


def open_redux_backend(redux: ReduxSource, runner: BackendOptions, engines: Path | None) -> Backend:
    """The prior's backend: its engines on TensorRT or its exported graphs on ONNX Runtime (`engines`, by what the
    folder holds), else its modules in PyTorch."""
    from fluxexport.artifacts.redux import is_redux_engines

    if engines is not None and is_redux_engines(engines):
        from fluxexport.tensorrt.redux import TensorRTReduxBackend

        return TensorRTReduxBackend(redux, engines)
    if engines is not None:
        from fluxexport.onnxruntime.redux import OnnxReduxBackend

        return OnnxReduxBackend(redux, engines)
    from fluxexport.pytorch.redux import TorchReduxBackend

    return TorchReduxBackend(redux, dtype=runner.dtype, device=runner.device)


def run_prior(
    prior: ReduxPrior, source: ModelSource, engine: Backend, runner: BackendOptions, engines: Path | None
) -> ReduxConditioning:
    """The prior's conditioning: its images on its own backend, the prompt's encoders on the base's."""
    from fluxexport.runtime.redux import redux_conditioning

    backend = open_redux_backend(prior.redux, runner, engines)
    try:
        return redux_conditioning(backend, engine, source, prior.redux, prior.request)
    finally:
        backend.close()


@dataclass(frozen=True)
class CalibrateOptions:
    """`fluxexport calibrate-magcache`'s options."""

    prompts: tuple[str, ...]
    out: Path
    model: ModelOptions = field(default_factory=ModelOptions)
    runner: BackendOptions = field(default_factory=BackendOptions)
    steps: int = 28
    height: int | None = None
    width: int | None = None
    guidance: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class CalibrateResult:
    request: ResolvedRequest
    ratios: list[float]
    path: Path


def measure_magcache(options: CalibrateOptions, progress: Progress = no_progress, log: Log = no_log) -> CalibrateResult:
    """MagCache's magnitude ratios of one run of `options`' prompts (every step computed), written to
    `options.out` for `--cache magcache:ratios=FILE`."""
    from fluxexport.runtime.magcache import write_ratios
    from fluxexport.runtime.pipeline import calibrate_mag_ratios, resolve_request

    source = open_source(options.model)
    request = GenerationRequest(
        list(options.prompts), height=options.height, width=options.width, num_inference_steps=options.steps,
        guidance_scale=options.guidance, seed=options.seed,
    )  # fmt: skip
    resolved = resolve_request(source, request)  # validate everything before any weight is loaded
    check_out_file(options.out)
    backend = choose_backend(options.runner.backend, options.runner.engines)
    engine = open_backend(options.runner, source, backend, log)
    title = f"calibrate magcache {source.name} {resolved.width}×{resolved.height} · batch {resolved.batch}"
    with progress(title, resolved.steps) as advance:
        ratios = calibrate_mag_ratios(engine, source, request, on_step=advance)
    try:
        path = write_ratios(
            options.out, ratios, model=source.name, prompts=resolved.prompts, height=resolved.height,
            width=resolved.width, steps=resolved.steps,
        )  # fmt: skip
    except OSError as error:
        raise FluxExportError(f"cannot write {options.out}: {error.strerror or error} (--out)") from None
    return CalibrateResult(resolved, ratios, path)
