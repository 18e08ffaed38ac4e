"""Triton repositories for FLUX.2 [klein]: the four components and a flux_pipeline that takes FLUX.2's request
(negative prompt, several reference images); its model.py run in-process gives `fluxexport run`'s image, and
once through a real tritonserver. Also: the `cache` input's magcache ratios never name a file outside the
repository.

In-process, the repository's model.py files (pipeline and components) run as Triton would run them, with a
stand-in `triton_python_backend_utils` that carries tensors between them in memory: BLS requests go to the
component models' own `execute`, and every request is checked against the model's config.pbtxt (names, types,
ranks, required inputs) as Triton checks it. Everything else is the repository's code on ONNX Runtime."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from helpers import has_tritonserver

from fluxexport.compare import psnr
from fluxexport.errors import FluxExportError
from fluxexport.families import FLUX1, FLUX2
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.specs import component_specs
from fluxexport.triton.config import REFERENCE_INPUTS, check_config, pipeline_config
from fluxexport.triton.repository import write_repository

# ---- a stand-in for Triton's python backend: the repository's models in one process ----------------------------

NUMPY_OF = {"TYPE_STRING": np.object_, "TYPE_UINT8": np.uint8, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64,
            "TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_BOOL": np.bool_}  # fmt: skip


class Tensor:
    def __init__(self, name: str, array):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def is_cpu(self) -> bool:
        return True


class TritonError:
    INVALID_ARG = "INVALID_ARG"

    def __init__(self, message: str, code: str | None = None):
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> str | None:
        return self._code


class InferenceResponse:
    def __init__(self, output_tensors=(), error: TritonError | None = None):
        self.outputs, self._error = {t.name(): t for t in output_tensors}, error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class InProcessServer:
    """The repository's models, loaded and initialized as Triton's python backend does (one CPU instance each)."""

    def __init__(self, repository: Path):
        self.configs, self.models = {}, {}
        for folder in sorted(path.parent for path in repository.glob("*/config.pbtxt")):
            self.configs[folder.name] = check_config((folder / "config.pbtxt").read_text(), folder.name)
            spec = importlib.util.spec_from_file_location(f"triton_model_{folder.name}", folder / "1" / "model.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            model = module.TritonPythonModel()
            model.initialize({"model_repository": str(folder), "model_version": "1", "model_name": folder.name,
                              "model_instance_kind": "CPU"})  # fmt: skip
            self.models[folder.name] = model

    def check(self, model: str, inputs: dict[str, Tensor]) -> None:
        """Triton's own checks of a request against the model's config: it refuses these before model.py runs."""
        from tritonclient.grpc import model_config_pb2

        config = {value.name: value for value in self.configs[model].input}
        unknown = sorted(set(inputs) - set(config))
        assert not unknown, f"{model} has no input {unknown[0]!r}: Triton would refuse the request"
        missing = [name for name, value in config.items() if not value.optional and name not in inputs]
        assert not missing, f"{model} needs {missing}: Triton would refuse the request"
        for name, tensor in inputs.items():
            value = config[name]
            dtype = NUMPY_OF[model_config_pb2.DataType.Name(value.data_type)]
            array = tensor.as_numpy()
            assert array.dtype == dtype, (model, name, array.dtype, dtype)
            assert array.ndim == len(value.dims), (model, name, array.shape, list(value.dims))
            assert all(d in (-1, n) for d, n in zip(value.dims, array.shape, strict=True)), (model, name)

    def infer(self, model: str, inputs: list[Tensor], parameters: dict | None = None) -> InferenceResponse:
        named = {tensor.name(): tensor for tensor in inputs}
        self.check(model, named)
        return self.models[model].execute([InferenceRequest(model, [], inputs, parameters or {}, server=self)])[0]


class InferenceRequest:
    server: InProcessServer | None = None  # where BLS requests go (the one server of the test)

    def __init__(self, model_name, requested_output_names, inputs, parameters=None, server=None):
        self.model_name, self.inputs = model_name, {tensor.name(): tensor for tensor in inputs}
        self._parameters = parameters or {}
        self._server = server or InferenceRequest.server

    def parameters(self) -> str:
        return json.dumps(self._parameters)

    def exec(self) -> InferenceResponse:
        return self._server.infer(self.model_name, list(self.inputs.values()), self._parameters)


def standin_pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor, module.TritonError, module.InferenceResponse = Tensor, TritonError, InferenceResponse
    module.InferenceRequest = InferenceRequest
    module.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    module.get_output_tensor_by_name = lambda response, name: response.outputs.get(name)
    return module


def pipeline_request(prompt: str, **values) -> list[Tensor]:
    """flux_pipeline inputs as a client sends them (types from the pipeline config; None leaves one out)."""
    config = {t.name: t for t in FLUX2.part("triton").pipeline_inputs()}
    config |= {t.name: t for t in FLUX1.part("triton").pipeline_inputs()}
    tensors = []
    for name, value in {"prompt": prompt, **values}.items():
        if value is None:
            continue
        dtype = NUMPY_OF[config[name].data_type]
        array = np.array([value.encode()], dtype=object) if dtype is np.object_ else np.asarray(value, dtype=dtype)
        tensors.append(Tensor(name, array.reshape(1) if array.ndim == 0 else array))
    return tensors


@pytest.fixture(scope="module")
def pb_utils():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "triton_python_backend_utils", standin_pb_utils())
        yield sys.modules["triton_python_backend_utils"]


@pytest.fixture(scope="module")
def template(pb_utils):
    """The flux_pipeline template as a module (its request helpers, without a repository)."""
    path = Path(__file__).parents[1] / "fluxexport" / "triton" / "templates" / "flux_pipeline.py"
    spec = importlib.util.spec_from_file_location("flux_pipeline_template", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- repositories -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def klein_repository(flux2_sources, flux2_export, tmp_path_factory):
    return write_repository(flux2_sources["tiny-klein"], flux2_export, tmp_path_factory.mktemp("triton") / "klein")


@pytest.fixture(scope="module")
def klein_base(flux2_sources, tmp_path_factory):
    """tiny-klein-base's own graphs (the same shapes as tiny-klein's, other weights) and its repository."""
    from fluxexport.export.onnx_export import export_model

    root = tmp_path_factory.mktemp("klein-base")
    started = time.perf_counter()
    export_model(flux2_sources["tiny-klein-base"], root / "onnx")
    print(f"\ntiny-klein-base export: {time.perf_counter() - started:.1f} s")
    return root / "onnx", write_repository(flux2_sources["tiny-klein-base"], root / "onnx", root / "repository")


def parse(folder: Path, spec=None):
    return check_config((folder / "config.pbtxt").read_text(), folder.name, spec)


def test_klein_repository_serves_the_flux2_components(flux2_sources, klein_repository):
    source = flux2_sources["tiny-klein"]
    specs = component_specs(source)
    assert sorted(p.name for p in klein_repository.iterdir() if p.is_dir()) == [
        "flux_pipeline", "text_encoder", "transformer", "vae_decoder", "vae_encoder"]  # fmt: skip
    for name in source.components:
        config = parse(klein_repository / name, specs[name])  # names, dtypes and dims are the spec's
        assert config.backend == "python" and config.max_batch_size == 0
        assert (klein_repository / name / "1" / "model.onnx").is_file()
        for values, tensors in ((config.input, specs[name].inputs), (config.output, specs[name].outputs)):
            assert [list(v.dims) for v in values] == [
                [d if isinstance(d, int) else -1 for d in t.dims] for t in tensors
            ]
    dims = {t.name: list(t.dims) for t in parse(klein_repository / "transformer").input}
    assert dims == {"hidden_states": [-1, -1, 128], "encoder_hidden_states": [-1, -1, 96], "timestep": [-1],
                    "img_ids": [-1, 4], "txt_ids": [-1, 4]}  # fmt: skip
    assert [list(t.dims) for t in parse(klein_repository / "vae_decoder").input] == [[-1, 128, -1, -1]]
    assert [t.name for t in parse(klein_repository / "text_encoder").input] == ["input_ids", "attention_mask"]

    pipeline = parse(klein_repository / "flux_pipeline")
    names = ["prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "seed",
             "num_images", "lora", "lora_scale", "cache", "image", *(f"image_{n}" for n in range(2, 11))]  # fmt: skip
    assert [t.name for t in pipeline.input] == names and list(REFERENCE_INPUTS) == names[11:]
    assert [t.optional for t in pipeline.input] == [False] + [True] * (len(names) - 1)
    assert all(list(t.dims) == [-1, -1, 3] for t in pipeline.input[11:])
    assert [(t.name, list(t.dims)) for t in pipeline.output] == [("images", [-1, -1, -1, 3])]

    checkpoint = klein_repository / "flux_pipeline" / "1" / "checkpoint"
    assert (checkpoint / "text_encoder" / "config.json").is_file() and (checkpoint / "tokenizer").is_dir()
    assert not (checkpoint / "tokenizer_2").exists() and not list(checkpoint.rglob("*.safetensors"))
    settings = json.loads((klein_repository / "flux_pipeline" / "1" / "pipeline.json").read_text())
    assert sorted(settings["components"]) == sorted(source.components) and settings["model"] == "tiny-klein"
    readme = (klein_repository / "README.md").read_text()
    assert "`image_2`" in readme and "refused: this distilled model" in readme


def test_flux2_repositories_refuse_loras_made_for_another_model(sources, flux2_sources, flux2_export, tmp_path):
    """FLUX.1 LoRAs offered per request to a FLUX.2 repository, read as FLUX.2 LoRAs are: a PEFT one names Linears
    tiny-klein lacks, a kohya one (CLIP keys too, which FLUX.2's conversion drops) has other shapes. Each is
    refused in one line before anything is written."""
    from helpers import write_kohya, write_peft

    from fluxexport.models.loaders import load_clip, load_transformer
    from fluxexport.models.lora import parse_lora

    transformer, clip = load_transformer(sources["tiny-dev"]), load_clip(sources["tiny-dev"])
    refusals = {
        write_peft(tmp_path / "watercolor.safetensors", transformer, clip):
            r"a LoRA adapts transformer layer '[^']+', which this model does not have as a Linear: "
            "it was made for another model",
        write_kohya(tmp_path / "ink.safetensors", transformer, clip, with_clip=True):
            r"a LoRA's transformer layer '[^']+' is \d+×\d+ \(rank 4\), the model's weight is \d+×\d+: "
            "it was made for another model",
    }  # fmt: skip
    for index, (path, message) in enumerate(refusals.items()):
        with pytest.raises(FluxExportError) as refused:
            write_repository(flux2_sources["tiny-klein"], flux2_export, tmp_path / f"r{index}",
                             request_loras=[parse_lora(str(path))])  # fmt: skip
        assert re.fullmatch(message, str(refused.value)), str(refused.value)
        assert not (tmp_path / f"r{index}").exists()


@pytest.fixture(scope="module")
def klein_server(pb_utils, klein_repository):
    server = InProcessServer(klein_repository)
    InferenceRequest.server = server
    yield server
    InferenceRequest.server = None


def test_in_process_pipeline_equals_run(flux2_sources, flux2_export, klein_server, reference_image):
    """Text only, one reference (the output takes its size), two references of different sizes and a batch: each
    answer is `run --backend onnxruntime`'s image on the same graphs."""
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    source = flux2_sources["tiny-klein"]
    backend = OnnxRuntimeBackend(source, flux2_export)
    second = reference_image.rotate(90, expand=True).resize((90, 130))
    cases = [
        (dict(height=144, width=272, num_inference_steps=2, seed=3), None),
        (dict(num_inference_steps=2, seed=1), [reference_image]),
        (dict(height=128, width=160, num_inference_steps=3, seed=1, guidance_scale=2.5), [reference_image, second]),
        (dict(height=64, width=96, num_inference_steps=2, seed=5, num_images=2), None),
    ]
    for settings, references in cases:
        images = dict(zip(REFERENCE_INPUTS, map(np.array, references or ()), strict=False))
        started = time.perf_counter()
        response = klein_server.infer("flux_pipeline", pipeline_request("a cat on the moon", **settings, **images))
        served_s = time.perf_counter() - started
        assert not response.has_error(), response.error().message()
        served = response.outputs["images"].as_numpy()
        request = dict(settings, num_images_per_prompt=settings.get("num_images", 1))
        request.pop("num_images", None)
        expected = generate(backend, source, GenerationRequest("a cat on the moon", image=references, **request))
        print(f"\n{len(references or ())} references, {served.shape}: served in-process in {served_s:.2f} s")
        assert served.shape == expected.images.shape and served.dtype == np.uint8
        assert np.array_equal(served, expected.images), psnr(served, expected.images)
    assert served.shape == (2, 64, 96, 3)


def test_flux2_dev_repository_serves_run_s_images(pb_utils, flux2_sources, flux2_dev_export, tmp_path, reference_image):
    """FLUX.2 [dev]: the transformer takes the guidance input and the pipeline's guidance scale reaches it; served
    images equal `run --backend onnxruntime`'s (its system message and Mistral tokenizer in the pipeline model)."""
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    source = flux2_sources["tiny-flux2-dev"]
    repository = write_repository(source, flux2_dev_export, tmp_path / "dev")
    assert [t.name for t in parse(repository / "transformer").input][-1] == "guidance"
    server, previous = InProcessServer(repository), InferenceRequest.server
    InferenceRequest.server = server
    try:
        backend = OnnxRuntimeBackend(source, flux2_dev_export)
        for settings, references in ((dict(height=128, width=96, num_inference_steps=2, seed=2, guidance_scale=2.5),
                                      None), (dict(num_inference_steps=2, seed=1), [reference_image])):  # fmt: skip
            images = dict(zip(REFERENCE_INPUTS, map(np.array, references or ()), strict=False))
            response = server.infer("flux_pipeline", pipeline_request("a cat on the moon", **settings, **images))
            assert not response.has_error(), response.error().message()
            expected = generate(backend, source, GenerationRequest("a cat on the moon", image=references, **settings))
            assert np.array_equal(response.outputs["images"].as_numpy(), expected.images)
    finally:
        InferenceRequest.server = previous


def test_step_caches_run_on_the_served_parts(pb_utils, flux2_sources, flux2_parts_export, tmp_path):
    """A repository written from an export with the transformer's parts takes `cache`: first-block and taylorseer
    answers equal `run --cache` on ONNX Runtime with the same graphs; FLUX.1-dev's magcache ratios are refused."""
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.runtime.cache import parse_cache

    source = flux2_sources["tiny-klein"]
    repository = write_repository(source, flux2_parts_export, tmp_path / "klein-parts")
    assert {"transformer_head", "transformer_tail", "transformer_out"} <= {p.name for p in repository.iterdir()}
    server, previous = InProcessServer(repository), InferenceRequest.server
    InferenceRequest.server = server
    try:
        backend = OnnxRuntimeBackend(source, flux2_parts_export)
        request = GenerationRequest("a cat on the moon", height=128, width=96, num_inference_steps=8, seed=2)
        plain = generate(backend, source, request).images
        for cache in ("first-block:threshold=0.5", "taylorseer:interval=3,warmup=2"):
            settings = dict(height=128, width=96, num_inference_steps=8, seed=2, cache=cache)
            response = server.infer("flux_pipeline", pipeline_request("a cat on the moon", **settings))
            assert not response.has_error(), response.error().message()
            served = response.outputs["images"].as_numpy()
            expected = generate(backend, source, request, cache=parse_cache(cache))
            assert expected.computed_steps < 8, cache  # the cache skipped steps
            assert np.array_equal(served, expected.images) and not np.array_equal(served, plain), cache
        response = server.infer("flux_pipeline", pipeline_request("a cat", cache="magcache:ratios=flux-dev"))
        assert response.error().code() == TritonError.INVALID_ARG
        assert response.error().message().startswith("magcache ratios=flux-dev are FLUX.1-dev's, not tiny-klein's")
    finally:
        InferenceRequest.server = previous


def test_in_process_refusals_are_one_line_invalid_arguments(klein_server, reference_image):
    picture = np.array(reference_image)
    cases = [
        (dict(negative_prompt="blurry"),
         "tiny-klein runs without true CFG (a distilled or guidance-embedded model): drop the negative_prompt input"),
        (dict(image_2=picture), "image_2 was given without image: number reference images from image up"),
        (dict(image=picture, image_3=picture), "image_3 was given without image_2: number reference images from image up"),
        (dict(image=np.array(reference_image.resize((300, 40)))),
         "reference image 1 is 300×40: both sides must be at least 64 px"),
        (dict(height=250, width=256), "height 250 is not a multiple of 16: use 240 or 256"),
    ]  # fmt: skip
    for values, message in cases:
        response = klein_server.infer("flux_pipeline", pipeline_request("a cat", num_inference_steps=1, **values))
        assert response.has_error() and response.error().message() == message
        assert response.error().code() == TritonError.INVALID_ARG and "--" not in message


# past the export's reference budget (tiny-klein's defaults: one 1 MP reference at up to 2:1 beside ≤ 1024 px)
BUDGET = "(1 reference of up to 1048576 px at up to 2:1 beside targets up to 1024 px)"
PAST_BUDGET = [
    ((1024, 1024), 2, "2 reference images beside a 128×128 target need 8256 transformer tokens, past the 8192 this "
                      f"deployment serves {BUDGET}: send fewer or smaller references, or serve graphs exported using "
                      "--max-references 2"),
    ((3000, 1000), 1, "reference image 1 is encoded at 1760×576: its 1760 px side is past the 1440 px this deployment "
                      f"serves {BUDGET}: send fewer or smaller references, or serve graphs exported using "
                      "--max-reference-aspect 2.96"),
]  # fmt: skip


def test_in_process_refuses_references_past_the_budget(klein_server, reference_image, monkeypatch):
    """References past the repository's budget: INVALID_ARG in one line naming the option that serves them,
    before the pipeline asks any component for anything."""
    asked = []
    exec_ = InferenceRequest.exec
    monkeypatch.setattr(InferenceRequest, "exec", lambda request: asked.append(request.model_name) or exec_(request))
    for size, count, message in PAST_BUDGET:
        images = dict(zip(REFERENCE_INPUTS, [np.array(reference_image.resize(size))] * count, strict=False))
        request = pipeline_request("a cat", height=128, width=128, num_inference_steps=1, **images)
        response = klein_server.infer("flux_pipeline", request)
        assert response.has_error() and response.error().message() == message
        assert response.error().code() == TritonError.INVALID_ARG and asked == []


def test_repositories_recorded_before_the_budget_serve_what_they_were_made_for(
    template, flux2_sources, klein_repository, reference_image
):
    """pipeline.json written by `write_repository`, its bounds cut to the sides and batch older versions recorded:
    a repository of engines serves one 1 MP reference at 1:1 (what such engines were built for), one of graphs
    today's defaults (2:1); today's repository records every bound of its export."""
    from fluxexport.artifacts.repository import PipelineSettings
    from fluxexport.runtime.pipeline import resolve_request
    from fluxexport.specs import ExportBounds

    source = flux2_sources["tiny-klein"]
    settings = PipelineSettings.read(klein_repository / "flux_pipeline" / "1")
    assert settings.bounds == vars(ExportBounds.for_model(source)) == vars(template.served_bounds(settings))
    older = {key: settings.bounds[key] for key in ("min_resolution", "max_resolution", "max_batch")}
    wide = resolve_request(source, GenerationRequest("a cat", image=reference_image.resize((1448, 724)),
                                                     height=128, width=128))  # fmt: skip
    graphs = PipelineSettings.from_json(settings.to_json() | {"bounds": older})
    budget = ("max_references", "max_reference_area", "max_reference_aspect", "max_resolution")
    assert [getattr(template.served_bounds(graphs), key) for key in budget] == [1, 1024 * 1024, 2.0, 1024]
    template.check_deployment_serves(source, graphs, wide)  # 1440×720 within 2:1
    engines = PipelineSettings.from_json(settings.to_json() | {"bounds": older, "kind": "tensorrt"})
    assert template.served_bounds(engines).max_reference_aspect == 1.0
    with pytest.raises(FluxExportError) as refused:
        template.check_deployment_serves(source, engines, wide)
    assert str(refused.value) == (
        "reference image 1 is encoded at 1440×720: its 1440 px side is past the 1024 px this deployment serves "
        "(1 reference of up to 1048576 px at up to 1:1 beside targets up to 1024 px): send fewer or smaller "
        "references, or serve engines built using --max-reference-aspect 1.98"
    )


@pytest.mark.slow  # exports tiny-klein-base (its fixture is not one conftest marks)
def test_negative_prompt_on_the_base_model_equals_run(flux2_sources, klein_base, pb_utils):
    """tiny-klein-base runs true CFG: the served negative prompt is the unconditional branch `run` draws."""
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    graphs, repository = klein_base
    source = flux2_sources["tiny-klein-base"]
    assert "`negative_prompt` (BYTES [1], the true-CFG branch" in (repository / "README.md").read_text()
    server = InProcessServer(repository)
    InferenceRequest.server = server
    try:
        backend = OnnxRuntimeBackend(source, graphs)
        results = {}
        for negative in (None, "blurry, low quality"):
            settings = dict(height=64, width=96, num_inference_steps=2, seed=2, guidance_scale=4.0)
            response = server.infer("flux_pipeline", pipeline_request("a cat", negative_prompt=negative, **settings))
            assert not response.has_error(), response.error().message()
            served = response.outputs["images"].as_numpy()
            expected = generate(backend, source, GenerationRequest("a cat", negative_prompt=negative, **settings))
            assert np.array_equal(served, expected.images), psnr(served, expected.images)
            results[negative] = served
        assert not np.array_equal(results[None], results["blurry, low quality"])
    finally:
        InferenceRequest.server = None


def test_client_numbers_several_references():
    import tritonclient.http as http

    from fluxexport.triton.client import pipeline_inputs

    first, second = np.zeros((64, 96, 3), np.uint8), np.ones((80, 64, 3), np.uint8)
    inputs = pipeline_inputs(http, "a cat", negative_prompt="blurry", image=[first, second], seed=2)
    assert [(i.name(), i.datatype(), i.shape()) for i in inputs] == [
        ("prompt", "BYTES", [1]), ("negative_prompt", "BYTES", [1]), ("seed", "INT64", [1]),
        ("image", "UINT8", [64, 96, 3]), ("image_2", "UINT8", [80, 64, 3])]  # fmt: skip
    assert [i.name() for i in pipeline_inputs(http, "a fox", image=first)] == ["prompt", "image"]  # Kontext's way
    with pytest.raises(ValueError, match="^flux_pipeline takes at most 10 reference images, got 11$"):
        pipeline_inputs(http, "a cat", image=[first] * 11)


def test_flux1_pipeline_config_is_unchanged(sources):
    """FLUX.1 (Kontext or not) keeps its inputs: one `image`, no negative prompt."""
    schnell, kontext = sources["tiny-schnell"], sources["tiny-kontext"]
    names = ["prompt", "prompt_2", "height", "width", "num_inference_steps", "guidance_scale", "seed", "num_images",
             "lora", "lora_scale", "cache"]  # fmt: skip
    flux1 = FLUX1.part("triton")
    assert [t.name for t in pipeline_config(flux1.pipeline_inputs(schnell), "KIND_CPU").inputs] == names
    assert [t.name for t in pipeline_config(flux1.pipeline_inputs(kontext), "KIND_CPU").inputs] == [*names, "image"]


# ---- the cache input never names a file outside the repository -------------------------------------------------


def test_magcache_ratios_stay_inside_the_repository(template, tmp_path):
    """A client's `ratios=` reads `flux-dev` or a .json file inside the repository; a path anywhere else (absolute,
    `..`, a symlink out, not .json) is refused in one line before anything is read, even a valid ratios file."""
    repository, outside = tmp_path / "repository", tmp_path / "secret"
    (repository / "flux_pipeline" / "1" / "magcache").mkdir(parents=True)
    outside.mkdir()
    ratios = {"ratios": [1.0, 0.98, 0.95, 0.9]}
    (outside / "ratios.json").write_text(json.dumps(ratios))  # readable and valid: only the place is wrong
    (repository / "flux_pipeline" / "1" / "magcache" / "mine.json").write_text(json.dumps(ratios))
    (repository / "flux_pipeline" / "1" / "magcache" / "out.json").symlink_to(outside / "ratios.json")
    (repository / "notes.txt").write_text(json.dumps(ratios))

    inside = template.served_cache("magcache:ratios=flux_pipeline/1/magcache/mine.json,threshold=0.1", repository)
    assert inside.mag_ratios == tuple(ratios["ratios"]) and inside.knobs["threshold"] == 0.1
    assert template.served_cache("magcache: threshold=0.1, ratios=flux-dev", repository).knobs["ratios"] == "flux-dev"
    assert template.served_cache("taylorseer:interval=3", repository).name == "taylorseer"
    assert template.served_cache(None, repository).name == "none"

    refused = "cache ratios must be flux-dev or a .json file in this model repository, named relative to it " \
              "(flux_pipeline/1/magcache/NAME.json), got "  # fmt: skip
    for value in (str(outside / "ratios.json"), "../secret/ratios.json", "flux_pipeline/1/magcache/out.json",
                  "notes.txt", "/etc/passwd"):  # fmt: skip
        with pytest.raises(FluxExportError) as error:
            template.served_cache(f"magcache:ratios={value}", repository)
        assert str(error.value) == f"{refused}{value!r}"
    with pytest.raises(FluxExportError, match="^cache ratios file other.json is not in this model repository$"):
        template.served_cache("magcache:ratios=other.json", repository)
    with pytest.raises(FluxExportError, match="^'ratios=' is not key=value"):
        template.served_cache("magcache:ratios=", repository)
    with pytest.raises(FluxExportError) as error:
        template.served_cache("magcache:ratios=/etc/passwd", repository)
    message = error.value.render(template.TRITON_TERMS)
    assert message == f"{refused}'/etc/passwd'"  # the response's one line, unchanged by the request wording


# ---- a real server, once ------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not has_tritonserver(),
    reason="no tritonserver binary: pip install --no-deps nvidia-pytriton (scripts/setup_triton_env.sh)",
)
def test_real_server_serves_klein_with_two_references(flux2_sources, flux2_export, klein_repository, reference_image):
    """HTTP with two references of different sizes gives `run`'s image; a negative prompt to the distilled
    model, and references past the export's budget, are each a 400 in one line."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.triton.client import pipeline_inputs
    from fluxexport.triton.server import TritonServer

    source = flux2_sources["tiny-klein"]
    second = reference_image.rotate(90, expand=True).resize((90, 130))
    started = time.perf_counter()
    with TritonServer(klein_repository) as server:
        print(f"\ntiny-klein: tritonserver ready in {time.perf_counter() - started:.1f} s")
        client = http.InferenceServerClient(server.http_url)
        inputs = pipeline_inputs(http, "a cat", height=128, width=160, num_inference_steps=3, seed=1,
                                 image=[np.array(reference_image), np.array(second)])  # fmt: skip
        started = time.perf_counter()
        served = client.infer("flux_pipeline", inputs).as_numpy("images")
        print(f"two references over HTTP: {time.perf_counter() - started:.2f} s")
        with pytest.raises(InferenceServerException) as refused:
            client.infer("flux_pipeline", pipeline_inputs(http, "a cat", negative_prompt="blurry"))
        assert str(refused.value.status()) == "400"
        assert refused.value.message().endswith("drop the negative_prompt input")
        size, count, message = PAST_BUDGET[0]  # two 1 MP references: past the export's reference budget
        with pytest.raises(InferenceServerException) as refused:
            client.infer("flux_pipeline", pipeline_inputs(http, "a cat", height=128, width=128, num_inference_steps=1,
                                                          image=[np.array(reference_image.resize(size))] * count))  # fmt: skip
        assert str(refused.value.status()) == "400" and refused.value.message() == message
        assert server.process.poll() is None
    request = GenerationRequest("a cat", image=[reference_image, second], height=128, width=160,
                                num_inference_steps=3, seed=1)  # fmt: skip
    expected = generate(OnnxRuntimeBackend(source, flux2_export), source, request).images
    assert served.shape == expected.shape == (1, 128, 160, 3)
    assert psnr(served, expected) >= 50


# ---- per-request LoRAs --------------------------------------------------------------------------------------------


KLEIN_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")  # the Linears a FLUX.2 LoRA adapts here


def _klein_lora(path: Path, source, seed: int, alpha: float | None = None) -> Path:
    """A random PEFT-named LoRA (rank 4) on every Linear of tiny-klein's blocks, B·A as large as W (a LoRA this
    strong changes the image of tiny-klein's two steps visibly: ~43 dB at scale 0.7 with alpha 8); with `alpha`,
    saved with the PEFT metadata diffusers writes (`lora_alpha`: scale alpha / rank)."""
    import torch
    from safetensors.torch import save_file

    from fluxexport.models.loaders import load_transformer

    generator, state = torch.Generator().manual_seed(seed), {}
    for name, module in load_transformer(source).named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(KLEIN_BLOCKS):
            down = torch.randn(4, module.in_features, generator=generator)
            up = torch.randn(module.out_features, 4, generator=generator)
            up *= module.weight.detach().norm() / (up @ down).norm()
            state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = down, up
    targets = sorted(key.removeprefix("transformer.").split(".lora_")[0] for key in state if ".lora_A." in key)
    config = {"transformer.r": 4, "transformer.lora_alpha": alpha, "transformer.target_modules": targets}
    metadata = None if alpha is None else {"lora_adapter_metadata": json.dumps(config)}
    save_file(state, str(path), metadata=metadata)
    return path


def lora_request(prompt: str, lora: list[str] | None = None, lora_scale: list[float] | None = None, **values):
    """pipeline_request's inputs plus `lora` (BYTES [n]) and `lora_scale` (FP32 [n]) as a client sends them."""
    tensors = pipeline_request(prompt, **values)
    if lora is not None:
        tensors.append(Tensor("lora", np.array([name.encode() for name in lora], dtype=object)))
    if lora_scale is not None:
        tensors.append(Tensor("lora_scale", np.asarray(lora_scale, dtype=np.float32)))
    return tensors


@pytest.fixture(scope="module")
def klein_loras(flux2_sources, tmp_path_factory):
    """Two FLUX.2 LoRAs for tiny-klein: `ink` with the metadata's alpha (8 / rank 4), `sketch` without."""
    from fluxexport.models.lora import parse_lora

    folder, source = tmp_path_factory.mktemp("klein-loras"), flux2_sources["tiny-klein"]
    ink = _klein_lora(folder / "ink.safetensors", source, seed=0, alpha=8.0)
    sketch = _klein_lora(folder / "sketch.safetensors", source, seed=1)
    return {"ink": parse_lora(str(ink)), "sketch": parse_lora(str(sketch))}


def test_flux2_request_loras_are_placed_for_the_transformer(
    flux2_sources, flux2_export, klein_loras, klein_repository, tmp_path
):
    """The LoRAs are copied into flux_pipeline/1/loras and recorded with the one module FLUX.2 LoRAs adapt; only
    the transformer component swaps them, reading them as FLUX.2 LoRAs; the README names them."""
    repository = write_repository(flux2_sources["tiny-klein"], flux2_export, tmp_path / "r",
                                  request_loras=list(klein_loras.values()))  # fmt: skip
    assert sorted(p.name for p in (repository / "flux_pipeline" / "1" / "loras").iterdir()) == [
        "ink.safetensors", "sketch.safetensors"]  # fmt: skip
    settings = json.loads((repository / "flux_pipeline" / "1" / "pipeline.json").read_text())
    assert settings["loras"] == {
        name: {"file": f"{name}.safetensors", "sha256": lora.sha256, "modules": ["transformer"]}
        for name, lora in klein_loras.items()
    }
    component = json.loads((repository / "transformer" / "1" / "component.json").read_text())
    assert (component["lora_folder"], component["lora_module"], component["lora_family"]) == (
        "flux_pipeline/1/loras", "transformer", "flux2")  # fmt: skip
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):
        assert "lora_folder" not in json.loads((repository / name / "1" / "component.json").read_text())
    readme = (repository / "README.md").read_text()
    assert "`flux_pipeline/1/loras`: ink, sketch), `lora_scale` (FP32 [n] or [1])" in readme
    assert "swapped into the transformer component (FLUX.2 LoRAs adapt only it)" in readme
    assert "LoRAs in `flux_pipeline/1/loras`: none placed" in (klein_repository / "README.md").read_text()


def test_flux2_request_loras_equal_the_swapped_backend(flux2_sources, flux2_export, klein_loras, pb_utils, tmp_path):
    """`lora`/`lora_scale` swap FLUX.2 LoRAs into the served transformer: each answer is, bit for bit, the image of
    ONNX Runtime's LoRA-swapped backend on the same graphs (the same merged initializers, from the graph's own
    base weights there, from the checkpoint here); a request without LoRAs gets the base model back; an unknown
    name is refused in one line naming the LoRAs there are."""
    from fluxexport.models.lora import parse_lora
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    source = flux2_sources["tiny-klein"]
    repository = write_repository(source, flux2_export, tmp_path / "r", request_loras=list(klein_loras.values()))
    settings = dict(height=128, width=192, num_inference_steps=2, seed=4)
    ink, sketch = str(klein_loras["ink"].path), str(klein_loras["sketch"].path)

    def swapped_image(*values):
        loras = source.with_loras([parse_lora(value) for value in values])
        with OnnxRuntimeBackend(loras, flux2_export) as backend:
            assert (backend.swapped is not None) == bool(values)
            return generate(backend, loras, GenerationRequest("a cat", **settings)).images

    server = InProcessServer(repository)
    previous, InferenceRequest.server = InferenceRequest.server, server
    try:

        def served_image(lora=None, lora_scale=None):
            response = server.infer("flux_pipeline", lora_request("a cat", lora, lora_scale, **settings))
            assert not response.has_error(), response.error().message()
            return response.outputs["images"].as_numpy()

        started = time.perf_counter()
        plain = served_image()
        assert np.array_equal(plain, swapped_image()), psnr(plain, swapped_image())
        with_ink = served_image(["ink"], [0.7])
        print(f"\nbase image, then with ink (one swap) served in-process: {time.perf_counter() - started:.2f} s")
        expected = swapped_image(f"{ink}:0.7")
        assert np.array_equal(with_ink, expected), psnr(with_ink, expected)
        assert psnr(with_ink, plain) < 50  # the LoRA changed the image
        both = served_image(["sketch", "ink"], [0.5])
        expected = swapped_image(f"{sketch}:0.5", f"{ink}:0.5")
        assert np.array_equal(both, expected), psnr(both, expected)
        assert not np.array_equal(both, with_ink)
        assert np.array_equal(served_image(), plain)  # back to the base weights: the swap is undone
        assert np.array_equal(served_image(["ink"], [0.7]), with_ink)
        for lora, lora_scale, message in (
            (["watercolor"], None, "lora 'watercolor' is not in this repository; it has: ink, sketch"),
            (["ink", "sketch"], [0.5, 0.5, 0.5], "lora_scale holds 3 values for 2 LoRAs: give one, or one each"),
            (None, [0.5], "lora_scale was given without a lora input: name the LoRAs to apply"),
        ):
            response = server.infer("flux_pipeline", lora_request("a cat", lora, lora_scale, num_inference_steps=1))
            assert response.has_error() and response.error().message() == message
            assert response.error().code() == TritonError.INVALID_ARG
        assert np.array_equal(served_image(["ink"], [0.7]), with_ink)  # refused requests left the set alone
    finally:
        InferenceRequest.server = previous


def test_flux2_request_loras_are_refused_for_tensorrt_plans(flux2_sources, flux2_export, klein_loras, tmp_path):
    """TensorRT plans take LoRAs by refit, FLUX.2's as FLUX.1's: refused in one line, nothing written."""
    from helpers import build_folder

    source = flux2_sources["tiny-klein"]
    engines = build_folder(source, flux2_export, tmp_path / "engines")
    with pytest.raises(FluxExportError) as refused:
        write_repository(source, engines, tmp_path / "r", request_loras=[klein_loras["ink"]])
    assert str(refused.value) == (
        "per-request LoRAs are swapped by the ONNX Runtime components; TensorRT plans take LoRAs by refit: "
        "fluxexport refit --model tiny-klein --engines DIR --lora FILE, then write the repository from the refitted "
        "engines"
    )
    assert not (tmp_path / "r").exists()
