"""What a Triton model repository written by `fluxexport triton` records about itself, as typed records:
`flux_pipeline/1/pipeline.json` (the pipeline model's settings, which `deploy` reads too) and each ONNX Runtime
component's `component.json` (its graph record, and where its per-request LoRAs are)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxexport.artifacts.records import GraphRecord, TensorRecord
from fluxexport.errors import FluxExportError

PIPELINE = "flux_pipeline"  # the pipeline model's name in the repository
PIPELINE_SETTINGS = "pipeline.json"  # in <repository>/flux_pipeline/1/
COMPONENT_RECORD = "component.json"  # in <repository>/<component>/1/ for ONNX Runtime components


@dataclass(frozen=True)
class ComponentIO:
    """How flux_pipeline calls a component through BLS: its inputs (with the element types it sends) and outputs."""

    inputs: tuple[TensorRecord, ...]
    outputs: tuple[TensorRecord, ...]

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ComponentIO:
        return cls(
            tuple(map(TensorRecord.from_json, data["inputs"])), tuple(map(TensorRecord.from_json, data["outputs"]))
        )


@dataclass(frozen=True)
class PipelineSettings:
    """flux_pipeline's settings: the model, the engine kind, the sizes served, the components' I/O, the LoRAs
    placed for requests (name → file, sha256, modules), the GPUs instances are placed on, TensorRT's version."""

    model: str
    kind: str  # "tensorrt" or "onnxruntime"
    bounds: dict[str, Any]  # `ExportBounds` as JSON (older repositories: sides and batch only)
    components: dict[str, ComponentIO]
    loras: dict[str, dict[str, Any]] = field(default_factory=dict)
    gpus: tuple[int, ...] = ()
    tensorrt: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "kind": self.kind, "bounds": self.bounds,
            "components": {name: io.to_json() for name, io in self.components.items()},
            "loras": self.loras, "gpus": list(self.gpus), "tensorrt": self.tensorrt,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PipelineSettings:
        return cls(
            data["model"], data["kind"], data["bounds"],
            {name: ComponentIO.from_json(io) for name, io in data["components"].items()},
            data["loras"], tuple(data["gpus"]), data["tensorrt"],
        )  # fmt: skip

    def write(self, version: Path) -> None:
        """Into the pipeline model's version folder (`flux_pipeline/1`)."""
        (Path(version) / PIPELINE_SETTINGS).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def read(cls, version: Path) -> PipelineSettings:
        return cls.from_json(json.loads((Path(version) / PIPELINE_SETTINGS).read_text()))


def read_pipeline_settings(repository: Path) -> PipelineSettings:
    """The settings of the repository at `repository`, refused in one line when fluxexport did not write it."""
    path = Path(repository) / PIPELINE / "1" / PIPELINE_SETTINGS
    if not path.is_file():
        raise FluxExportError(f"{repository} is not a repository written by fluxexport triton (no {PIPELINE} model)")
    return PipelineSettings.read(path.parent)


@dataclass(frozen=True)
class ServedGraph:
    """An ONNX Runtime component of the repository: its graph record and, when requests may pick LoRAs, the
    LoRA folder (relative to the repository's parent), the checkpoint module they adapt, the model family their
    files are read for (`LoraSet`'s: "flux1", "flux2") and, for a part of the transformer, the checkpoint
    tensors its sibling parts hold (`lora_elsewhere`: LoRA layers it lacks)."""

    graph: GraphRecord
    lora_folder: str | None = None
    lora_module: str | None = None
    lora_elsewhere: tuple[str, ...] = ()
    lora_family: str = "flux1"  # repositories written before FLUX.2 took request LoRAs record none: FLUX.1's

    def write(self, version: Path) -> None:
        extra = {}
        if self.lora_module:
            extra = {"lora_folder": self.lora_folder, "lora_module": self.lora_module, "lora_family": self.lora_family}
        if self.lora_module and self.lora_elsewhere:
            extra["lora_elsewhere"] = sorted(self.lora_elsewhere)
        (Path(version) / COMPONENT_RECORD).write_text(json.dumps(self.graph.to_json() | extra, indent=2))

    @classmethod
    def read(cls, version: Path) -> ServedGraph:
        data = json.loads((Path(version) / COMPONENT_RECORD).read_text())
        folder, module = data.pop("lora_folder", None), data.pop("lora_module", None)
        elsewhere = tuple(data.pop("lora_elsewhere", ()))
        family = data.pop("lora_family", "flux1")
        return cls(GraphRecord.from_json(data), folder, module, elsewhere, family)
