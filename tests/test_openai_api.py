"""The OpenAI-compatible front (`serve --openai-port`), driven by the official `openai` client against the session's
real tritonserver (conftest's `schnell_server`): images equal `fluxexport run`'s, refusals come as OpenAI's error
JSON with the field as `param`, a concurrent load of mixed sizes ends without an error, and a front whose Triton is
down answers 503 (and stays up)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import has_tritonserver
from PIL import Image

from fluxexport.cli import main
from fluxexport.openai_api.app import FrontSettings
from fluxexport.openai_api.protocol import ApiError, decode_image, parse_loras, parse_request, triton_refusal
from fluxexport.openai_api.server import FrontServer
from fluxexport.triton.server import free_port

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra: pip install -e .[dev]")
needs_server = pytest.mark.skipif(
    not has_tritonserver(),
    reason="no tritonserver binary: pip install --no-deps nvidia-pytriton (scripts/setup_triton_env.sh)",
)
PROMPT = "a red fox"


def open_front(triton_url: str, **options):
    from fluxexport.commands.serve import FrontOptions, open_front

    return open_front(FrontOptions(free_port(), triton_url=triton_url, **options))


def client_of(front) -> openai.OpenAI:
    return openai.OpenAI(base_url=front.url, api_key="unused", max_retries=0, timeout=300)


def pixels(b64: str) -> tuple[np.ndarray, str | None]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB")), image.format


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def front(schnell_server, schnell_repository):
    """The front before the session's tiny-schnell Triton, its model id read from the repository."""
    with open_front(schnell_server.http_url, repository=schnell_repository) as running:
        yield running


@needs_server
def test_generations_equal_fluxexport_run(front, sources, ort_backends):
    from fluxexport.runtime.pipeline import GenerationRequest, generate

    client = client_of(front)
    assert [model.id for model in client.models.list()] == ["tiny-schnell"]
    served = client.images.generate(
        model="tiny-schnell", prompt=PROMPT, size="80x64", extra_body={"seed": 5, "steps": 2}
    )  # fmt: skip
    assert served.size == "80x64" and served.output_format == "png" and len(served.data) == 1
    image, kind = pixels(served.data[0].b64_json)
    # `run --backend onnxruntime`'s image on the graphs the repository serves (the session's backend on them)
    request = GenerationRequest(PROMPT, height=64, width=80, num_inference_steps=2, seed=5)
    expected = generate(ort_backends["tiny-schnell"], sources["tiny-schnell"], request).images
    assert kind == "PNG" and np.array_equal(image, expected[0])

    # n images in one request, jpeg and webp at the asked quality, the LoRA and cache extensions pass through
    many = client.images.generate(prompt=PROMPT, size="64x64", n=2, output_format="jpeg", output_compression=90,
                                  extra_body={"seed": 5, "steps": 2, "lora": "ink:0.5", "cache": "none"})  # fmt: skip
    assert [pixels(item.b64_json)[1] for item in many.data] == ["JPEG", "JPEG"]
    assert pixels(many.data[0].b64_json)[0].shape == (64, 64, 3)
    webp = client.images.generate(prompt=PROMPT, size="64x64", output_format="webp", extra_body={"steps": 1})
    assert pixels(webp.data[0].b64_json)[1] == "WEBP"


@pytest.fixture(scope="module")
def kontext_front(exports, sources, tmp_path_factory):
    """A tritonserver on tiny-kontext's session export (the one reference-taking FLUX.1 repository) and the front
    before it: what /v1/images/edits is for."""
    from fluxexport.triton.repository import write_repository
    from fluxexport.triton.server import TritonServer

    if not has_tritonserver():
        pytest.skip("no tritonserver binary: pip install --no-deps nvidia-pytriton (scripts/setup_triton_env.sh)")
    folder = tmp_path_factory.mktemp("openai-kontext") / "repository"
    repository = write_repository(sources["tiny-kontext"], exports["tiny-kontext"], folder)
    with TritonServer(repository) as server, open_front(server.http_url, repository=repository) as running:
        yield running


@needs_server
def test_edits_take_the_reference_as_run_does(kontext_front, sources, ort_backends, reference_image):
    from fluxexport.runtime.pipeline import GenerationRequest, generate

    buffer = io.BytesIO()
    reference_image.save(buffer, format="PNG")
    client = client_of(kontext_front)
    edited = client.images.edit(image=[("fox.png", buffer.getvalue())], prompt=PROMPT, size="64x80",
                                extra_body={"seed": 3, "steps": 2})  # fmt: skip
    request = GenerationRequest(PROMPT, height=80, width=64, num_inference_steps=2, seed=3, image=reference_image)
    expected = generate(ort_backends["tiny-kontext"], sources["tiny-kontext"], request).images
    assert edited.size == "64x80" and np.array_equal(pixels(edited.data[0].b64_json)[0], expected[0])
    two = (("a.png", buffer.getvalue()), ("b.png", buffer.getvalue()))
    assert refusal(lambda: client.images.edit(image=list(two), prompt=PROMPT)) == (
        400, "image", "invalid_value", "this model takes at most 1 reference image(s), got 2")  # fmt: skip
    assert refusal(lambda: client.images.edit(image=[("x.png", b"not a picture")], prompt=PROMPT)) == (
        400, "image", "invalid_value", "image is not an image PIL can read (send PNG, JPEG or WebP)")  # fmt: skip
    assert refusal(lambda: client.images.edit(image=[two[0]], mask=two[1], prompt=PROMPT)) == (
        400, "mask", "invalid_value", "mask is not served: FLUX edits follow the prompt, drop the mask")  # fmt: skip


def refusal(call, kind=None):
    with pytest.raises(kind or openai.BadRequestError) as refused:
        call()
    error = refused.value
    return error.status_code, error.body["param"], error.body["code"], error.body["message"]


@needs_server
def test_bad_requests_are_openai_errors_naming_the_field(front, schnell_repository):
    from fluxexport.triton.repository import LORA_FOLDER

    client = client_of(front)
    generate = client.images.generate
    cases = [
        (lambda: generate(prompt=PROMPT, size="250x256", extra_body={"steps": 1}),
         (400, "size", "invalid_value", "width 250 is not a multiple of 16: use 240 or 256")),
        (lambda: generate(prompt=PROMPT, size="64x64", extra_body={"lora": "nope", "steps": 1}),
         (400, "lora", "invalid_value", "lora 'nope' is not in this repository; it has: ink")),
        (lambda: generate(prompt=PROMPT, n=11), (400, "n", "invalid_value", "n must be in 1..10, got 11")),
        (lambda: generate(prompt=PROMPT, size="big"),
         (400, "size", "invalid_value", "size must be WIDTHxHEIGHT in pixels (e.g. 1024x768) or auto, got 'big'")),
        (lambda: generate(prompt=PROMPT, response_format="url"),
         (400, "response_format", "invalid_value", "response_format 'url' is not served: use b64_json (this "
          "server keeps no files, so it has no URLs to give)")),
        (lambda: generate(prompt=PROMPT, extra_body={"stepz": 2}),
         (400, "stepz", "invalid_value", "unknown field 'stepz'; the extensions are seed, steps, guidance, "
          "negative_prompt, lora, cache")),
        (lambda: generate(prompt=PROMPT, extra_body={"negative_prompt": "blur"}),
         (400, "negative_prompt", "invalid_value", "this model takes no negative_prompt: drop it")),
        (lambda: client.images.edit(image=[("a.png", png_bytes())], prompt=PROMPT),
         (400, "image", "invalid_value", "this model takes no reference image: use /v1/images/generations")),
        (lambda: client.images.create_variation(image=("a.png", png_bytes())),
         (400, "image", "invalid_value", "this server has no FLUX.1 Redux prior, which makes variations: write its "
          "repository with fluxexport triton --redux PRIOR --redux-engines DIR, or use /v1/images/edits")),
    ]  # fmt: skip
    for call, expected in cases:
        assert refusal(call) == expected
    assert refusal(lambda: generate(model="dall-e-3", prompt=PROMPT), openai.NotFoundError) == (
        404, "model", "model_not_found", "model 'dall-e-3' is not served here; it serves 'tiny-schnell'")  # fmt: skip
    # our fault, not the request's: the repository's LoRA file damaged on disk (put back before the test returns)
    lora_file = schnell_repository / LORA_FOLDER / "ink.safetensors"
    original = lora_file.read_bytes()
    lora_file.write_bytes(b"\x00" * 64)
    try:
        status, param, code, message = refusal(
            lambda: generate(prompt=PROMPT, size="64x64", extra_body={"lora": "ink", "steps": 1}),
            openai.InternalServerError,
        )  # fmt: skip
    finally:
        lora_file.write_bytes(original)
    assert (status, param, code) == (500, None, "internal_error")
    assert message.startswith("internal error: ") and "ink.safetensors" in message, message
    assert too_large(front, "/v1/images/generations", 2 << 20) == (413, "request_too_large")
    assert too_large(front, "/v1/images/edits", 65 << 20) == (413, "request_too_large")
    assert too_large(front, "/v1/images/variations", 65 << 20) == (413, "request_too_large")


def too_large(front, path: str, length: int) -> tuple[int, str]:
    """The answer to a request announcing a body of `length` bytes, before any of it is sent."""
    import http.client

    connection = http.client.HTTPConnection(front.host, front.port, timeout=30)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(length))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())["error"]["code"]
    finally:
        connection.close()


def png_bytes(width: int = 48, height: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@needs_server
def test_concurrent_clients_of_mixed_sizes_get_no_error(front):
    sizes = ("64x64", "80x64", "64x96")
    answers: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def worker(number: int) -> None:
        client = client_of(front)
        for request in range(4):
            size = sizes[(number + request) % len(sizes)]
            try:
                served = client.images.generate(prompt=f"{PROMPT} {number}", size=size,
                                                extra_body={"steps": 1, "seed": request})  # fmt: skip
                answers.append((size, served.size))
            except BaseException as error:  # counted, not raised in the thread
                errors.append(error)

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert errors == [] and len(answers) == 12 and all(asked == got for asked, got in answers)


def test_a_front_whose_triton_is_down_answers_503_and_stays_up():
    with open_front(f"127.0.0.1:{free_port()}", model="flux-test") as front:  # nothing listens there
        assert get(front.url.removesuffix("/v1") + "/health") == (200, {"status": "ok"})
        status, body = get(front.url.removesuffix("/v1") + "/health/ready")
        assert status == 503 and body["error"]["code"] == "service_unavailable"
        client = client_of(front)
        assert [model.id for model in client.models.list()] == ["flux-test"]
        status, param, code, message = refusal(lambda: client.images.generate(prompt=PROMPT),
                                               openai.InternalServerError)  # fmt: skip
        assert (status, param, code) == (503, None, "service_unavailable")
        assert message.startswith("the image model's server does not answer")
        assert refusal(lambda: client.images.generate(prompt=PROMPT, n=0)) == (
            400, "n", "invalid_value", "n must be in 1..10, got 0")  # fmt: skip
    # past its bound of requests in flight (0 here), a front answers 429 before it calls Triton
    settings = FrontSettings(f"127.0.0.1:{free_port()}", "flux-test", max_in_flight=0)
    with FrontServer(settings, port=free_port()) as full:
        status, _, code, _ = refusal(lambda: client_of(full).images.generate(prompt=PROMPT), openai.RateLimitError)
        assert (status, code) == (429, "rate_limit_exceeded")


def test_serve_refusals():
    runner = CliRunner()
    for arguments, message in [
        (["serve"], "give REPOSITORY to serve (or --triton-url URL --openai-port PORT for the front alone)"),
        (["serve", "--triton-url", "127.0.0.1:8000"],
         "--triton-url is where the OpenAI front forwards: add --openai-port PORT"),
        (["serve", "--triton-url", "127.0.0.1:8000", "--openai-port", "8080"],
         "--triton-url without REPOSITORY: pass --served-model-name NAME (the model id clients send), or the "
         "repository Triton serves"),
    ]:  # fmt: skip
        result = runner.invoke(main, arguments)
        assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output


@pytest.mark.slow  # a real `fluxexport serve` process: seconds of imports and a port
def test_serve_runs_the_front_alone_and_stops_on_ctrl_c():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fluxexport.cli", "serve", "--triton-url", f"127.0.0.1:{free_port()}",
         "--openai-port", str(port), "--served-model-name", "flux-test"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, COLUMNS="200"),
    )  # fmt: skip
    try:
        line = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "OpenAI images API" not in line:
            line = process.stdout.readline() or line
            if process.poll() is not None:
                break
        assert f"OpenAI images API: http://127.0.0.1:{port}/v1 (model flux-test" in line, line
        assert get(f"http://127.0.0.1:{port}/v1/models")[1]["data"][0]["id"] == "flux-test"
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and "stopping" in output, output


def test_requests_are_read_as_typed_fields():
    request = parse_request({"prompt": "p", "size": "1024x768", "n": 2, "num_inference_steps": 4, "guidance": 3,
                             "lora": {"ink": 0.5, "sun": 1}, "seed": 7})  # fmt: skip
    assert (request.width, request.height, request.n, request.steps, request.guidance) == (1024, 768, 2, 4, 3.0)
    assert (request.loras, request.lora_scales, request.seed) == (("ink", "sun"), (0.5, 1.0), 7)
    form = parse_request({"prompt": "p", "n": "3", "seed": "9", "lora": ["ink:0.25"], "steps": "2"}, form=True)
    assert (form.n, form.seed, form.steps, form.loras, form.lora_scales) == (3, 9, 2, ("ink",), (0.25,))
    assert parse_loras(["a", "b"], form=False) == (("a", "b"), ())
    for body, param, message in [
        ({"prompt": "p", "n": True}, "n", "n must be a number, got bool"),
        ({"prompt": "p", "steps": 2.5}, "steps", "steps must be a whole number, got 2.5"),
        ({"prompt": "p", "guidance": float("nan")}, "guidance", "guidance must be a finite number, got nan"),
        ({"prompt": "p", "lora": ["a:1", "b"]}, "lora", "give a scale to every LoRA or to none (each then applies at 1)"),
        ({"prompt": "p", "steps": 2, "num_inference_steps": 2}, "num_inference_steps", "give steps or num_inference_steps, not both"),
        ({"n": 1}, "prompt", "prompt is required"),
        ({"prompt": "p", "output_format": "png", "output_compression": 50}, "output_compression",
         "output_compression applies to jpeg and webp: drop it for png"),
        ({"prompt": "p", "background": "transparent"}, "background",
         "background must be auto or opaque: FLUX draws no transparency"),
    ]:  # fmt: skip
        with pytest.raises(ApiError) as refused:
            parse_request(body)
        assert (refused.value.status, refused.value.param, refused.value.message) == (400, param, message)


def test_variations_are_redux_requests():
    """/v1/images/variations' form (no prompt) becomes flux_pipeline's `redux_image`… inputs, its prompt left out;
    refused where the pipeline serves no Redux prior or fewer images."""
    import tritonclient.http as http

    from fluxexport.openai_api.protocol import check_served
    from fluxexport.triton.client import pipeline_inputs

    pictures = (np.zeros((32, 48, 3), np.uint8), np.ones((40, 24, 3), np.uint8))
    request = parse_request({"n": "2", "size": "80x64"}, form=True, images=pictures, variation=True)
    values = request.pipeline_values()
    assert request.prompt is None and "image" not in values and len(values["redux_image"]) == 2
    check_served(request, {"prompt", "height", "width", "num_images", "redux_image", "redux_image_2"})
    inputs = {tensor.name(): tensor for tensor in pipeline_inputs(http, request.prompt, **values)}
    assert set(inputs) == {"height", "width", "num_images", "redux_image", "redux_image_2"}
    assert (inputs["redux_image_2"].shape(), inputs["redux_image_2"].datatype()) == ([40, 24, 3], "UINT8")
    for served, message in [
        ({"prompt", "image"}, "this server has no FLUX.1 Redux prior, which makes variations: write its repository "
         "with fluxexport triton --redux PRIOR --redux-engines DIR, or use /v1/images/edits"),
        ({"prompt", "redux_image"}, "at most 1 image(s) make one variation, got 2"),
    ]:  # fmt: skip
        with pytest.raises(ApiError) as refused:
            check_served(request, served)
        assert (refused.value.status, refused.value.param, refused.value.message) == (400, "image", message)
    assert triton_refusal("400", "redux_scale gives 3 weights for 2 images: give one, or one per image").param is None
    assert triton_refusal("400", "redux_image_2 was given without redux_image: number Redux images").param == "image"


def test_triton_refusals_become_openai_errors():
    cases = [
        ("400", "[request id: <id_unknown>] num_images 9 exceed this deployment's batch limit 4", 400, "n"),
        ("400", "image_2 was given without image: number reference images from image up", 400, "image"),
        ("400", "guidance_scale must be finite", 400, "guidance"),
        ("400", "17 images exceed this deployment's batch limit 4", 400, "n"),
        ("400", "the prompt holds 600 tokens, past 512", 400, None),
        ("400", "Request for unknown model: 'flux_pipeline' is not found", 503, None),
        ("500", "internal error: a component failed", 500, None),
    ]
    for status, message, code, param in cases:
        error = triton_refusal(status, message)
        assert (error.status, error.param) == (code, param), message
        assert not error.message.startswith("[request id")
        assert error.body()["error"]["type"] == ("invalid_request_error" if code < 500 else "server_error")


def test_an_upload_is_read_as_run_reads_a_file(tmp_path):
    """A phone JPEG (EXIF orientation 6: rotate 90°) and a palette PNG upload decode to the pixels `run --image`
    reads from the same file (diffusers' `load_image`): upright, RGB."""
    from fluxexport.runtime.images import load_reference

    picture = Image.fromarray(np.arange(48 * 80 * 3, dtype=np.uint8).reshape(48, 80, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera held sideways
    uploads = {"phone.jpg": {"format": "JPEG", "exif": exif}, "palette.png": {"format": "PNG"}}
    for name, options in uploads.items():
        path = tmp_path / name
        (picture.convert("P") if name.endswith(".png") else picture).save(path, **options)
        decoded = decode_image(path.read_bytes())
        assert decoded.shape[2] == 3
        assert np.array_equal(decoded, np.asarray(load_reference(path))), name
    assert decode_image((tmp_path / "phone.jpg").read_bytes()).shape[:2] == (80, 48)  # upright: rotated
