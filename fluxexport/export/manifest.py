"""manifest.json beside exported graphs: what each file is, how it was made, and from what."""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from fluxexport.atomic import write_text_atomic
from fluxexport.errors import FluxExportError

MANIFEST = "manifest.json"
FORMAT = 1
_PACKAGES = ("fluxexport", "torch", "diffusers", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime")


def default_folder(model_name: str, kind: str = "onnx") -> Path:
    """Where commands write and read by default: `engines/<model>/onnx`, `engines/<model>/trt-fp8`, …"""
    return Path("engines") / model_name / kind


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FluxExportError(f"{folder} has no {MANIFEST}: export graphs into it with `fluxexport export`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FluxExportError(f"{path} is not valid JSON ({error.msg}): export again") from None
    if manifest.get("format") != FORMAT:
        raise FluxExportError(f"{path} has format {manifest.get('format')!r}, this fluxexport reads {FORMAT}")
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Replace manifest.json atomically (temp file + rename): readers never see half of it."""
    return write_text_atomic(Path(folder) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


FP8 = "fp8"  # the manifest section of `quantize`'s graphs, kept beside the base ones
FP8_STEM = "transformer.fp8"  # its file: transformer.fp8.onnx (+ .onnx_data)
OPTIMIZED = "onnxruntime"  # the manifest section of `optimize`'s graphs (ONNX Runtime's fusions)


def graph_entries(manifest: dict[str, Any], fp8: bool | None = None) -> dict[str, dict]:
    """The graph each component runs from: the transformer is the FP8 Q/DQ one with `fp8`, the base one
    without, and the FP8 one when the folder has it with `fp8=None`. A component the choice leaves without
    a graph is absent (callers say which command makes it)."""
    entries = dict(manifest["components"])
    quantized = manifest.get(FP8, {}).get("transformer")
    if entries.get("transformer", {}).get("dtype") == "fp8":  # folders quantized before both lived side by side
        quantized = quantized or entries["transformer"]
        del entries["transformer"]
    if quantized is not None if fp8 is None else fp8:
        entries.pop("transformer", None)
        if quantized is not None:
            entries["transformer"] = quantized
    return entries


def optimized_entries(manifest: dict, entries: dict[str, dict], engines: Path) -> dict[str, dict]:
    """`entries` with each component's optimized graph in place of its portable one, where one was made from
    exactly that portable graph (an export since then makes it stale: the portable one runs)."""
    chosen = dict(entries)
    for name, optimized in manifest.get(OPTIMIZED, {}).items():
        base = entries.get(name)
        if base is None or base["file"] == optimized["file"] or base.get("dtype") == "fp8":
            continue
        if base["file"] != manifest["components"].get(name, {}).get("file"):
            continue
        if optimized["from_sha256"] == base.get("sha256", {}).get(Path(base["file"]).name):
            chosen[name] = optimized
    return chosen
