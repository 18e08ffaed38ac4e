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


@pytest.fixture(scope="session", autouse=True)
def trace_cache(tmp_path_factory) -> Path:
    """Each tiny graph is traced once per session: `FLUXEXPORT_TRACE_CACHE` (`export/trace_cache.py`) in a folder
    the xdist workers and the README's commands share; every export after the first of an architecture reads
    the trace and runs the rest (weights, optimizer, passes, write) as usual, writing the same bytes."""
    from fluxexport.export.trace_cache import ENVIRONMENT_VARIABLE

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/, above each worker's popen-gwK/
    os.environ[ENVIRONMENT_VARIABLE] = str(root / "trace-cache")
    return root / "trace-cache"


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
    """fp32 ONNX exports of all five components for each tiny variant (~20 s each, once per session, shared by the
    xdist workers, when a test first asks for the variant)."""
    from helpers import OnDemand, once_per_session

    from fluxexport.export.onnx_export import export_model

    return OnDemand(sources, lambda name: once_per_session(
        tmp_path_factory, f"onnx-{name}", lambda folder: export_model(sources[name], folder)))  # fmt: skip


@pytest.fixture(scope="session")
def bf16_export(sources, tmp_path_factory):
    from helpers import once_per_session

    from fluxexport.export.onnx_export import export_model

    return once_per_session(tmp_path_factory, "onnx-bf16", lambda folder: export_model(sources["tiny-dev"], folder,
                                                                                        dtype="bf16"))  # fmt: skip


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
    from helpers import once_per_session

    from fluxexport.export.onnx_export import export_model

    return once_per_session(tmp_path_factory, "onnx-klein", lambda folder: export_model(flux2_sources["tiny-klein"],
                                                                                         folder))  # fmt: skip


@pytest.fixture(scope="session")
def flux2_dev_export(flux2_sources, tmp_path_factory):
    """fp32 ONNX exports of tiny-flux2-dev's four components (its Mistral3 text encoder streamed from the legacy
    checkpoint layout, its transformer with the guidance input)."""
    from helpers import once_per_session

    from fluxexport.export.onnx_export import export_model

    return once_per_session(tmp_path_factory, "onnx-flux2-dev",
                            lambda folder: export_model(flux2_sources["tiny-flux2-dev"], folder))  # fmt: skip


def _parts_export(model: str, graphs: Path, folder: Path) -> Path:
    """A copy of a session export plus the transformer's parts, through `export --transformer-parts` (which
    checks them for TensorRT)."""
    import shutil

    from click.testing import CliRunner

    from fluxexport.cli import main

    shutil.copytree(graphs, folder)
    result = CliRunner().invoke(main, [
        "export", "--model", model, "--components", "transformer_out", "--transformer-parts", "--out", str(folder),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="session")
def flux2_parts_export(flux2_export, tmp_path_factory):
    """tiny-klein's session export plus the transformer's parts (`export --transformer-parts`)."""
    from helpers import once_per_session

    return once_per_session(tmp_path_factory, "klein-parts",
                            lambda folder: _parts_export("tiny-klein", flux2_export, folder))  # fmt: skip


@pytest.fixture(scope="session")
def parts_export(exports, tmp_path_factory):
    """tiny-dev's session export plus the transformer's parts (`export --transformer-parts`): what `--cache
    first-block` and magcache run on ONNX Runtime. Read-only: a test that changes it works on a copy."""
    from helpers import once_per_session

    return once_per_session(tmp_path_factory, "parts",
                            lambda folder: _parts_export("tiny-dev", exports["tiny-dev"], folder))  # fmt: skip


@pytest.fixture(scope="session")
def parts_engines(sources, parts_export, tmp_path_factory) -> Path:
    """Engines of `parts_export`'s clip, t5, vae_decoder and transformer parts, built by `build`'s own code over
    the stand-in TensorRT (helpers.build_folder). Read-only."""
    from helpers import build_folder, once_per_session

    from fluxexport.specs import TRANSFORMER_PARTS

    names = ["clip", "t5", "vae_decoder", *TRANSFORMER_PARTS]

    def build(folder: Path) -> None:
        build_folder(sources["tiny-dev"], parts_export, folder, components=names)

    return once_per_session(tmp_path_factory, "parts-engines", build)


@pytest.fixture(scope="session")
def schnell_repository(sources, exports, tmp_path_factory) -> Path:
    """tiny-schnell's Triton repository (`write_repository`), offering one LoRA per request: `ink`, a PEFT LoRA
    of the transformer from tiny-lora's code (the file is `schnell_repository / LORA_FOLDER / "ink.safetensors"`)."""
    from fluxexport.models.lora import parse_lora
    from fluxexport.models.tiny_lora import write_tiny_lora
    from fluxexport.triton.repository import write_repository

    root = tmp_path_factory.mktemp("triton-schnell")
    lora = parse_lora(str(write_tiny_lora(sources["tiny-schnell"], root / "ink.safetensors")))
    return write_repository(sources["tiny-schnell"], exports["tiny-schnell"], root / "repository",
                            request_loras=[lora])  # fmt: skip


@pytest.fixture(scope="session")
def schnell_server(schnell_repository):
    """FLUX.1's one real tritonserver for the tests that can share it (test_triton.py's tiny-schnell requests,
    test_triton_errors.py): started once, stopped by PID at the end of the session, its shared memory gone.
    A test that changes a file of the repository puts it back before it returns."""
    import time

    from helpers import has_tritonserver

    from fluxexport.triton.server import TritonServer

    if not has_tritonserver():
        pytest.skip("no tritonserver binary: pip install --no-deps nvidia-pytriton (scripts/setup_triton_env.sh)")
    server, started = TritonServer(schnell_repository), time.perf_counter()
    with server:
        print(f"\ntiny-schnell: tritonserver pid {server.process.pid} ready in {time.perf_counter() - started:.1f} s")
        yield server
    assert server.process.returncode is not None  # stopped by PID
    assert list(Path("/dev/shm").glob(f"{server.shm_prefix}*")) == []


@pytest.fixture(scope="session")
def ort_backends(sources, exports):
    from helpers import OnDemand

    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    return OnDemand(sources, lambda name: OnnxRuntimeBackend(sources[name], exports[name]))


# Session fixtures that export or quantize (tens of seconds each on 2 cores): a test that needs one, directly or
# through another fixture, is `slow`, so `pytest -m "not slow"` is the quick loop
EXPORTING_FIXTURES = {"exports", "bf16_export", "fp8_exports", "flux2_export", "flux2_dev_export",
                      "flux2_parts_export", "parts_export", "parts_engines"}  # fmt: skip


FLUX1_EXPORTS = {"exports", "bf16_export", "fp8_exports", "parts_export", "parts_engines"}
FLUX2_EXPORTS = {"flux2_export", "flux2_dev_export", "flux2_parts_export"}


TRITONSERVER_FIXTURES = {"schnell_repository", "schnell_server"}  # the session's one FLUX.1 tritonserver


def xdist_group(nodeid: str, fixtures: set[str]) -> str | None:
    """The worker group of a test under pytest-xdist's `--dist loadgroup`. The session's exports are made once
    whichever worker asks (`helpers.once_per_session`), so a test that needs one is grouped only with the other such
    tests of its module (the module's own fixtures are then made once), the tests that share the session's
    tritonserver with each other, and the README's blocks (which start from the quick start's folder, made once,
    and run in one fork server); the rest go wherever a worker is free."""
    if fixtures & TRITONSERVER_FIXTURES:
        return "tiny-schnell-tritonserver"
    if nodeid.startswith("tests/test_readme.py::test_every_readme_command_runs_as_pasted"):
        return "readme"  # one worker runs the quick start and then every block, in its fork server
    if fixtures & (FLUX1_EXPORTS | FLUX2_EXPORTS):
        return nodeid.split("::")[0]
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks added here
def pytest_collection_modifyitems(config, items):
    """`tensorrt` and `gpu` tests skip, saying why, where TensorRT or a CUDA GPU is missing; tests that need an
    export are marked `slow`."""
    from fluxexport.tensorrt.environment import tensorrt_available

    for item in items:
        if EXPORTING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if config.pluginmanager.hasplugin("xdist"):  # `-n 2 --dist loadgroup`: each family's exports made once
        for item in items:
            group = xdist_group(item.nodeid, set(getattr(item, "fixturenames", ())))
            if group:
                item.add_marker(pytest.mark.xdist_group(group))

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

    from helpers import OnDemand, once_per_session

    from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings
    from fluxexport.quantize.qdq_export import quantize_transformer

    def quantize(name: str, folder: Path) -> None:
        shutil.copytree(exports[name], folder)
        settings = CalibrationSettings(CALIBRATION_PROMPTS[:3], steps=2, height=144, width=272)
        quantize_transformer(sources[name], folder, settings, base_dtype="fp32")

    return OnDemand(sources, lambda name: once_per_session(tmp_path_factory, f"fp8-{name}",
                                                           lambda folder: quantize(name, folder)))  # fmt: skip
