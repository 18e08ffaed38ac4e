"""Engine files and their manifest: names that carry precision and TensorRT version, and refusals when an
engine set was built by another TensorRT or for another GPU."""

from __future__ import annotations

from pathlib import Path

from fluxexport.artifacts.folders import EngineFolder
from fluxexport.artifacts.records import GpuRecord, ModelRecord
from fluxexport.errors import FluxExportError
from fluxexport.tensorrt.environment import Gpu
from fluxexport.tensorrt.profiles import Profile


def engine_filename(component: str, precision: str, tensorrt_version: str) -> str:
    """`transformer_fp8.trt_10.13.2.plan`: the layout black-forest-labs' TensorRT code uses."""
    return f"{component}_{precision}.trt_{tensorrt_version}.plan"


def profiles_to_json(profiles: list[Profile]) -> list[dict[str, list[list[int]]]]:
    return [
        {name: [list(shape) for shape in triple] for name, triple in profile.shapes.items()} for profile in profiles
    ]


def profiles_from_json(data) -> list[Profile]:
    def triple(shapes: list[list[int]]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        low, opt, high = (tuple(shape) for shape in shapes)
        return low, opt, high

    return [Profile({name: triple(shapes) for name, shapes in entry.items()}) for entry in data]


def new_engine_folder(
    folder: Path, model: ModelRecord, tensorrt_version: str, gpu: Gpu, precision: str, options: dict
) -> EngineFolder:
    gpu_record = GpuRecord(gpu.name, gpu.compute_capability, gpu.memory_bytes)
    return EngineFolder(Path(folder), model, precision, tensorrt_version, gpu_record, options)


def check_engine_set(folder: EngineFolder, tensorrt_version: str, gpu: Gpu) -> None:
    """Refuse engines that this TensorRT or this GPU cannot run (TensorRT plans are neither portable across
    versions nor across compute capabilities)."""
    if folder.tensorrt != tensorrt_version:
        raise FluxExportError(
            f"the engines in {folder.path} were built with TensorRT {folder.tensorrt}, this is {tensorrt_version}: "
            "rebuild them with `fluxexport build`"
        )
    built_for = folder.gpu.compute_capability
    if built_for != tuple(gpu.compute_capability):
        raise FluxExportError(
            f"the engines in {folder.path} were built for {folder.gpu.name} (compute capability "
            f"{built_for[0]}.{built_for[1]}), this GPU is {gpu.name} ({gpu.compute_capability[0]}."
            f"{gpu.compute_capability[1]}): rebuild them on this GPU"
        )
