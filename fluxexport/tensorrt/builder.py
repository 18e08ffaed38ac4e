"""Build TensorRT engines from exported graphs through polygraphy's TensorRT loaders (TensorRT 10.x and 11.x).

What is polygraphy's: parsing the ONNX file, the builder config (profiles, optimization level, refit, weight
streaming, workspace, timing cache), building. What is ours: the profiles (from the component specs), the
precision policy, which graphs to build, naming, and the manifest."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fluxexport.artifacts.files import MANIFEST, file_sha256, now
from fluxexport.artifacts.folders import EngineFolder, open_export
from fluxexport.artifacts.published import SAMPLES, is_published, posterior_record, write_posterior_graph
from fluxexport.artifacts.records import EngineRecord
from fluxexport.atomic import write_bytes_atomic
from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.specs import REFERENCE_OPTIONS, ExportBounds, pipeline_components, refuse_reference_options
from fluxexport.tensorrt.engines import engine_filename, new_engine_folder, profiles_to_json
from fluxexport.tensorrt.environment import (
    Gpu,
    current_gpu,
    import_tensorrt,
    native_op_refusal,
    require_fp8,
    require_tensorrt_version,
    tensorrt_version,
)
from fluxexport.tensorrt.precision import engine_graphs, graph_dtypes, graph_problems, require_nvfp4
from fluxexport.tensorrt.profiles import build_profiles, profile_bounds

TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class BuildOptions:
    """How to build: the precision, the bounds the engines serve (the export's by default), and builder knobs."""

    precision: str = "bf16"
    bounds: ExportBounds = field(default_factory=ExportBounds)
    resolution_buckets: int = 1
    optimization_level: int = 3  # NVIDIA's demo uses 3 for FLUX: 5 builds for hours for little gain
    refittable: bool = False
    weight_streaming: bool = False
    workspace_gib: float | None = None

    def profile_bounds(self) -> list[ExportBounds]:
        return profile_bounds(self.bounds, self.resolution_buckets)


POSTERIOR_GRAPHS = "posterior_graphs"  # in an engine folder: the published encoder's copy its engine is built from


def build_bounds(source: ModelSource, onnx_dir: Path, **overrides: Any) -> ExportBounds:
    """What the engines serve: the exported graphs' bounds (their manifest), else the model's export defaults,
    with any of `overrides` (ExportBounds fields: FLUX.2's reference budget too) applied. The graphs take any
    size, so engines may serve a larger budget than the export recorded."""
    refuse_reference_options(source, **{key: overrides.get(key) for key in REFERENCE_OPTIONS})
    if is_published(onnx_dir):  # the model's defaults with the text length its graphs fix, if they do
        base = replace(ExportBounds.for_model(source), **open_export(onnx_dir).bounds)
    else:
        exported = open_export(onnx_dir).bounds if (Path(onnx_dir) / MANIFEST).is_file() else None
        base = ExportBounds.from_json(exported) if exported else ExportBounds.for_model(source)
    bounds = replace(base, **{key: value for key, value in overrides.items() if value is not None})
    bounds.check()
    return bounds


def engine_components(source: ModelSource, onnx_dir: Path) -> list[str]:
    """The engines to build by default: every graph of `onnx_dir`, else what the pipeline needs."""
    if (Path(onnx_dir) / MANIFEST).is_file():
        return open_export(onnx_dir).graph_names()  # an FP8 graph counts: it builds one too
    return list(pipeline_components(source))


# TensorRT 11.3's release notes (known issue): a REFIT build may drop a GEMM bias even when never refitted
REFIT_BIAS_ISSUE = ((11, 3),)


def refuse_refit_bias_issue(version: tuple[int, ...], text: str) -> None:
    """Refuse `--refittable` on a TensorRT release whose REFIT builds may compute without a GEMM bias."""
    if version[:2] in REFIT_BIAS_ISSUE:
        raise FluxExportError(
            f"TensorRT {text} may drop a GEMM bias from engines built refittable (a known issue of its release "
            "notes): build --refittable with another TensorRT release, or merge LoRAs at export (export --lora)"
        )


def release_torch_memory() -> None:
    """Hand PyTorch's cached GPU memory back (after calibration) so that TensorRT's builder can use it."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


POLYGRAPHY_HELP = "pip install polygraphy (in the tensorrt and gpu extras, and in the Dockerfile's image)"


def polygraphy_profiles(profiles) -> list:
    """Our profiles (computed from the component specs) as polygraphy `Profile`s, input by input."""
    from polygraphy.backend.trt import Profile

    converted = []
    for profile in profiles:
        polygraphy_profile = Profile()
        for name, (low, opt, high) in profile.shapes.items():
            polygraphy_profile.add(name, min=low, opt=opt, max=high)
        converted.append(polygraphy_profile)
    return converted


def build_engine(onnx_path: Path, engine_path: Path, profiles, options: BuildOptions, timing_cache: Path) -> float:
    """Parse `onnx_path` (its external data beside it), build with `profiles`, write `engine_path` atomically;
    returns the build's seconds. TensorRT is driven through polygraphy's loaders, which carry the API
    differences between TensorRT releases; the timing cache is loaded, merged and saved by polygraphy
    (under its file lock, so parallel builds can share it)."""
    import_tensorrt()
    import tensorrt as trt

    try:
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise FluxExportError(f"polygraphy is not installed: {POLYGRAPHY_HELP}") from None
    G_LOGGER.module_severity = G_LOGGER.WARNING  # our progress bar says what is built; polygraphy's info is noise

    limits = {trt.MemoryPoolType.WORKSPACE: int(options.workspace_gib * 2**30)} if options.workspace_gib else None
    try:
        # strongly typed: precision comes from the graph (bf16, or Q/DQ FP8), as NVIDIA's demo builds FLUX;
        # TensorRT 11 is always strongly typed and keeps the flag for compatibility
        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()  # (builder, network, parser)
        config = CreateConfig(
            profiles=polygraphy_profiles(profiles),
            builder_optimization_level=options.optimization_level,
            refittable=options.refittable,
            weight_streaming=options.weight_streaming,
            memory_pool_limits=limits,
            load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
            # polygraphy's default (False) clears TensorRT's default TF32: fp32 layers (the VAE of an fp16 set)
            # would run strict FP32; NVIDIA's demo builds FLUX with TF32 on
            tf32=True,
        )
        start = time.perf_counter()
        serialized = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(timing_cache))()
        seconds = time.perf_counter() - start
    except PolygraphyException as error:  # polygraphy reports TensorRT's parser and builder errors this way
        first = next((line for line in str(error).splitlines() if line.strip()), "see the log above")
        raise FluxExportError(f"TensorRT failed to build {onnx_path.name}: {first}") from None
    write_bytes_atomic(engine_path, memoryview(serialized))
    return seconds


def check_build_host(options: BuildOptions, device_gpu: Callable[[], Gpu] | None = None) -> Gpu:
    """Refuse, before anything is exported or built, a host that cannot build these engines: no TensorRT, an
    unsupported release, a refittable build on a release with the REFIT bias issue, FP8 on a GPU without it.
    Returns the GPU that builds (`device_gpu`, the current CUDA device by default)."""
    import_tensorrt()
    import tensorrt as trt

    require_tensorrt_version(trt)
    if options.refittable:
        refuse_refit_bias_issue(tensorrt_version(trt), trt.__version__)
    gpu = device_gpu() if device_gpu else current_gpu()
    if options.precision == "fp8":
        require_fp8(gpu)
    if options.precision == "nvfp4":
        require_nvfp4(gpu.name, gpu.compute_capability)
    return gpu


def build_engines(
    source: ModelSource,
    onnx_dir: Path,
    out_dir: Path,
    options: BuildOptions,
    components: Sequence[str] | None = None,
    on_component: Callable[[str, float | None], None] | None = None,
    device_gpu: Callable[[], Gpu] | None = None,
) -> EngineFolder:
    """Build one engine per component from `onnx_dir`'s graphs into `out_dir`, with a manifest; graphs of the
    wrong dtype or missing are refused with the command that makes them (`fluxexport.build` exports them
    first). `device_gpu` says which GPU builds (the current CUDA device by default)."""
    import tensorrt as trt

    gpu = check_build_host(options, device_gpu)
    components = list(components or engine_components(source, onnx_dir))
    exported = open_export(onnx_dir, source)
    wanted = graph_dtypes(options.precision, components)
    problems = graph_problems(exported, wanted)
    if problems:
        raise FluxExportError("; ".join(problems))
    out_dir.mkdir(parents=True, exist_ok=True)
    buckets = options.profile_bounds()
    folder = new_engine_folder(out_dir, exported.model, trt.__version__, gpu, options.precision, asdict(options))
    graphs = engine_graphs(exported, wanted)
    native = native_op_refusal({name: graphs[name] for name in components}, tensorrt_version(trt), trt.__version__)
    if native:
        raise FluxExportError(native)
    for name in components:
        if on_component:
            on_component(name, None)
        graph = graphs[name]
        profiles = build_profiles(source, name, buckets)
        engine = out_dir / engine_filename(name, wanted[name], trt.__version__)
        parsed = onnx_dir / graph.file
        if graph.extra.get(SAMPLES):  # a published encoder draws its latent inside: build from a copy that does not
            parsed = write_posterior_graph(parsed, out_dir / POSTERIOR_GRAPHS)
        seconds = build_engine(parsed, engine, profiles, options, out_dir / TIMING_CACHE)
        folder.components[name] = EngineRecord(
            file=engine.name, precision=wanted[name], profiles=tuple(profiles_to_json(profiles)),
            inputs=graph.inputs, outputs=posterior_record(graph).outputs,
            onnx=str((onnx_dir / graph.file).resolve()),  # validate compares the engine with it; refit reads it
            engine_sha256=file_sha256(engine),
            extra={"onnx_sha256": graph.sha256, "build_seconds": round(seconds, 1), "built_at": now()}
            | ({"quantization": graph.extra["quantization"]} if "quantization" in graph.extra else {}),  # what is FP8
        )  # fmt: skip
        folder.write()
        if on_component:
            on_component(name, seconds)
    return folder
