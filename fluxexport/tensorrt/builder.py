"""Build TensorRT engines from exported graphs with TensorRT's Python API (10.x and 11.x)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fluxexport.errors import FluxExportError
from fluxexport.export.manifest import file_sha256, now, read_manifest, write_manifest
from fluxexport.models.source import ModelSource
from fluxexport.specs import component_specs
from fluxexport.tensorrt.engines import engine_filename, engine_manifest, profiles_to_json
from fluxexport.tensorrt.environment import current_gpu, import_tensorrt, require_fp8
from fluxexport.tensorrt.precision import graph_dtypes, graph_problems, prepare_graphs
from fluxexport.tensorrt.profiles import ProfileRequest, Range, build_profiles, resolution_buckets

TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "bf16"
    batch: tuple[int, int, int] = (1, 1, 4)
    resolution: tuple[int, int, int] = (256, 1024, 1360)
    text_length: tuple[int, int, int] = (1, 512, 512)
    resolution_buckets: int = 1
    optimization_level: int = 3  # NVIDIA's demo uses 3 for FLUX: 5 builds for hours for little gain
    refittable: bool = False
    weight_streaming: bool = False
    workspace_gib: float | None = None


def profile_requests(options: BuildOptions, kontext: bool) -> list[ProfileRequest]:
    batch, text = Range(*options.batch), Range(*options.text_length)
    return [
        ProfileRequest(batch, bucket, text, kontext)
        for bucket in resolution_buckets(*options.resolution, options.resolution_buckets)
    ]


def _network_flags(trt) -> int:
    # Strongly typed: precision comes from the graph (bf16 / Q/DQ FP8), as NVIDIA's demo builds FLUX.
    # TensorRT 11 is always strongly typed and keeps the flag only for compatibility.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(onnx_path: Path, engine_path: Path, profiles, options: BuildOptions, timing_cache: Path, log=print):
    """Parse `onnx_path`, add `profiles`, build, and write `engine_path` atomically; returns build seconds."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # external data is found beside the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FluxExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    for profile in profiles:
        optimization_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            optimization_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FluxExportError(f"TensorRT failed to build {onnx_path.name} (see its log above)")
    seconds = time.perf_counter() - start
    temporary = engine_path.with_name(f".{engine_path.name}.tmp")
    with open(temporary, "wb") as stream:
        stream.write(memoryview(serialized))
    os.replace(temporary, engine_path)
    cache_temporary = timing_cache.with_name(f".{timing_cache.name}.tmp")
    cache_temporary.write_bytes(memoryview(config.get_timing_cache().serialize()))
    os.replace(cache_temporary, timing_cache)
    return seconds


def build_engines(
    source: ModelSource,
    onnx_dir: Path,
    out_dir: Path,
    options: BuildOptions,
    components: Sequence[str] | None = None,
    on_component: Callable[[str, float | None], None] | None = None,
    prepare: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Build one engine per component from `onnx_dir`'s graphs into `out_dir`, with a manifest.

    With `prepare`, graphs of the wrong dtype or missing are exported / quantized first (`prepare_graphs`)."""
    trt = import_tensorrt()
    gpu = current_gpu()
    if options.precision == "fp8":
        require_fp8(gpu)
    components = list(components or read_manifest(onnx_dir)["components"])
    onnx_manifest = (
        prepare_graphs(source, onnx_dir, options.precision, components, log=log) if prepare else read_manifest(onnx_dir)
    )
    wanted = graph_dtypes(options.precision, components)
    problems = graph_problems(onnx_manifest, wanted, onnx_dir)
    if problems:
        raise FluxExportError("; ".join(problems))
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = component_specs(source)
    requests = profile_requests(options, source.is_kontext)
    manifest = engine_manifest(onnx_manifest["model"], trt.__version__, gpu, options.precision, asdict(options))
    for name in components:
        if on_component:
            on_component(name, None)
        entry = onnx_manifest["components"][name]
        profiles = build_profiles(specs[name], requests, source.vae_scale_factor)
        engine = out_dir / engine_filename(name, wanted[name], trt.__version__)
        seconds = build_engine(onnx_dir / entry["file"], engine, profiles, options, out_dir / TIMING_CACHE)
        manifest["components"][name] = {
            "file": engine.name,
            "precision": wanted[name],
            "profiles": profiles_to_json(profiles),
            "inputs": entry["inputs"],
            "outputs": entry["outputs"],
            "onnx_sha256": entry["sha256"],
            "engine_sha256": file_sha256(engine),
            "build_seconds": round(seconds, 1),
            "built_at": now(),
        }
        write_manifest(out_dir, manifest)
        if on_component:
            on_component(name, seconds)
    return manifest
