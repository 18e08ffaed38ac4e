"""An export folder and an engine folder as typed records, their openers, and `upgrade` for older manifests.

Openers check the manifest once (present, JSON, this format, this kind) and, given the checkpoint the caller
runs, that the folder was made from it. `ExportFolder.graphs` answers which graph each component runs:
the portable one, `quantize`'s FP8 transformer or `optimize`'s fused ONNX Runtime graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fluxexport.artifacts.files import FORMAT, MANIFEST
from fluxexport.artifacts.records import EngineRecord, GpuRecord, GraphRecord, ModelRecord
from fluxexport.atomic import write_text_atomic
from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource

FP8 = "fp8"  # the manifest section of `quantize`'s graphs, kept beside the base ones
NVFP4 = "nvfp4"  # the manifest section of `quantize --precision nvfp4`'s graphs (TensorRT on Blackwell only)
# What `quantize` makes FP8: the transformer, whole and in the three parts First Block Cache runs (the names of
# specs.TRANSFORMER_PARTS, which sits above this layer; tests/test_parts_fp8_lora.py checks that they agree)
FP8_COMPONENTS = ("transformer", "transformer_head", "transformer_tail", "transformer_out")
OPTIMIZED = "onnxruntime"  # the manifest section of `optimize`'s graphs (ONNX Runtime's fusions)
TENSORRT = "tensorrt"  # the `kind` of an engine folder's manifest


def fp8_stem(component: str) -> str:
    """The file stem of `quantize`'s graph of `component`: transformer.fp8(.onnx, .onnx_data), transformer_head.fp8…"""
    return f"{component}.fp8"


def _read_json(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FluxExportError(f"{folder} has no {MANIFEST}: export graphs into it with `fluxexport export`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FluxExportError(f"{path} is not valid JSON ({error.msg}): export again") from None
    if not isinstance(data, dict):
        raise FluxExportError(f"{path} is not a fluxexport manifest: export again")
    return data


def _check_format(data: dict[str, Any], folder: Path) -> None:
    found = data.get("format")
    if found == 1:
        raise FluxExportError(
            f"{Path(folder) / MANIFEST} has format 1 (an older fluxexport), this one reads {FORMAT}: rewrite it "
            f"with `fluxexport upgrade {folder}`"
        )
    if found != FORMAT:
        raise FluxExportError(f"{Path(folder) / MANIFEST} has format {found!r}, this fluxexport reads {FORMAT}")


def _write(folder: Path, data: dict[str, Any]) -> Path:
    """Replace `folder`'s manifest.json atomically (temp file + rename): readers never see half of it."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(folder / MANIFEST, json.dumps(data, indent=2) + "\n")


def _graphs(section: dict[str, Any]) -> dict[str, GraphRecord]:
    return {name: GraphRecord.from_json(entry) for name, entry in section.items()}


@dataclass
class ExportFolder:
    """A folder of exported graphs: the portable ones (`components`), `quantize`'s FP8 transformer and parts
    (`fp8`) and `optimize`'s ONNX Runtime graphs (`optimized`), all made from `model`."""

    path: Path
    model: ModelRecord
    dtype: str
    bounds: dict[str, Any]  # `ExportBounds` as JSON: sides, batch, text tokens, FLUX.2's reference budget
    components: dict[str, GraphRecord] = field(default_factory=dict)
    fp8: dict[str, GraphRecord] = field(default_factory=dict)
    optimized: dict[str, GraphRecord] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    nvfp4: dict[str, GraphRecord] = field(default_factory=dict)  # built only by `build --precision nvfp4`

    kind = "onnx"

    @classmethod
    def from_json(cls, path: Path, data: dict[str, Any]) -> ExportFolder:
        return cls(
            Path(path), ModelRecord.from_json(data["model"]), data["dtype"], data["bounds"],
            _graphs(data["components"]), _graphs(data.get(FP8, {})), _graphs(data.get(OPTIMIZED, {})),
            data.get("versions", {}), _graphs(data.get(NVFP4, {})),
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT, "kind": self.kind, "model": self.model.to_json(), "dtype": self.dtype,
            "bounds": self.bounds, "versions": self.versions,
            "components": {name: graph.to_json() for name, graph in self.components.items()},
        }  # fmt: skip
        for section, graphs in ((FP8, self.fp8), (OPTIMIZED, self.optimized), (NVFP4, self.nvfp4)):
            if graphs:
                data[section] = {name: graph.to_json() for name, graph in graphs.items()}
        return data

    def write(self) -> Path:
        return _write(self.path, self.to_json())

    def check_made_from(self, source: ModelSource, fix: str = "pass the same --model as at export, or export again"):
        if not self.model.is_of(source):
            raise FluxExportError(f"the graphs in {self.path} were exported from {self.model.made_from(source)}: {fix}")

    def runs_fp8(self, fp8: bool | None = None) -> bool:
        """Whether the transformer, whole and in parts, runs `quantize`'s FP8 graphs: as `fp8` says, or (None)
        when the folder has an FP8 transformer."""
        return "transformer" in self.fp8 if fp8 is None else fp8

    def graphs(self, fp8: bool | None = None, optimized: bool | None = False) -> dict[str, GraphRecord]:
        """The graph each component runs. The transformer and its parts run `quantize`'s FP8 graphs when
        `runs_fp8(fp8)`, their base ones otherwise, never a mix: a component the choice leaves without a graph
        (an FP8 run of a folder whose parts were not quantized) is absent. With `optimized` (True or None), a
        component runs its ONNX Runtime-optimized graph where one was made from exactly the portable graph now
        in the folder (an export since makes it stale)."""
        chosen = dict(self.components)
        if self.runs_fp8(fp8):
            for name in FP8_COMPONENTS:
                chosen.pop(name, None)
            chosen |= {name: graph for name, graph in self.fp8.items() if name in FP8_COMPONENTS}
        if optimized is False:
            return chosen
        for name, graph in self.optimized.items():
            base = chosen.get(name)
            if base is not None and base is self.components.get(name) and graph.from_sha256 == base.digest:
                chosen[name] = graph
        return chosen

    def graph_names(self) -> list[str]:
        """Every component the folder has a graph of, base or FP8 (what `build` makes engines of by default)."""
        return list(dict.fromkeys([*self.components, *self.fp8]))

    def every_graph(self) -> dict[str, GraphRecord]:
        """File → record of every graph the folder holds (portable, FP8, optimized)."""
        sections = (self.components, self.fp8, self.optimized, self.nvfp4)
        return {g.file: g for section in sections for g in section.values()}


@dataclass
class EngineFolder:
    """A folder of TensorRT plans built by `build` (TensorRT version, GPU, builder settings) from `model`."""

    path: Path
    model: ModelRecord
    precision: str
    tensorrt: str
    gpu: GpuRecord
    builder: dict[str, Any]  # `BuildOptions` as JSON, the bounds included
    components: dict[str, EngineRecord] = field(default_factory=dict)

    kind = TENSORRT

    @classmethod
    def from_json(cls, path: Path, data: dict[str, Any]) -> EngineFolder:
        return cls(
            Path(path), ModelRecord.from_json(data["model"]), data["precision"], data["tensorrt"],
            GpuRecord.from_json(data["gpu"]), data["builder"],
            {name: EngineRecord.from_json(entry) for name, entry in data["components"].items()},
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "kind": self.kind, "model": self.model.to_json(), "precision": self.precision,
            "tensorrt": self.tensorrt, "gpu": self.gpu.to_json(), "builder": self.builder,
            "components": {name: engine.to_json() for name, engine in self.components.items()},
        }  # fmt: skip

    def write(self) -> Path:
        return _write(self.path, self.to_json())

    @property
    def bounds(self) -> dict[str, Any]:
        """The sizes the engines serve (the build's bounds)."""
        return self.builder["bounds"]

    @property
    def refittable(self) -> bool:
        return bool(self.builder.get("refittable"))

    @property
    def weight_streaming(self) -> bool:
        return bool(self.builder.get("weight_streaming"))

    @property
    def resolution_buckets(self) -> int:
        return int(self.builder.get("resolution_buckets", 1))

    def check_made_from(self, source: ModelSource, fix: str = "pass the same --model as at build time"):
        if not self.model.is_of(source):
            raise FluxExportError(f"the engines in {self.path} were built from {self.model.made_from(source)}: {fix}")

    def built_from(self, name: str) -> GraphRecord:
        """The export record of the ONNX graph `name`'s engine was built from (its weight origins, FP8 scales
        and base dtype), refused in one line when that graph's folder no longer describes it."""
        graph = Path(self.components[name].onnx)
        found = open_export(graph.parent).every_graph().get(graph.name) if (graph.parent / MANIFEST).is_file() else None
        if found is None:  # a graph of a published folder (`<folder>.opt/model.onnx`, the folder read as it is)
            from fluxexport.artifacts.published import published_graph

            found = published_graph(graph)
        if found is None:
            raise FluxExportError(
                f"{graph} is no longer described by its folder's {MANIFEST} (exported over or moved): export it "
                "again and rebuild the engines"
            )
        return found


Folder = ExportFolder | EngineFolder


def open_folder(folder: Path, source: ModelSource | None = None) -> Folder:
    """The export or engine folder at `folder`, refused in one line when it is missing, of another format or,
    given `source`, made from another checkpoint. A folder laid out as Black Forest Labs publishes its ONNX (no
    manifest) is read through `published.LAYOUT`."""
    from fluxexport.artifacts.published import is_published, open_published

    if is_published(folder):
        published = open_published(folder)
        if source is not None:
            published.check_made_from(source)
        return published
    data = _read_json(folder)
    _check_format(data, folder)
    opened: Folder = (
        EngineFolder.from_json(folder, data) if data.get("kind") == TENSORRT else ExportFolder.from_json(folder, data)
    )
    if source is not None:
        opened.check_made_from(source)
    return opened


def open_export(folder: Path, source: ModelSource | None = None) -> ExportFolder:
    opened = open_folder(folder)
    if not isinstance(opened, ExportFolder):
        raise FluxExportError(f"{folder} holds TensorRT engines, not exported graphs: pass the export folder")
    if source is not None:
        opened.check_made_from(source)
    return opened


def open_engines(folder: Path, source: ModelSource | None = None) -> EngineFolder:
    opened = open_folder(folder)
    if not isinstance(opened, EngineFolder):
        raise FluxExportError(f"{folder} holds no TensorRT engines: build them with `fluxexport build`")
    if source is not None:
        opened.check_made_from(source)
    return opened


def new_export(folder: Path, source: ModelSource, dtype: str, bounds: dict[str, Any], versions) -> ExportFolder:
    """The folder's record to extend: the existing one if it describes this checkpoint, else a new one (files
    are replaced one by one), with this export's model, bounds and versions."""
    from fluxexport.artifacts.published import is_published

    if is_published(folder):
        raise FluxExportError(
            f"{folder} is a published ONNX folder, read as it is: write exports and FP8 graphs to another folder (--out)"
        )
    model = ModelRecord.of(source)
    if (Path(folder) / MANIFEST).is_file():
        previous = open_export(folder)
        if previous.model.is_of(source):
            return replace(previous, model=model, bounds=bounds, versions=versions)
    return ExportFolder(Path(folder), model, dtype, bounds, versions=versions)


def _upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest as format 2: an FP8 transformer kept among the components (the first layout) moves
    to the `fp8` section; every graph names its base dtype; engine folders keep their records as they are."""
    data = dict(data, format=FORMAT)
    if data.get("kind") == TENSORRT:
        return data
    components = dict(data.get("components", {}))
    if components.get("transformer", {}).get("dtype") == "fp8":
        legacy = components.pop("transformer")
        data[FP8] = {"transformer": data.get(FP8, {}).get("transformer", legacy)}
    data["components"] = components
    for section in ("components", FP8, OPTIMIZED):
        data[section] = {
            name: {"base_dtype": "bf16" if entry["dtype"] == "fp8" else entry["dtype"]} | entry
            for name, entry in data.get(section, {}).items()
        }
    data.setdefault("dtype", "fp32")
    data["kind"] = ExportFolder.kind
    return data


def upgrade_folder(folder: Path) -> Folder:
    """Rewrite `folder`'s format-1 manifest as format 2 in place (atomically); a format-2 one is left as it is."""
    data = _read_json(folder)
    if data.get("format") == 1:
        upgraded = _upgraded(data)
        cls = EngineFolder if upgraded.get("kind") == TENSORRT else ExportFolder
        cls.from_json(folder, upgraded).write()  # through the records: what is written is what reads back
    return open_folder(folder)
