"""What every artifact folder shares: the manifest's name and format, file digests, timestamps, versions."""

from __future__ import annotations

import datetime
import hashlib
import platform
from importlib import metadata
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 2  # 2: typed records; an FP8 graph only in the `fp8` section; every graph names its base dtype
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
