"""Engine files and their manifest: names that carry precision and TensorRT version, and refusals when an
engine set was built by another TensorRT or for another GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fluxexport.errors import FluxExportError
from fluxexport.export.manifest import FORMAT, read_manifest
from fluxexport.tensorrt.environment import Gpu
from fluxexport.tensorrt.profiles import Profile


def engine_filename(component: str, precision: str, tensorrt_version: str) -> str:
    """`transformer_fp8.trt_10.13.2.plan`: the layout black-forest-labs' TensorRT code uses."""
    return f"{component}_{precision}.trt_{tensorrt_version}.plan"


def profiles_to_json(profiles: list[Profile]) -> list[dict[str, list[list[int]]]]:
    return [
        {name: [list(shape) for shape in triple] for name, triple in profile.shapes.items()} for profile in profiles
    ]


def profiles_from_json(data: list[dict[str, list[list[int]]]]) -> list[Profile]:
    def triple(shapes: list[list[int]]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        low, opt, high = (tuple(shape) for shape in shapes)
        return low, opt, high

    return [Profile({name: triple(shapes) for name, shapes in entry.items()}) for entry in data]


def engine_manifest(model: dict, tensorrt_version: str, gpu: Gpu, precision: str, options: dict) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "kind": "tensorrt",
        "model": model,
        "precision": precision,
        "tensorrt": tensorrt_version,
        "gpu": {"name": gpu.name, "compute_capability": list(gpu.compute_capability), "memory_bytes": gpu.memory_bytes},
        "builder": options,
        "components": {},
    }


def check_engine_set(manifest: dict, tensorrt_version: str, gpu: Gpu, folder: Path) -> None:
    """Refuse engines that this TensorRT or this GPU cannot run (TensorRT plans are neither portable across
    versions nor across compute capabilities)."""
    if manifest.get("kind") != "tensorrt":
        raise FluxExportError(f"{folder} holds no TensorRT engines: build them with `fluxexport build`")
    if manifest["tensorrt"] != tensorrt_version:
        raise FluxExportError(
            f"the engines in {folder} were built with TensorRT {manifest['tensorrt']}, this is {tensorrt_version}: "
            "rebuild them with `fluxexport build`"
        )
    built_for = tuple(manifest["gpu"]["compute_capability"])
    if built_for != gpu.compute_capability:
        raise FluxExportError(
            f"the engines in {folder} were built for {manifest['gpu']['name']} (compute capability "
            f"{built_for[0]}.{built_for[1]}), this GPU is {gpu.name} ({gpu.compute_capability[0]}."
            f"{gpu.compute_capability[1]}): rebuild them on this GPU"
        )


def read_engine_manifest(folder: Path) -> dict:
    manifest = read_manifest(folder)
    if manifest.get("kind") != "tensorrt":
        raise FluxExportError(f"{folder} holds no TensorRT engines: build them with `fluxexport build`")
    return manifest
