"""Which Triton container release serves which TensorRT: plans only load on the TensorRT that built them.

NVIDIA's NGC containers of one release (`pytorch:25.10-py3`, `tritonserver:25.10-py3`) ship the same TensorRT,
so engines built in the Dockerfile's image (`tritonserver:YY.MM` with TensorRT's Python module) are served by
`tritonserver:YY.MM`. The table
follows NVIDIA's Frameworks Support Matrix at TensorRT major.minor, written from our notes of it: only 24.12 →
10.7 could be re-checked against NVIDIA's pages from this machine (2026-11-24). Where it is wrong or a release
is missing, `--image-tensorrt` states the image's TensorRT and wins.
"""

from __future__ import annotations

import re

from fluxexport.errors import FluxExportError

TENSORRT_OF_RELEASE = {
    "24.05": "10.0", "24.06": "10.1", "24.07": "10.2", "24.08": "10.3", "24.09": "10.4", "24.10": "10.5",
    "24.11": "10.6", "24.12": "10.7", "25.01": "10.8", "25.02": "10.8", "25.03": "10.9", "25.04": "10.9",
    "25.05": "10.10", "25.06": "10.11", "25.08": "10.13", "25.09": "10.13", "25.10": "10.13",
}  # fmt: skip
DEFAULT_RELEASE = "25.10"  # the Dockerfile's tritonserver:25.10-py3 (TensorRT 10.13)
SERVING_IMAGE = "fluxexport-triton"  # Dockerfile.triton: NVIDIA's tritonserver image + fluxexport for the python models


def minor(version: str) -> str:
    """`10.13.0.35` → `10.13`."""
    return ".".join(version.split(".")[:2])


def release_for(tensorrt: str | None) -> str:
    """The newest Triton release shipping this TensorRT (major.minor), or the default without one."""
    if tensorrt is None:
        return DEFAULT_RELEASE
    matches = [release for release, version in TENSORRT_OF_RELEASE.items() if version == minor(tensorrt)]
    if not matches:
        known = ", ".join(sorted(set(TENSORRT_OF_RELEASE.values()), key=lambda v: tuple(map(int, v.split(".")))))
        raise FluxExportError(
            f"no Triton release in fluxexport's table ships TensorRT {minor(tensorrt)} (it knows {known}): "
            "pass --image with the release you use and --image-tensorrt with its TensorRT version"
        )
    return max(matches)


def default_image(tensorrt: str | None) -> str:
    release = release_for(tensorrt)
    return f"{SERVING_IMAGE}:{release}-py3"


def image_release(image: str) -> str | None:
    """The YY.MM release an image's tag names (`…:25.10-py3` → `25.10`), or None."""
    found = re.search(r":(\d\d\.\d\d)(?:[-.][\w.-]*)?$", image)
    return found[1] if found else None


def check_image(image: str, tensorrt: str | None, image_tensorrt: str | None = None) -> str:
    """Refuse (one line) an image whose TensorRT is not the engines'; returns the image's Triton release."""
    release = image_release(image)
    if release is None and image_tensorrt is None:
        raise FluxExportError(
            f"cannot tell which Triton release {image} is: tag it with the release (…:{DEFAULT_RELEASE}-py3) "
            "or pass --image-tensorrt with its TensorRT version"
        )
    served = image_tensorrt or TENSORRT_OF_RELEASE.get(release or "")
    if served is None:
        raise FluxExportError(
            f"Triton release {release} is not in fluxexport's table: pass --image-tensorrt with its TensorRT version"
        )
    if tensorrt is not None and minor(served) != minor(tensorrt):
        raise FluxExportError(
            f"{image} serves TensorRT {minor(served)}, the engines were built with TensorRT {tensorrt}: plans only "
            f"load on the TensorRT that built them; use --image {default_image(tensorrt)} or rebuild the engines"
        )
    return release or DEFAULT_RELEASE
