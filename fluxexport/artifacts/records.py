"""Typed records of what a manifest says: tensors, weight origins, graphs, engines and the model they came from.

Each record reads its JSON object (`from_json`) and writes it back (`to_json`) unchanged: fields the code reads
are typed attributes; the rest (timings, node counts, notes for people) ride along in `extra`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource, made_from


def _take(data: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """What `data` holds besides `keys`: the record's `extra`."""
    return {key: value for key, value in data.items() if key not in keys}


@dataclass(frozen=True)
class TensorRecord:
    """One input or output: its name, element type (ONNX's name: float, bfloat16, int32, …) and dims."""

    name: str
    dtype: str
    dims: tuple[str | int, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorRecord:
        return cls(data["name"], data["dtype"], tuple(data["dims"]))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


@dataclass(frozen=True)
class WeightOrigin:
    """Where an initializer's values come from: a checkpoint tensor, its transpose as the graph holds it, and
    for FP8 weights the DequantizeLinear scale they were quantized with."""

    tensor: str
    perm: tuple[int, ...] | None = None
    fp8_scale: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WeightOrigin:
        perm = data.get("perm")
        return cls(data["tensor"], tuple(perm) if perm else None, data.get("fp8_scale"))

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"tensor": self.tensor, "perm": list(self.perm) if self.perm else None}
        return record | ({"fp8_scale": self.fp8_scale} if self.fp8_scale is not None else {})


_GRAPH_KEYS = ("file", "external_data", "dtype", "base_dtype", "opset", "inputs", "outputs", "axes", "sha256",
               "weights", "fusions", "from_sha256")  # fmt: skip


@dataclass(frozen=True)
class GraphRecord:
    """One ONNX graph of an export folder. `dtype` is its precision (fp8 for a Q/DQ graph); `base_dtype` the
    type of its other math and weights (the same as `dtype` but for FP8 graphs). An ONNX Runtime-optimized
    graph names the portable graph it was made from (`from_sha256`) and its fusions."""

    file: str
    dtype: str
    base_dtype: str
    opset: int
    inputs: tuple[TensorRecord, ...]
    outputs: tuple[TensorRecord, ...]
    axes: dict[str, dict[str, int]] = field(default_factory=dict)
    external_data: str | None = None
    sha256: dict[str, str] = field(default_factory=dict)
    weights: dict[str, WeightOrigin] | None = None  # initializer → origin; None when the export did not record it
    fusions: dict[str, int] | None = None  # set on `optimize`'s graphs
    from_sha256: str | None = None  # the portable graph an optimized one was made from
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GraphRecord:
        weights = data.get("weights")
        return cls(
            file=data["file"], dtype=data["dtype"], base_dtype=data["base_dtype"], opset=data["opset"],
            inputs=tuple(map(TensorRecord.from_json, data["inputs"])),
            outputs=tuple(map(TensorRecord.from_json, data["outputs"])),
            axes=data.get("axes", {}), external_data=data.get("external_data"), sha256=data.get("sha256", {}),
            weights=None if weights is None else {k: WeightOrigin.from_json(v) for k, v in weights.items()},
            fusions=data.get("fusions"), from_sha256=data.get("from_sha256"), extra=_take(data, _GRAPH_KEYS),
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        record = {
            "file": self.file, "external_data": self.external_data, "dtype": self.dtype,
            "base_dtype": self.base_dtype, "opset": self.opset, "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs], "axes": self.axes, "sha256": self.sha256,
        } | self.extra  # fmt: skip
        if self.weights is not None:
            record["weights"] = {name: origin.to_json() for name, origin in self.weights.items()}
        if self.fusions is not None:
            record["fusions"] = self.fusions
        if self.from_sha256 is not None:
            record["from_sha256"] = self.from_sha256
        return record

    @property
    def is_fp8(self) -> bool:
        return self.dtype == "fp8"

    @property
    def notes(self) -> list[str]:
        """What the export noted for people (passes applied, layers kept in high precision)."""
        return list(self.extra.get("notes", []))

    @property
    def is_optimized(self) -> bool:
        return self.fusions is not None

    @property
    def digest(self) -> str | None:
        """The sha256 of the graph file itself (not its external data)."""
        return self.sha256.get(Path(self.file).name)

    @property
    def files(self) -> list[str]:
        """The graph and its external data, relative to the folder."""
        return [self.file] + ([self.external_data] if self.external_data else [])

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def describe(self) -> str:
        """Which graph this is, in words: `transformer.fp8.onnx (FP8 Q/DQ on bf16)`, `… (fp32, ONNX
        Runtime-optimized: 2 Attention)`, `transformer.onnx (fp32)`."""
        if self.is_fp8:
            return f"{self.file} (FP8 Q/DQ on {self.base_dtype})"
        if self.fusions is not None:
            fused = ", ".join(f"{count} {op}" for op, count in self.fusions.items()) or "no fusion applied"
            return f"{self.file} ({self.dtype}, ONNX Runtime-optimized: {fused})"
        return f"{self.file} ({self.dtype})"

    def require_weight_origins(self, fix: str) -> dict[str, WeightOrigin]:
        """The initializer origins, or a one-line refusal naming `fix` when the export did not record them."""
        if self.weights is None:
            raise FluxExportError(
                f"{self.file} does not record where its weights come from (exported in memory or by an older "
                f"version): {fix}"
            )
        return self.weights


_MODEL_KEYS = ("name", "fingerprint", "base_fingerprint", "loras")


@dataclass(frozen=True)
class ModelRecord:
    """The checkpoint a folder was made from: its name, fingerprint (LoRAs merged in included) and, once
    engines were refitted with LoRAs, the fingerprint of the base checkpoint they were built from."""

    name: str
    fingerprint: str
    loras: tuple[dict[str, Any], ...] = ()
    base_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, source: ModelSource) -> ModelRecord:
        return cls(
            name=source.name, fingerprint=source.fingerprint(), loras=tuple(lora.record() for lora in source.loras),
            extra={"pipeline_class": source.pipeline_class, "guidance_embeds": source.guidance_embeds},
        )  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRecord:
        return cls(data["name"], data["fingerprint"], tuple(data.get("loras", ())), data.get("base_fingerprint"),
                   _take(data, _MODEL_KEYS))  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        record = {"name": self.name} | self.extra | {"fingerprint": self.fingerprint, "loras": list(self.loras)}
        return record | ({"base_fingerprint": self.base_fingerprint} if self.base_fingerprint else {})

    @property
    def base(self) -> str:
        """The fingerprint of the checkpoint without the LoRAs refitted in later."""
        return self.base_fingerprint or self.fingerprint

    def is_of(self, source: ModelSource) -> bool:
        return self.fingerprint == source.fingerprint()

    def swaps_in(self, source: ModelSource) -> bool:
        """Graphs of the unmerged base checkpoint, asked to run with `source`'s LoRAs: they can be swapped in."""
        return bool(source.loras) and not self.loras and self.fingerprint == source.with_loras(()).fingerprint()

    def made_from(self, source: ModelSource) -> str:
        """`'tiny-dev', not from 'tiny-schnell'`: for the refusals of folders made from another checkpoint."""
        return made_from(self.name, source)

    def with_loras(self, source: ModelSource) -> ModelRecord:
        """This record after refitting `source`'s LoRAs into the base weights (none: back to the base)."""
        return replace(
            self, base_fingerprint=self.base, fingerprint=source.fingerprint() if source.loras else self.base,
            loras=tuple(lora.record() for lora in source.loras),
        )  # fmt: skip


_ENGINE_KEYS = ("file", "precision", "profiles", "inputs", "outputs", "onnx", "engine_sha256", "base_file",
                "refitted_weights")  # fmt: skip


@dataclass(frozen=True)
class EngineRecord:
    """One TensorRT plan: its precision, profiles (JSON: input → [min, opt, max] shapes), I/O and the ONNX graph
    it was built from. After a refit `file` is the refitted plan and `base_file` the plan `build` wrote."""

    file: str
    precision: str
    profiles: tuple[dict[str, list[list[int]]], ...]
    inputs: tuple[TensorRecord, ...]
    outputs: tuple[TensorRecord, ...]
    onnx: str  # absolute path of the graph it was built from
    engine_sha256: str
    base_file: str | None = None
    refitted_weights: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineRecord:
        return cls(
            file=data["file"], precision=data["precision"], profiles=tuple(data["profiles"]),
            inputs=tuple(map(TensorRecord.from_json, data["inputs"])),
            outputs=tuple(map(TensorRecord.from_json, data["outputs"])), onnx=data["onnx"],
            engine_sha256=data["engine_sha256"], base_file=data.get("base_file"),
            refitted_weights=data.get("refitted_weights"), extra=_take(data, _ENGINE_KEYS),
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        record = {
            "file": self.file, "precision": self.precision, "profiles": list(self.profiles),
            "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
            "onnx": self.onnx, "engine_sha256": self.engine_sha256,
        } | self.extra  # fmt: skip
        if self.base_file is not None:
            record |= {"base_file": self.base_file, "refitted_weights": self.refitted_weights}
        return record

    @property
    def base_plan(self) -> str:
        """The plan `build` wrote (a refit starts from it; `refit --reset` goes back to it)."""
        return self.base_file or self.file

    @property
    def is_refitted(self) -> bool:
        return self.base_file is not None

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class GpuRecord:
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GpuRecord:
        major, minor = data["compute_capability"]
        return cls(data["name"], (major, minor), data.get("memory_bytes", 0))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "compute_capability": list(self.compute_capability),
                "memory_bytes": self.memory_bytes}  # fmt: skip
