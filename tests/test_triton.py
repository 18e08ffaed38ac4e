"""Triton model repositories: configs checked without a server, then served by a REAL tritonserver."""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import OnDemand, build_folder, has_tritonserver, manifest_json, write_kohya, write_peft

from fluxexport.cli import main
from fluxexport.compare import psnr
from fluxexport.errors import FluxExportError
from fluxexport.runtime.cache import parse_cache
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.specs import ExportBounds, component_specs
from fluxexport.triton.client import pipeline_inputs as client_inputs
from fluxexport.triton.config import check_config
from fluxexport.triton.repository import write_repository

needs_server = pytest.mark.skipif(
    not has_tritonserver(),
    reason="no tritonserver binary: pip install --no-deps nvidia-pytriton (scripts/setup_triton_env.sh)",
)


@pytest.fixture(scope="module")
def request_loras(sources, tmp_path_factory):
    """A kohya LoRA adapting the transformer and CLIP, a PEFT one adapting the transformer (for tiny-dev)."""
    from fluxexport.models.loaders import load_clip, load_transformer
    from fluxexport.models.lora import parse_lora

    folder = tmp_path_factory.mktemp("request-loras")
    transformer, clip = load_transformer(sources["tiny-dev"]), load_clip(sources["tiny-dev"])
    kohya = write_kohya(folder / "ink.safetensors", transformer, clip, with_clip=True)
    peft = write_peft(folder / "watercolor.safetensors", transformer, clip)
    return {"ink": parse_lora(str(kohya)), "watercolor": parse_lora(str(peft))}


@pytest.fixture(scope="module")
def repositories(sources, exports, request_loras, schnell_repository, tmp_path_factory):
    """One repository per variant; tiny-dev's offers two LoRAs per request, tiny-schnell's is the session's
    (conftest: one PEFT LoRA of the transformer, served by the session's `schnell_server`)."""
    root = tmp_path_factory.mktemp("triton")

    def repository(name: str) -> Path:
        if name == "tiny-schnell":
            return schnell_repository
        loras = list(request_loras.values()) if name == "tiny-dev" else []
        return write_repository(sources[name], exports[name], root / name, request_loras=loras)

    return OnDemand(sources, repository)  # each written when a test first asks for it


def parse(folder: Path, spec=None):
    return check_config((folder / "config.pbtxt").read_text(), folder.name, spec)


def test_configs_follow_the_specs_and_the_schema(sources, repositories):
    repository = repositories["tiny-dev"]
    specs = component_specs(sources["tiny-dev"])
    assert sorted(p.name for p in repository.iterdir() if p.is_dir()) == [
        "clip",
        "flux_pipeline",
        "t5",
        "transformer",
        "vae_decoder",
    ]
    for name in ("clip", "t5", "transformer", "vae_decoder"):
        config = parse(repository / name, specs[name])
        assert config.backend == "python" and config.max_batch_size == 0
        assert (repository / name / "1" / "model.onnx").is_file() and (repository / name / "1" / "model.py").is_file()
    transformer = parse(repository / "transformer")
    dims = {tensor.name: list(tensor.dims) for tensor in transformer.input}
    assert dims["img_ids"] == [-1, 3] and dims["txt_ids"] == [-1, 3] and dims["hidden_states"] == [-1, -1, 64]
    pipeline = parse(repository / "flux_pipeline")
    assert [t.name for t in pipeline.input] == ["prompt", "prompt_2", "height", "width", "num_inference_steps",
                                                "guidance_scale", "seed", "num_images", "lora", "lora_scale",
                                                "cache"]  # fmt: skip
    assert [t.optional for t in pipeline.input] == [False] + [True] * 10
    assert [list(t.dims) for t in pipeline.input][-3:] == [[-1], [-1], [1]]
    assert [(t.name, list(t.dims)) for t in pipeline.output] == [("images", [-1, -1, -1, 3])]
    assert "fluxexport serve" in (repository / "README.md").read_text()
    settings = json.loads((repository / "flux_pipeline" / "1" / "pipeline.json").read_text())
    assert {key: settings["bounds"][key] for key in ("min_resolution", "max_resolution", "max_batch")} == {
        "min_resolution": 64, "max_resolution": 1024, "max_batch": 4}  # fmt: skip
    assert settings["bounds"] == vars(ExportBounds.for_model(sources["tiny-dev"]))  # every bound of the export


def test_request_loras_are_placed_and_recorded(repositories, request_loras):
    repository = repositories["tiny-dev"]
    assert sorted(p.name for p in (repository / "flux_pipeline" / "1" / "loras").iterdir()) == [
        "ink.safetensors", "watercolor.safetensors"]  # fmt: skip
    settings = json.loads((repository / "flux_pipeline" / "1" / "pipeline.json").read_text())
    assert settings["loras"] == {
        "ink": {"file": "ink.safetensors", "sha256": request_loras["ink"].sha256, "modules": ["clip", "transformer"]},
        "watercolor": {"file": "watercolor.safetensors", "sha256": request_loras["watercolor"].sha256,
                       "modules": ["transformer"]},
    }  # fmt: skip
    for name in ("transformer", "clip"):
        component = json.loads((repository / name / "1" / "component.json").read_text())
        assert component["lora_folder"] == "flux_pipeline/1/loras" and component["lora_module"] == name
    assert "lora_folder" not in json.loads((repository / "t5" / "1" / "component.json").read_text())
    # a repository written without request LoRAs (tiny-kontext's; the session's tiny-schnell one offers `ink`)
    assert "lora_folder" not in json.loads((repositories["tiny-kontext"] / "clip" / "1" / "component.json").read_text())
    assert "ink, watercolor" in (repository / "README.md").read_text()


def test_request_lora_refusals(sources, exports, fp8_exports, request_loras, tmp_path):
    from fluxexport.models.lora import parse_lora

    dev, ink = sources["tiny-dev"], request_loras["ink"]
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(ink.path, other / "ink.safetensors")
    refusals = [
        (exports["tiny-dev"], [ink, parse_lora(str(other / "ink.safetensors"))], {},
         "two --request-lora files are named ink: a request names LoRAs by file stem"),
        (fp8_exports["tiny-dev"], [ink], {},
         "LoRA ink adapts the transformer, whose graph here is FP8: write the repository with --no-fp8"),
    ]  # fmt: skip
    for index, (engines, loras, kwargs, message) in enumerate(refusals):
        with pytest.raises(FluxExportError, match=f"^{message}$"):
            write_repository(dev, engines, tmp_path / f"r{index}", request_loras=loras, **kwargs)
        assert not (tmp_path / f"r{index}").exists()
    write_repository(dev, fp8_exports["tiny-dev"], tmp_path / "fp32", fp8=False, request_loras=[ink])
    from safetensors.torch import load_file, save_file

    deeper = {k.replace("double_blocks_0", "double_blocks_7"): v for k, v in load_file(str(ink.path)).items()}
    save_file(deeper, str(tmp_path / "deeper.safetensors"))
    with pytest.raises(FluxExportError, match="which this model does not have as a Linear"):
        write_repository(
            dev, exports["tiny-dev"], tmp_path / "k", request_loras=[parse_lora(str(tmp_path / "deeper.safetensors"))]
        )
    assert not (tmp_path / "k").exists()


def test_kontext_repository_takes_an_image(repositories):
    repository = repositories["tiny-kontext"]
    assert (repository / "vae_encoder" / "config.pbtxt").is_file()
    image = [t for t in parse(repository / "flux_pipeline").input if t.name == "image"]
    assert image and list(image[0].dims) == [-1, -1, 3] and image[0].optional


def test_plan_repository_configs(sources, exports, tmp_path):
    """A TensorRT engine folder (written by build_engines over the stand-in TensorRT) becomes tensorrt_plan models."""
    engines = build_folder(sources["tiny-dev"], exports["tiny-dev"], tmp_path / "engines")
    plans = manifest_json(engines)["components"]
    repository = write_repository(sources["tiny-dev"], engines, tmp_path / "repo")
    specs = component_specs(sources["tiny-dev"])
    for name in ("clip", "t5", "transformer", "vae_decoder"):
        config = parse(repository / name, specs[name])
        assert config.platform == "tensorrt_plan" and config.max_batch_size == 0
        assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
        assert list(config.instance_group[0].profile) == ["0"]
        assert (repository / name / "1" / "model.plan").read_bytes() == (engines / plans[name]["file"]).read_bytes()
    settings = json.loads((repository / "flux_pipeline" / "1" / "pipeline.json").read_text())
    assert settings["kind"] == "tensorrt" and settings["bounds"]["max_batch"] == 2
    with pytest.raises(FluxExportError, match="^per-request LoRAs are swapped by the ONNX Runtime components; "
                       "TensorRT plans take LoRAs by refit: fluxexport refit --model tiny-dev --engines DIR --lora "
                       "FILE, then write"):  # fmt: skip
        write_repository(sources["tiny-dev"], engines, tmp_path / "repo2", request_loras=[object()])


def test_config_checks_refuse_mistakes(sources, repositories):
    text = (repositories["tiny-dev"] / "transformer" / "config.pbtxt").read_text()
    spec = component_specs(sources["tiny-dev"])["transformer"]
    with pytest.raises(FluxExportError, match="names the model 'transformer': Triton needs the folder name"):
        check_config(text, "unet", spec)
    with pytest.raises(FluxExportError, match=r"transformer.img_ids: dims \[-1, 4\], the spec says \[-1, 3\]"):
        check_config(
            text.replace('dims: [ -1, 3 ] },\n  { name: "txt_ids"', 'dims: [ -1, 4 ] },\n  { name: "txt_ids"'),
            "transformer",
            spec,
        )
    with pytest.raises(FluxExportError, match="does not fit Triton's schema"):
        check_config(text.replace("max_batch_size", "max_batch"), "transformer", spec)


def test_repository_refusals(sources, exports, tmp_path, repositories):
    with pytest.raises(FluxExportError, match="already exists and is not empty"):
        write_repository(sources["tiny-dev"], exports["tiny-dev"], repositories["tiny-dev"])
    with pytest.raises(FluxExportError, match="were exported from 'tiny-dev', not from 'tiny-schnell'"):
        write_repository(sources["tiny-schnell"], exports["tiny-dev"], tmp_path / "r1")
    partial = tmp_path / "partial"
    shutil.copytree(exports["tiny-dev"], partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    del manifest["components"]["t5"]
    (partial / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FluxExportError, match="lacks t5: the pipeline needs clip, t5, transformer, vae_decoder"):
        write_repository(sources["tiny-dev"], partial, tmp_path / "r2")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_cli_triton(tmp_path, exports, sources):
    result = CliRunner().invoke(
        main,
        ["triton", "--model", "tiny-schnell", "--engines", str(exports["tiny-schnell"]), "--out", str(tmp_path / "r")],
    )
    assert result.exit_code == 0, result.output
    assert "repository for tiny-schnell: clip, flux_pipeline, t5, transformer, vae_decoder" in result.output


def test_client_inputs_follow_the_pipeline_config():
    import tritonclient.http as http

    inputs = client_inputs(http, "a fox", height=256, seed=3, lora=["ink", "watercolor"], lora_scale=[0.5])
    assert [(i.name(), i.datatype(), i.shape()) for i in inputs] == [
        ("prompt", "BYTES", [1]), ("height", "INT32", [1]), ("seed", "INT64", [1]), ("lora", "BYTES", [2]),
        ("lora_scale", "FP32", [1])]  # fmt: skip
    with pytest.raises(ValueError, match="flux_pipeline has no input 'steps' \\(it takes prompt, prompt_2,"):
        client_inputs(http, "a fox", steps=4)


# ---- a real server ----------------------------------------------------------------------------------


def pipeline_inputs(module, prompt, height=None, width=None, steps=None, seed=None, image=None, guidance=None,
                    loras=None, scales=None, cache=None):  # fmt: skip
    return client_inputs(module, prompt, height=height, width=width, num_inference_steps=steps, seed=seed,
                         image=image, guidance_scale=guidance, lora=loras, lora_scale=scales, cache=cache)  # fmt: skip


@pytest.fixture(scope="module", params=["tiny-schnell", "tiny-dev", "tiny-kontext"])
def served(request, repositories):
    from fluxexport.triton.server import TritonServer

    if not has_tritonserver():
        pytest.skip("no tritonserver binary: pip install --no-deps nvidia-pytriton (scripts/setup_triton_env.sh)")
    if request.param == "tiny-schnell":  # the session's server, shared with test_triton_errors.py (conftest)
        yield request.param, request.getfixturevalue("schnell_server")
        return
    server = TritonServer(repositories[request.param])
    started = time.perf_counter()
    with server:
        print(
            f"\n{request.param}: tritonserver pid {server.process.pid} ready in {time.perf_counter() - started:.1f} s"
        )
        yield request.param, server
    assert server.process.returncode is not None  # stopped by PID
    assert list(Path("/dev/shm").glob(f"{server.shm_prefix}*")) == []


def pipeline_counts(server) -> dict[str, float]:
    """flux_pipeline's inference count and successful requests, from Triton's Prometheus metrics."""
    import re
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    counts = {}
    for metric in ("nv_inference_count", "nv_inference_request_success"):
        found = re.search(rf'^{metric}{{[^}}]*model="flux_pipeline"[^}}]*}} (\S+)$', text, re.MULTILINE)
        counts[metric] = float(found[1]) if found else 0.0
    return counts


@needs_server
def test_metrics_count_the_pipelines_requests(served):
    import tritonclient.http as http

    _, server = served
    before = pipeline_counts(server)
    client = http.InferenceServerClient(server.http_url)
    for seed in range(3):
        client.infer("flux_pipeline", pipeline_inputs(http, "a fox", 64, 64, 1, seed))
    deadline, after = time.monotonic() + 10, pipeline_counts(server)
    while after["nv_inference_request_success"] - before["nv_inference_request_success"] < 3:
        assert time.monotonic() < deadline, (before, after)
        time.sleep(0.2)
        after = pipeline_counts(server)
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] == 3
    assert after["nv_inference_count"] - before["nv_inference_count"] == 3  # one image per request


@needs_server
def test_http_and_grpc_images_equal_fluxexport_run(served, sources, ort_backends, reference_image):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    variant, server = served
    image = np.array(reference_image) if variant == "tiny-kontext" else None
    for height, width, seed in ((144, 272, 3), (256, 256, 0)):
        request = GenerationRequest("a red fox in the snow", height=height, width=width, num_inference_steps=3, seed=seed,
                                    image=reference_image if image is not None else None)  # fmt: skip
        expected = generate(ort_backends[variant], sources[variant], request).images
        over_http = (
            http.InferenceServerClient(server.http_url)
            .infer("flux_pipeline", pipeline_inputs(http, "a red fox in the snow", height, width, 3, seed, image))
            .as_numpy("images")
        )
        over_grpc = (
            grpc.InferenceServerClient(server.grpc_url)
            .infer("flux_pipeline", pipeline_inputs(grpc, "a red fox in the snow", height, width, 3, seed, image))
            .as_numpy("images")
        )
        assert over_http.shape == over_grpc.shape == expected.shape == (1, height, width, 3)
        assert psnr(over_http, expected) >= 50 and psnr(over_grpc, expected) >= 50
    # a request's step cache: the image `run --cache` makes on the same graphs
    cache = "taylorseer:interval=2,warmup=2"
    request = GenerationRequest("a red fox in the snow", height=256, width=256, num_inference_steps=6, seed=0,
                                image=reference_image if image is not None else None)  # fmt: skip
    expected = generate(ort_backends[variant], sources[variant], request, cache=parse_cache(cache)).images
    cached = (
        http.InferenceServerClient(server.http_url)
        .infer("flux_pipeline", pipeline_inputs(http, "a red fox in the snow", 256, 256, 6, 0, image, cache=cache))
        .as_numpy("images")
    )
    assert psnr(cached, expected) >= 50


@needs_server
@pytest.mark.parametrize("served", ["tiny-dev"], indirect=True)
def test_concurrent_load_and_bad_requests(served):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    _, server = served
    sizes = [(144, 272), (256, 256), (128, 192), (192, 128)]

    def ask(client, height, width, seed):
        return client.infer("flux_pipeline", pipeline_inputs(http, "a lighthouse", height, width, 2, seed)).as_numpy(
            "images"
        )

    single = {}
    client = http.InferenceServerClient(server.http_url)
    for index, (height, width) in enumerate(sizes):
        single[(height, width, index)] = ask(client, height, width, index)

    latencies, failures, lock = [], [], threading.Lock()

    def worker(number):
        own = http.InferenceServerClient(server.http_url)
        for repeat in range(5):
            index = (number + repeat) % len(sizes)
            height, width = sizes[index]
            start = time.perf_counter()
            try:
                images = ask(own, height, width, index)
                ok = np.array_equal(images, single[(height, width, index)])
            except Exception as error:  # noqa: BLE001 - collected and asserted below
                ok, images = False, error
            with lock:
                latencies.append(time.perf_counter() - start)
                if not ok:
                    failures.append((number, repeat, images))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    elapsed = time.perf_counter() - start
    assert not failures, failures[:3]
    assert len(latencies) == 40
    ordered = sorted(latencies)
    print(f"\n8 clients × 5 requests: {40 / elapsed:.2f} req/s, p50 {statistics.median(ordered) * 1000:.0f} ms, "
          f"p95 {ordered[int(0.95 * len(ordered)) - 1] * 1000:.0f} ms")  # fmt: skip

    # refused requests are the client's fault: HTTP 400 / gRPC INVALID_ARGUMENT, in request terms (no CLI flags)
    import tritonclient.grpc as grpc

    grpc_client = grpc.InferenceServerClient(server.grpc_url)
    bad = [
        (dict(height=250, width=256), "height 250 is not a multiple of 16: use 240 or 256"),
        (dict(height=2048, width=256), "height 2048 is outside this deployment's 64..1024 px"),
        (dict(height=256, width=256, steps=0), "num_inference_steps must be at least 1, got 0"),
        (
            dict(height=256, width=256, cache="magic"),
            "unknown cache 'magic': choose one of none, first-block, taylorseer, magcache, teacache",
        ),
        (dict(height=256, width=256, cache="magcache:ratios=/etc/hostname"), "NAME.json), got '/etc/hostname'"),
    ]
    for kwargs, message in bad:
        for protocol, target, status in ((http, client, "400"), (grpc, grpc_client, "StatusCode.INVALID_ARGUMENT")):
            with pytest.raises(InferenceServerException) as refused:
                target.infer(
                    "flux_pipeline",
                    pipeline_inputs(
                        protocol,
                        "a fox",
                        kwargs["height"],
                        kwargs["width"],
                        kwargs.get("steps", 2),
                        cache=kwargs.get("cache"),
                    ),  # fmt: skip
                )
            assert refused.value.message().endswith(message) and "--" not in refused.value.message()
            assert str(refused.value.status()) == status, (protocol.__name__, refused.value)
    with pytest.raises(InferenceServerException, match="prompt is empty: pass the text to draw in the prompt input"):
        client.infer("flux_pipeline", pipeline_inputs(http, "   "))
    assert server.process.poll() is None  # still serving
    assert np.array_equal(ask(client, 144, 272, 0), single[(144, 272, 0)])


@needs_server
@pytest.mark.parametrize("served", ["tiny-dev"], indirect=True)
def test_loras_per_request_equal_the_swapped_backend(served, sources, exports, request_loras):
    """`lora`/`lora_scale` swap LoRAs into the served transformer and CLIP: each answer equals `run --backend
    onnxruntime --lora` on the same graphs; a request without LoRAs gets the base model back."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from fluxexport.models.lora import parse_lora
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    _, server = served
    client, base = http.InferenceServerClient(server.http_url), sources["tiny-dev"]

    def served_image(loras=None, scales=None):
        inputs = pipeline_inputs(http, "a red fox", 128, 128, 2, 3, loras=loras, scales=scales)
        return client.infer("flux_pipeline", inputs).as_numpy("images")

    def swapped_image(*values):
        source = base.with_loras([parse_lora(value) for value in values])
        with OnnxRuntimeBackend(source, exports["tiny-dev"]) as backend:
            return generate(backend, source, GenerationRequest("a red fox", height=128, width=128,
                                                               num_inference_steps=2, seed=3)).images  # fmt: skip

    ink, watercolor = str(request_loras["ink"].path), str(request_loras["watercolor"].path)
    plain = served_image()
    assert psnr(plain, swapped_image()) >= 50
    with_ink = served_image(["ink"], [0.8])
    assert psnr(with_ink, swapped_image(f"{ink}:0.8")) >= 50 and psnr(with_ink, plain) < 40
    both = served_image(["watercolor", "ink"], [0.5])
    assert psnr(both, swapped_image(f"{watercolor}:0.5", f"{ink}:0.5")) >= 50
    assert np.array_equal(served_image(), plain)  # back to the base weights
    assert np.array_equal(served_image(["ink"], [0.8]), with_ink)
    grpc_client = grpc.InferenceServerClient(server.grpc_url)
    for loras, scales, message in (
        (["sketch"], None, "lora 'sketch' is not in this repository; it has: ink, watercolor"),
        (["ink", "watercolor"], [0.5, 0.5, 0.5], "lora_scale holds 3 values for 2 LoRAs: give one, or one each"),
        (None, [0.5], "lora_scale was given without a lora input: name the LoRAs to apply"),
    ):
        with pytest.raises(InferenceServerException) as refused:
            client.infer("flux_pipeline", pipeline_inputs(http, "a fox", 64, 64, 1, loras=loras, scales=scales))
        assert refused.value.message().endswith(message) and str(refused.value.status()) == "400"
        with pytest.raises(InferenceServerException) as refused:
            grpc_client.infer("flux_pipeline", pipeline_inputs(grpc, "a fox", 64, 64, 1, loras=loras, scales=scales))
        assert str(refused.value.status()) == "StatusCode.INVALID_ARGUMENT"


@needs_server
def test_serve_command_stops_cleanly_on_ctrl_c(repositories, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "fluxexport.cli", "serve", str(repositories["tiny-schnell"])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, COLUMNS="200"),
    )  # fmt: skip
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "ready: HTTP 127.0.0.1:" in line or not line:
            break
    assert any("ready: HTTP 127.0.0.1:" in line for line in lines), "".join(lines)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, "".join(lines) + output
    assert "stopping" in output
