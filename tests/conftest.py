"""Session fixtures: tiny models are written once, and every expensive object is built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

VARIANTS = ("tiny-schnell", "tiny-dev", "tiny-kontext")


def pytest_configure(config):
    # Tests never touch the user's cache or the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fluxexport.console import quiet_libraries

    quiet_libraries()


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fluxexport-cache")
    os.environ["FLUXEXPORT_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def sources(cache_root):
    """ModelSource per tiny variant, materialised in the session cache."""
    from fluxexport.models.source import resolve_model

    return {name: resolve_model(name) for name in VARIANTS}


@pytest.fixture(scope="session")
def torch_backends(sources):
    from fluxexport.pytorch.backend import TorchBackend

    return {name: TorchBackend(source, device="cpu") for name, source in sources.items()}


@pytest.fixture(scope="session")
def diffusers_pipelines(sources):
    from diffusers import FluxKontextPipeline, FluxPipeline

    pipelines = {}
    for name, source in sources.items():
        cls = FluxKontextPipeline if source.is_kontext else FluxPipeline
        pipeline = cls.from_pretrained(source.root)
        pipeline.set_progress_bar_config(disable=True)
        pipelines[name] = pipeline
    return pipelines


@pytest.fixture(scope="session")
def reference_image():
    """A deterministic 200×300 RGB picture with structure (gradients and a disc), not flat noise."""
    from PIL import Image

    y, x = np.mgrid[0:200, 0:300].astype(np.float32)
    disc = ((x - 180) ** 2 + (y - 90) ** 2 < 50**2).astype(np.float32)
    rgb = np.stack([x / 300, y / 200, disc], axis=-1) * 255
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="session")
def exports(sources, tmp_path_factory):
    """fp32 ONNX exports of all five components for each tiny variant (~20 s each, once per session)."""
    from fluxexport.export.onnx_export import export_model

    root = tmp_path_factory.mktemp("onnx")
    return {name: _export(export_model, source, root / name) for name, source in sources.items()}


@pytest.fixture(scope="session")
def bf16_export(sources, tmp_path_factory):
    from fluxexport.export.onnx_export import export_model

    return _export(export_model, sources["tiny-dev"], tmp_path_factory.mktemp("onnx-bf16"), dtype="bf16")


def _export(export_model, source, folder, **kwargs):
    export_model(source, folder, **kwargs)
    return folder


FLUX2_VARIANTS = ("tiny-klein", "tiny-klein-base", "tiny-flux2-dev")


@pytest.fixture(scope="session")
def flux2_sources(cache_root):
    """FLUX.2 tiny variants: [klein] distilled, [klein] base (true CFG) and [dev] (Mistral3, guidance embedding)."""
    from fluxexport.models.source import resolve_model

    return {name: resolve_model(name) for name in FLUX2_VARIANTS}


@pytest.fixture(scope="session")
def flux2_pipelines(flux2_sources):
    from diffusers import DiffusionPipeline

    pipelines = {}
    for name, source in flux2_sources.items():  # Flux2KleinPipeline or Flux2Pipeline, as model_index.json says
        pipelines[name] = DiffusionPipeline.from_pretrained(source.root)
        pipelines[name].set_progress_bar_config(disable=True)
    return pipelines


@pytest.fixture(scope="session")
def flux2_export(flux2_sources, tmp_path_factory):
    """fp32 ONNX exports of tiny-klein's four components (the base model's graphs differ only in weights)."""
    from fluxexport.export.onnx_export import export_model

    return _export(export_model, flux2_sources["tiny-klein"], tmp_path_factory.mktemp("onnx-klein"))


@pytest.fixture(scope="session")
def flux2_dev_export(flux2_sources, tmp_path_factory):
    """fp32 ONNX exports of tiny-flux2-dev's four components (its Mistral3 text encoder streamed from the legacy
    checkpoint layout, its transformer with the guidance input)."""
    from fluxexport.export.onnx_export import export_model

    return _export(export_model, flux2_sources["tiny-flux2-dev"], tmp_path_factory.mktemp("onnx-flux2-dev"))


@pytest.fixture(scope="session")
def flux2_parts_export(flux2_export, tmp_path_factory):
    """tiny-klein's session export plus the transformer's parts, through `export --transformer-parts` (which
    checks them for TensorRT)."""
    import shutil

    from click.testing import CliRunner

    from fluxexport.cli import main

    folder = tmp_path_factory.mktemp("klein-parts") / "onnx"
    shutil.copytree(flux2_export, folder)
    result = CliRunner().invoke(main, [
        "export", "--model", "tiny-klein", "--components", "transformer_out", "--transformer-parts", "--out", str(folder),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="session")
def ort_backends(sources, exports):
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    return {name: OnnxRuntimeBackend(sources[name], exports[name]) for name in sources}


# Session fixtures that export or quantize (tens of seconds each on 2 cores): a test that needs one, directly or
# through another fixture, is `slow`, so `pytest -m "not slow"` is the quick loop
EXPORTING_FIXTURES = {"exports", "bf16_export", "fp8_exports", "flux2_export", "flux2_dev_export",
                      "flux2_parts_export"}  # fmt: skip


def pytest_collection_modifyitems(config, items):
    """`tensorrt` and `gpu` tests skip, saying why, where TensorRT or a CUDA GPU is missing; tests that need an
    export are marked `slow`."""
    from fluxexport.tensorrt.environment import tensorrt_available

    for item in items:
        if EXPORTING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

    has_gpu = torch.cuda.is_available()
    reasons = {
        "gpu": None if has_gpu else "needs a CUDA GPU (none visible): run on a GPU host, e.g. scripts/gpu_check.sh",
        "tensorrt": None
        if tensorrt_available() and has_gpu
        else "needs TensorRT and a CUDA GPU: run inside the Dockerfile's NGC image on a GPU host",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def fp8_exports(sources, exports, tmp_path_factory):
    """Per variant: the fp32 graphs with the transformer replaced by an FP8 Q/DQ graph on an fp32 base,
    calibrated on 3 built-in prompts × 2 steps (runs in ONNX Runtime on CPU)."""
    import shutil

    from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings
    from fluxexport.quantize.qdq_export import quantize_transformer

    root = tmp_path_factory.mktemp("fp8")
    folders = {}
    for name, source in sources.items():
        folder = root / name
        shutil.copytree(exports[name], folder)
        settings = CalibrationSettings(CALIBRATION_PROMPTS[:3], steps=2, height=144, width=272)
        quantize_transformer(source, folder, settings, base_dtype="fp32")
        folders[name] = folder
    return folders
