"""FLUX.1 Redux (image variation through a SigLIP image encoder) in front of FLUX.1: the tiny-redux prior that
diffusers' FluxPriorReduxPipeline loads, our PyTorch backend equal to FluxPriorReduxPipeline + FluxPipeline byte for
byte (with and without a prompt, several images, several images per prompt, odd sizes), its requests refused in one
line, and the prior's two graphs (`export --redux`) in ONNX Runtime within 40 dB of PyTorch, checked for TensorRT."""

import numpy as np
import pytest
import torch
from helpers import cli_invoke, cli_refusal, diffusers_images
from PIL import Image

from fluxexport.compare import psnr
from fluxexport.errors import RequestError
from fluxexport.runtime.pipeline import GenerationRequest, generate, resolve_request
from fluxexport.runtime.redux import ReduxRequest, redux_conditioning

HEIGHT, WIDTH, STEPS, SEED = 48, 80, 2, 3  # odd sizes: not multiples of 32


@pytest.fixture(scope="module")
def redux(cache_root):
    from fluxexport.models.redux import resolve_redux

    return resolve_redux("tiny-redux")


@pytest.fixture(scope="module")
def dev(cache_root):
    from fluxexport.models.source import resolve_model

    return resolve_model("tiny-dev")


@pytest.fixture(scope="module")
def backends(redux, dev):
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.pytorch.redux import TorchReduxBackend

    return TorchReduxBackend(redux, device="cpu"), TorchBackend(dev, device="cpu")


@pytest.fixture(scope="module")
def flux_pipeline(dev):
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(dev.root)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def images(reference_image):
    return reference_image, reference_image.rotate(90, expand=True)  # 200×300 and 300×200: both resized to 32²


def ours(backends, dev, redux, request: ReduxRequest, count: int) -> np.ndarray:
    prior, base = backends
    conditioning = redux_conditioning(prior, base, dev, redux, request)
    return generate(
        base, dev, GenerationRequest(
            None, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, seed=SEED, num_images_per_prompt=count,
            prompt_embeds=conditioning.prompt_embeds, pooled_prompt_embeds=conditioning.pooled_prompt_embeds,
        ),
    ).images  # fmt: skip


def theirs(pipeline, prompt_embeds, pooled_prompt_embeds, count: int) -> np.ndarray:
    return diffusers_images(
        pipeline, None, HEIGHT, WIDTH, STEPS, SEED, count, prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
    )  # fmt: skip


def diffusers_prior_without_a_prompt(redux, dev, images) -> tuple[torch.Tensor, torch.Tensor]:
    """FluxPriorReduxPipeline's output for `images` without text encoders: its image embeddings after 512 zero text
    tokens, summed over the images, and a zero pooled embedding (at the tiny base's widths: diffusers makes its
    zeros FLUX.1's 4096/768 wide)."""
    from diffusers import FluxPriorReduxPipeline

    prior = FluxPriorReduxPipeline.from_pretrained(redux.root)
    with torch.no_grad():
        embeds = prior.image_embedder(prior.encode_image(list(images), "cpu", 1)).image_embeds
    width, pooled_width = dev.transformer["joint_attention_dim"], dev.transformer["pooled_projection_dim"]
    prompt_embeds = torch.cat([torch.zeros(len(images), 512, width), embeds], dim=1).sum(dim=0, keepdim=True)
    return prompt_embeds, torch.zeros(1, pooled_width)


def test_tiny_redux_is_a_redux_prior_diffusers_loads(redux, dev):
    from diffusers import FluxPriorReduxPipeline
    from transformers import SiglipVisionModel

    prior = FluxPriorReduxPipeline.from_pretrained(redux.root)
    assert isinstance(prior.image_encoder, SiglipVisionModel) and prior.text_encoder is None
    # read through SiglipVisionConfig and ReduxImageEncoder: 32² images in 8² patches, projected to the base's width
    assert (redux.image_size, redux.image_tokens) == (32, 16)
    assert redux.image_embedder["redux_dim"] == redux.image_encoder["hidden_size"] == 16
    assert redux.text_width == dev.transformer["joint_attention_dim"] == prior.image_embedder.config.txt_in_features
    assert redux.feature_extractor.size == {"height": 32, "width": 32}


def test_torch_equals_diffusers_without_a_prompt(backends, dev, redux, flux_pipeline, images):
    """BFL's folder has no text encoders: diffusers' prior then puts zeros of 512 tokens before the image tokens (its
    zeros are FLUX.1's 4096/768 wide, so for the 32-wide tiny base they are made at its widths here); two images are
    summed into one conditioning."""
    prompt_embeds, pooled = diffusers_prior_without_a_prompt(redux, dev, images)
    got = ours(backends, dev, redux, ReduxRequest(images), 1)
    assert got.shape == (1, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(got, theirs(flux_pipeline, prompt_embeds, pooled, 1))


def test_torch_equals_diffusers_with_a_prompt_and_scales(backends, dev, redux, flux_pipeline, images):
    """diffusers' prior with the base's text encoders (its experimental prompt): the prompt once per image, T5 at
    512 tokens, each image's pair weighted by its own scales, then summed."""
    from diffusers import FluxPriorReduxPipeline

    pipe = flux_pipeline
    prior = FluxPriorReduxPipeline.from_pretrained(
        redux.root, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
        tokenizer_2=pipe.tokenizer_2,
    )  # fmt: skip
    scales, pooled_scales = [1.0, 0.5], [0.8, 0.3]
    output = prior(list(images), prompt="a cat", prompt_embeds_scale=scales, pooled_prompt_embeds_scale=pooled_scales)
    request = ReduxRequest(images, "a cat", None, tuple(scales), tuple(pooled_scales))
    got = ours(backends, dev, redux, request, 2)
    # FluxPipeline does not repeat given embeddings per image: its transformer broadcasts the batch-1 text in its
    # first modulation, whose matmuls then round a few pixels otherwise (1 LSB); the engines take the text per image,
    # as diffusers gives them when it encodes a prompt itself; repeated so, diffusers' images are ours byte for byte
    repeated = theirs(pipe, output.prompt_embeds.repeat(2, 1, 1), output.pooled_prompt_embeds.repeat(2, 1), 1)
    np.testing.assert_array_equal(got, repeated)
    broadcast = theirs(pipe, output.prompt_embeds, output.pooled_prompt_embeds, 2)
    assert np.abs(got.astype(int) - broadcast).max() <= 1 and psnr(got, broadcast) >= 50


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--model", "tiny-dev", "--redux", "tiny-redux"), "tiny-redux is a FLUX.1 Redux prior: it makes variations "
         "of an image, got none: pass one or more with --image"),
        (("--model", "tiny-fill", "--redux", "tiny-redux", "--image", "{image}"), "tiny-redux is a FLUX.1 Redux "
         "prior; it feeds FluxPipeline models (FLUX.1 [dev], [schnell]), not tiny-fill (a FluxFillPipeline): run it "
         "in front of FLUX.1-dev or schnell, or drop --redux"),
        (("--model", "tiny-klein", "--redux", "tiny-redux", "--image", "{image}"), "not tiny-klein (a "
         "Flux2KleinPipeline)"),
        (("--model", "tiny-dev", "--redux", "tiny-dev", "--image", "{image}"), "--redux tiny-dev: that is a model "
         "to run with --model, not a Redux prior; pass tiny-redux or a FLUX.1 Redux folder"),
        (("--model", "tiny-dev", "--redux", "{dev}", "--image", "{image}"), "its model_index.json names "
         "'FluxPipeline', not FluxPriorReduxPipeline; pass a FLUX.1 Redux folder"),
        (("--model", "tiny-dev", "--redux", "tiny-redux", "--image", "{image}", "--redux-scale", "1",
          "--redux-scale", "2"), "--redux-scale gives 2 weights for 1 image: give one, or one per image"),
        (("--model", "tiny-dev", "--redux", "tiny-redux", "--image", "{image}", "--prompt", " "), "prompt is empty: "
         "drop it (Redux runs without one) or pass text"),
        (("--model", "tiny-redux", "--prompt", "a cat"), "tiny-redux is a FLUX.1 Redux prior (FluxPriorReduxPipeline), "
         "not a model: run FLUX.1 [dev] or [schnell] with --redux tiny-redux --image PICTURE"),
        (("--model", "tiny-dev", "--redux", "tiny-redux", "--image", "{image}", "--prompt-2", "a cat"), "--prompt-2 is "
         "T5's text beside a prompt, and there is none: give a prompt too or drop --prompt-2"),
        (("--model", "tiny-dev", "--redux", "tiny-redux", "--image", "{image}", "--keep-reference-size"),
         "Error: --keep-reference-size is for FLUX.1 Kontext references, but tiny-redux resizes its images to "
         "32×32 (its SigLIP processor's one size): drop --keep-reference-size"),
    ],
)  # fmt: skip
def test_redux_refusals_in_one_line(args, message, dev, redux, reference_image, tmp_path):
    image = tmp_path / "ref.png"
    reference_image.save(image)
    args = [arg.format(image=image, dev=dev.root) for arg in args]
    line = cli_refusal("run", *args, "--output", tmp_path / "out.png")
    assert message in line, line
    assert not list(tmp_path.glob("out*.png"))


def test_run_without_a_prompt_needs_redux():
    result = cli_invoke("run", "--model", "tiny-dev")
    assert (
        result.exit_code == 2 and "Missing option '--prompt' (only a --redux prior runs without one)" in result.output
    )


def test_prompt_embeddings_are_checked(dev, cache_root):
    from fluxexport.models.source import resolve_model

    embeds, pooled = torch.zeros(1, 20, 32), torch.zeros(1, 32)
    resolved = resolve_request(dev, GenerationRequest(None, prompt_embeds=embeds, pooled_prompt_embeds=pooled))
    assert resolved.prompts == [""] and resolved.prompt_embeds.shape == (1, 20, 32)
    refusals = [
        (dev, dict(prompt="a cat", prompt_embeds=embeds, pooled_prompt_embeds=pooled),
         "a prompt and prompt embeddings were both given: give one of the two"),
        (dev, dict(prompt=None, prompt_embeds=embeds), "pooled_prompt_embeds is missing"),
        (dev, dict(prompt=None, prompt_embeds=torch.zeros(1, 20, 48), pooled_prompt_embeds=pooled),
         "text embeddings are 48 and 32 wide but tiny-dev takes 32 and 32"),
        (resolve_model("tiny-klein"), dict(prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled),
         "tiny-klein's transformer takes no pooled text embedding (a Flux2KleinPipeline): pass a prompt instead"),
    ]  # fmt: skip
    for source, fields, message in refusals:
        with pytest.raises(RequestError, match=None) as raised:
            resolve_request(source, GenerationRequest(**fields))
        assert message in str(raised.value), str(raised.value)


def test_cli_run_writes_the_variations(dev, redux, backends, reference_image, tmp_path):
    """`run --redux --image` (no prompt) writes the images `generate` gives on the prior's conditioning."""
    image = tmp_path / "ref.png"
    reference_image.save(image)
    result = cli_invoke(
        "run", "--model", "tiny-dev", "--redux", "tiny-redux", "--image", image, "--height", HEIGHT, "--width", WIDTH,
        "--steps", STEPS, "--seed", SEED, "--output", tmp_path / "out.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "redux prior" in result.output  # its own row in the stage timings, before the text encoders'
    expected = ours(backends, dev, redux, ReduxRequest((reference_image,)), 1)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), expected)


def run_redux(tmp_path, reference_image, steps: int, **fields):
    """`run --redux tiny-redux --image PICTURE` over tiny-dev through the command's library call (`run_images`),
    with `fields` (a prompt, --lora, --cache …) added."""
    from fluxexport.commands.common import BackendOptions, ModelOptions
    from fluxexport.commands.run import RunOptions, run_images

    image = tmp_path / "ref.png"
    reference_image.save(image)
    options = RunOptions(
        fields.pop("prompt", None), model=ModelOptions("tiny-dev", loras=fields.pop("loras", ())),
        runner=BackendOptions(device="cpu"), height=HEIGHT, width=WIDTH, steps=steps, seed=SEED, references=(image,),
        redux="tiny-redux", output=tmp_path / "out.png", **fields,
    )  # fmt: skip
    return run_images(options).generation


def test_run_redux_with_a_lora_equals_diffusers_fused(dev, redux, backends, reference_image, tmp_path):
    """`run --redux --lora` (a kohya LoRA of tiny-lora's writer, on the transformer and CLIP's first attention) with
    a prompt: the base and the prompt's encoders merged, the prior's text through the merged CLIP, as diffusers'
    FluxPipeline after `load_lora_weights` + `fuse_lora` whose encoders FluxPriorReduxPipeline borrows."""
    from diffusers import FluxPipeline, FluxPriorReduxPipeline

    from fluxexport.models.lora import parse_lora
    from fluxexport.models.tiny_lora import write_tiny_lora

    path = write_tiny_lora(dev, tmp_path / "kohya.safetensors", "kohya")
    got = run_redux(tmp_path, reference_image, STEPS, prompt="a cat", loras=(parse_lora(f"{path}:0.8"),)).images
    pipe = FluxPipeline.from_pretrained(dev.root)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    assert any(name.endswith("q_proj.lora_A") for name, _ in pipe.text_encoder.named_modules())  # CLIP's too
    prior = FluxPriorReduxPipeline.from_pretrained(
        redux.root, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
        tokenizer_2=pipe.tokenizer_2,
    )  # fmt: skip
    output = prior([reference_image], prompt="a cat")
    expected = theirs(pipe, output.prompt_embeds, output.pooled_prompt_embeds, 1)
    assert psnr(got, expected) >= 50, psnr(got, expected)
    plain = ours(backends, dev, redux, ReduxRequest((reference_image,), "a cat"), 1)
    assert psnr(got, plain) < 45  # the LoRA changed the image


def test_run_redux_with_a_step_cache_equals_diffusers_hook(dev, redux, flux_pipeline, reference_image, tmp_path):
    """`run --redux --cache first-block`: the cache decides on the prior's conditioning as diffusers' First Block
    Cache hook does in FluxPipeline given FluxPriorReduxPipeline's embeddings: the same steps computed (counted on
    the first single block, which a skipped step never reaches), the same image bit for bit."""
    from diffusers import FirstBlockCacheConfig

    steps, threshold = 8, 0.4
    got = run_redux(tmp_path, reference_image, steps, cache=f"first-block:threshold={threshold}")
    prompt_embeds, pooled = diffusers_prior_without_a_prompt(redux, dev, [reference_image])
    transformer = flux_pipeline.transformer
    counted, calls = transformer.get_submodule("single_transformer_blocks.0.attn"), [0]
    hook = counted.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        expected = diffusers_images(
            flux_pipeline, None, HEIGHT, WIDTH, steps, SEED, 1, prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
        )  # fmt: skip
    finally:
        transformer.disable_cache()
        hook.remove()
    assert got.computed_steps == calls[0] < steps
    np.testing.assert_array_equal(got.images, expected)


def test_bench_times_the_redux_prior(dev, redux, backends, tmp_path):
    """`bench --redux`: bench's own picture through the prior before each generation, the prior's stage a row
    before the pipeline's, counted in the total, the transformer's arithmetic at the prior's 512 + 16 text tokens;
    the request the base then takes is the prior's conditioning of that picture; refusals in one line."""
    import json

    from fluxexport.benchmark import transformer_flop_per_step
    from fluxexport.commands.bench import BenchOptions, check_prior, prior_stage
    from fluxexport.commands.common import ModelOptions
    from fluxexport.runtime.redux import sample_redux_image

    report = tmp_path / "bench.json"
    args = ("--model", "tiny-dev", "--height", HEIGHT, "--width", WIDTH, "--steps", 1, "--warmup", 0, "--repeats", 1)
    result = cli_invoke("bench", *args, "--redux", "tiny-redux", "--device", "cpu", "--json", report)
    assert result.exit_code == 0, result.output
    numbers = json.loads(report.read_text())
    stages = numbers["median_ms"]
    assert list(stages)[:2] == ["redux_image_encode", "text_encode"] and "redux_image_encode" in result.output
    assert stages["total"] >= stages["redux_image_encode"] + stages["denoise"] + stages["decode"]
    assert numbers["transformer_tflop_per_step"] == transformer_flop_per_step(dev, HEIGHT, WIDTH, 512 + 16, 1) / 1e12
    prior_backend, base = backends
    prior = check_prior(BenchOptions(ModelOptions("tiny-dev"), redux="tiny-redux"), dev, HEIGHT, WIDTH)
    given, timings = prior_stage(prior_backend, base, dev, prior, GenerationRequest("a fox", height=HEIGHT))()
    picture = sample_redux_image(HEIGHT, WIDTH)
    expected = redux_conditioning(prior_backend, base, dev, redux, ReduxRequest((picture,)))
    assert (given.prompt, given.height, list(timings)) == (None, HEIGHT, ["redux_image_encode"])
    assert torch.equal(given.prompt_embeds, expected.prompt_embeds)
    assert torch.equal(given.pooled_prompt_embeds, expected.pooled_prompt_embeds)
    assert cli_refusal("bench", *args, "--redux-engines", tmp_path) == (
        "Error: --redux-engines is the Redux prior's folder: add --redux PRIOR"
    )
    assert cli_refusal("bench", *args[:1], "tiny-fill", *args[2:], "--redux", "tiny-redux").startswith(
        "Error: tiny-redux is a FLUX.1 Redux prior; it feeds FluxPipeline models (FLUX.1 [dev], [schnell]), not "
        "tiny-fill (a FluxFillPipeline)"
    )


@pytest.fixture(scope="module")
def redux_export(redux, tmp_path_factory):
    """The tiny Redux prior's two graphs (~11 s), once per session."""
    from helpers import once_per_session

    from fluxexport.export.redux import export_redux

    return once_per_session(tmp_path_factory, "redux-export", lambda folder: export_redux(redux, folder))


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_redux.py")  # its one export made once (conftest.xdist_group)
def test_onnx_runtime_components_match_pytorch(redux, redux_export, backends):
    from fluxexport.onnxruntime.redux import OnnxReduxBackend
    from fluxexport.specs import sample_inputs
    from fluxexport.specs.redux import redux_specs

    graphs, (prior, _) = OnnxReduxBackend(redux, redux_export), backends
    for name, spec in redux_specs(redux).items():
        assert spec.axes["B"].max == 4 and all(isinstance(d, int) for t in spec.inputs for d in t.dims[1:])
        for batch in (1, 3):  # the export saw batch 2
            feeds = sample_inputs(spec, {"B": batch}, seed=batch)
            got, expected = graphs.component(name)(feeds), prior.component(name)(feeds)
            for key, value in expected.items():
                assert got[key].shape == value.shape
                assert psnr(value.numpy() * 50 + 128, got[key].numpy() * 50 + 128) >= 40


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_redux.py")
def test_check_lints_the_redux_graphs_with_their_contract(redux_export):
    from fluxexport.export.check import check_folder

    reports = {report.path.name: report for report in check_folder(redux_export)}
    assert set(reports) == {"image_encoder.onnx", "image_embedder.onnx"}
    assert all(report.ok for report in reports.values()), [r.problems for r in reports.values()]


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_redux.py")
def test_run_on_the_redux_graphs_equals_pytorch(redux_export, reference_image, tmp_path, dev, redux, backends):
    """The prior on ONNX Runtime (`--redux-engines`), the base in PyTorch: within 40 dB of the all-PyTorch image; a
    folder of another prior's graphs is refused in one line."""
    from PIL import Image

    image = tmp_path / "ref.png"
    reference_image.save(image)
    args = ("--model", "tiny-dev", "--redux", "tiny-redux", "--image", image, "--image", image, "--height", HEIGHT,
            "--width", WIDTH, "--steps", STEPS, "--seed", SEED, "--prompt", "a cat")  # fmt: skip
    result = cli_invoke("run", *args, "--redux-engines", redux_export, "--output", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    expected = ours(backends, dev, redux, ReduxRequest((reference_image, reference_image), "a cat"), 1)[0]
    assert psnr(expected, np.asarray(Image.open(tmp_path / "out.png"))) >= 40
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(redux_export, other)
    manifest = json.loads((other / "redux_manifest.json").read_text())
    (other / "redux_manifest.json").write_text(json.dumps(manifest | {"redux": "FLUX.1-Redux-dev"}))
    line = cli_refusal("run", *args, "--redux-engines", other, "--output", tmp_path / "other.png")
    assert f"{other} holds the Redux graphs of 'FLUX.1-Redux-dev', not of 'tiny-redux'" in line


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_redux.py")
def test_validate_compares_the_redux_graphs(redux_export, tmp_path):
    """`validate --redux`: every graph at the export's batch and unseen ones, and the prior's whole chain on two
    pictures, within fp32's bound; a missing --engines refused in one line."""
    import json

    report = tmp_path / "validation.json"
    result = cli_invoke("validate", "--redux", "tiny-redux", "--engines", redux_export, "--report", report)
    assert result.exit_code == 0, result.output
    rows = json.loads(report.read_text())
    assert rows["passed"] and not rows["images"]
    seen = {(row["component"], row["sizes"]["B"]) for row in rows["components"]}
    assert seen == {("image_encoder", 1), ("image_encoder", 2), ("image_encoder", 3), ("image_embedder", 1),
                    ("image_embedder", 2), ("image_embedder", 3), ("redux_prior", 2)}  # fmt: skip
    assert max(row["rel_l2"] for row in rows["components"]) < 1e-5
    line = cli_refusal("validate", "--redux", "tiny-redux")
    assert line == "Error: validate --redux compares the prior's graphs: add --engines DIR (`export --redux`'s)"


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_redux.py")
def test_bench_runs_the_prior_on_its_graphs(exports, redux_export, tmp_path):
    """`bench --redux --redux-engines`: the prior's graphs on ONNX Runtime in front of the base's graphs; a folder
    of another prior's graphs refused in one line before anything runs."""
    import json
    import shutil

    report = tmp_path / "bench.json"
    args = ("--model", "tiny-dev", "--backend", "onnxruntime", "--engines", exports["tiny-dev"], "--height", 64,
            "--width", 64, "--steps", 1, "--warmup", 0, "--repeats", 1, "--redux", "tiny-redux")  # fmt: skip
    result = cli_invoke("bench", *args, "--redux-engines", redux_export, "--json", report)
    assert result.exit_code == 0, result.output
    numbers = json.loads(report.read_text())
    assert numbers["backend"] == "onnxruntime" and list(numbers["median_ms"])[0] == "redux_image_encode"
    other = tmp_path / "other"
    shutil.copytree(redux_export, other)
    manifest = json.loads((other / "redux_manifest.json").read_text())
    (other / "redux_manifest.json").write_text(json.dumps(manifest | {"redux": "FLUX.1-Redux-dev"}))
    line = cli_refusal("bench", *args, "--redux-engines", other)
    assert f"{other} holds the Redux graphs of 'FLUX.1-Redux-dev', not of 'tiny-redux'" in line


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_redux.py")
def test_redux_engines_serve_their_profile(redux, redux_export, sources, exports, tmp_path):
    """`build --redux`'s code over the stand-in TensorRT (its plans run in ONNX Runtime): one profile per engine
    over the batch (the image side fixed), answers equal to ONNX Runtime's on the same graphs, the prior's chain
    through them too; a batch past the profile and engines of another prior refused in one line; a Triton
    repository of plans serves them (`triton --redux`)."""
    import json

    from helpers import H100, standin_tensorrt
    from standin_tensorrt import HostDevice

    from fluxexport.errors import FluxExportError
    from fluxexport.onnxruntime.redux import OnnxReduxBackend
    from fluxexport.runtime.redux import image_embeds
    from fluxexport.specs import sample_inputs
    from fluxexport.specs.redux import redux_specs
    from fluxexport.tensorrt.builder import BuildOptions
    from fluxexport.tensorrt.redux import TensorRTReduxBackend, build_redux_engines

    out = tmp_path / "trt"
    with standin_tensorrt() as trt:
        options = BuildOptions(precision="fp32", optimization_level=2)
        built = build_redux_engines(redux, redux_export, out, options, device_gpu=lambda: H100)
        assert built.engines["image_encoder"].profiles == ({"pixel_values": [[1, 3, 32, 32], [1, 3, 32, 32],
                                                                             [4, 3, 32, 32]]},)  # fmt: skip
        assert built.engines["image_embedder"].profiles == (
            {"image_hidden_states": [[1, 16, 16], [1, 16, 16], [4, 16, 16]]},
        )
        engines, graphs = (
            TensorRTReduxBackend(redux, out, device=HostDevice(trt)),
            OnnxReduxBackend(redux, redux_export),
        )
        for name, spec in redux_specs(redux).items():
            for batch in (1, 3):
                feeds = sample_inputs(spec, {"B": batch}, seed=batch)
                got, expected = engines.component(name)(feeds), graphs.component(name)(feeds)
                assert all(torch.equal(got[key], expected[key]) for key in expected)
        pictures = [Image.new("RGB", (50, 70), (200, 30, 90))]
        assert torch.equal(image_embeds(engines, redux, pictures), image_embeds(graphs, redux, pictures))
        with pytest.raises(FluxExportError, match=r"image_encoder: shapes pixel_values \(5, 3, 32, 32\) are outside"):
            engines.component("image_encoder")(sample_inputs(redux_specs(redux)["image_encoder"], {"B": 5}))
        manifest = json.loads((out / "redux_engines.json").read_text())
        (out / "redux_engines.json").write_text(json.dumps(manifest | {"redux": "FLUX.1-Redux-dev"}))
        with pytest.raises(FluxExportError, match="holds the Redux engines of 'FLUX.1-Redux-dev', not of 'tiny-redux'"):
            TensorRTReduxBackend(redux, out, device=HostDevice(trt))
    # a Triton repository of plans carries the prior's plans too; beside the base's graphs they are refused
    from helpers import build_folder

    from fluxexport.triton.repository import write_repository

    (out / "redux_engines.json").write_text(json.dumps(manifest))
    base = build_folder(sources["tiny-dev"], exports["tiny-dev"], tmp_path / "base")
    repository = write_repository(sources["tiny-dev"], base, tmp_path / "repo", redux=redux, redux_engines=out)
    assert json.loads((repository / "flux_pipeline" / "1" / "redux.json").read_text())["max_images"] == 4
    for name, record in manifest["engines"].items():
        assert 'platform: "tensorrt_plan"' in (repository / name / "config.pbtxt").read_text()
        assert (repository / name / "1" / "model.plan").read_bytes() == (out / record["file"]).read_bytes()
    with pytest.raises(FluxExportError, match=r"does not hold the Redux prior's ONNX graphs, as the base's folder"):
        write_repository(sources["tiny-dev"], exports["tiny-dev"], tmp_path / "mixed", redux=redux, redux_engines=out)
    assert not (tmp_path / "mixed").exists()


def test_tiny_writes_tiny_redux(tmp_path):
    """`fluxexport tiny tiny-redux` writes the prior `--redux` reads; --single-file (a transformer's) is refused."""
    from fluxexport.models.redux import load_redux

    result = cli_invoke("tiny", "tiny-redux", "--out", tmp_path / "redux")
    assert result.exit_code == 0, result.output
    assert load_redux(tmp_path / "redux").image_tokens == 16
    line = cli_refusal("tiny", "tiny-redux", "--out", tmp_path / "again", "--single-file", tmp_path / "t.safetensors")
    assert line == "Error: tiny-redux is a prior, with no transformer: --single-file is for a model; drop it"
    assert not (tmp_path / "t.safetensors").exists() and not (tmp_path / "again").exists()  # refused before writing


def test_published_redux_shapes(tmp_path, dev):
    """A folder with FLUX.1-Redux-dev's configs (SigLIP so400m at 384² in 14² patches, the embedder 1152 → 4096),
    written by the libraries' own config writers on meta weights: read as 729 tokens of T5's width, the specs'
    fixed sides, 512 + 729 text tokens for the base; in front of a base of another width refused in one line."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from fluxexport.models.redux import load_redux
    from fluxexport.runtime.redux import placeholder_conditioning
    from fluxexport.specs.redux import redux_specs

    config = SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
        patch_size=14,
    )  # fmt: skip
    with torch.device("meta"):
        encoder, embedder = SiglipVisionModel(config), ReduxImageEncoder()
    processor = SiglipImageProcessor(size={"height": 384, "width": 384})
    folder = tmp_path / "FLUX.1-Redux-dev"
    FluxPriorReduxPipeline(image_encoder=encoder, feature_extractor=processor, image_embedder=embedder).save_config(
        folder
    )
    config.save_pretrained(folder / "image_encoder")
    embedder.save_config(folder / "image_embedder")
    processor.save_pretrained(folder / "feature_extractor")
    redux = load_redux(folder)
    assert (redux.image_size, redux.image_tokens, redux.text_width) == (384, 729, 4096)
    specs = redux_specs(redux)
    assert specs["image_encoder"].inputs[0].dims == ("B", 3, 384, 384)
    assert specs["image_embedder"].outputs[0].dims == ("B", 729, 4096)
    with pytest.raises(RequestError) as raised:
        redux.check_base(dev)
    assert str(raised.value) == (
        "FLUX.1-Redux-dev embeds images 4096 wide but tiny-dev's text is 32 wide: use the Redux prior made for this "
        "base model"
    )
    assert placeholder_conditioning(load_redux(folder), dev).prompt_embeds.shape == (1, 512 + 729, 4096)


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_redux.py")
def test_triton_pipeline_serves_redux(sources, exports, ort_backends, redux, redux_export, images, tmp_path):
    """A repository written with the prior (`triton --redux --redux-engines`; one line without either) carries its
    two graphs and configs; its flux_pipeline,
    run in process through BLS, serves `run --redux` on the same graphs (two images, per-image scales, no prompt)
    exactly, and refuses a Redux request's faults in one line in the input's own name."""
    import sys

    from test_triton_flux2 import InferenceRequest, InProcessServer, Tensor, pipeline_request, standin_pb_utils

    from fluxexport.onnxruntime.redux import OnnxReduxBackend
    from fluxexport.runtime.redux import with_conditioning

    dev, base_graphs, repository = sources["tiny-dev"], exports["tiny-dev"], tmp_path / "repo"
    args = ("triton", "--model", "tiny-dev", "--engines", base_graphs, "--out", repository)
    result = cli_invoke(*args, "--redux", "tiny-redux", "--redux-engines", redux_export)
    assert result.exit_code == 0, result.output
    assert cli_refusal(*args[:-1], tmp_path / "no", "--redux", "tiny-redux") == (
        "Error: the repository serves tiny-redux from its graphs or engines: export them with `fluxexport export "
        "--redux` (or build them with `build --redux`) and pass that folder with --redux-engines"
    )
    assert cli_refusal(*args[:-1], tmp_path / "no", "--redux-engines", redux_export) == (
        "Error: --redux-engines is the Redux prior's folder: add --redux PRIOR"
    )
    assert not (tmp_path / "no").exists()
    assert "`redux_image` … `redux_image_10`" in " ".join((repository / "README.md").read_text().split())
    pictures = {"redux_image": np.array(images[0]), "redux_image_2": np.array(images[1])}
    settings = dict(height=64, width=WIDTH, num_inference_steps=STEPS, seed=SEED)  # the export's least side: 64

    def served(prompt=None, **redux_inputs):
        tensors = [t for t in pipeline_request(prompt or "", **settings) if prompt is not None or t.name() != "prompt"]
        tensors += [Tensor(name, np.asarray(value)) for name, value in redux_inputs.items()]
        return server.infer("flux_pipeline", tensors)

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "triton_python_backend_utils", standin_pb_utils())
        server = InProcessServer(repository)
        assert {"image_encoder", "image_embedder", "flux_pipeline"} <= set(server.models)
        inputs = {value.name: value for value in server.configs["flux_pipeline"].input}
        assert inputs["prompt"].optional and {"redux_image", "redux_image_10", "redux_scale"} <= set(inputs)
        InferenceRequest.server = server
        try:
            response = served(**pictures, redux_scale=np.array([1.0, 0.5], np.float32))
            refusals = [
                served(**pictures, redux_scale=np.array([1.0, 0.5, 2.0], np.float32)).error().message(),
                served(redux_image_2=pictures["redux_image"]).error().message(),
                served().error().message(),
                served(prompt="a cat", redux_pooled_scale=np.array([1.0], np.float32)).error().message(),
            ]
            server.models["flux_pipeline"].redux_max_images = 1  # as plans built over a batch of 1 record it
            refusals.append(served(**pictures).error().message())
        finally:
            InferenceRequest.server = None
    assert not response.has_error(), response.error().message()
    base = ort_backends["tiny-dev"]
    conditioning = redux_conditioning(
        OnnxReduxBackend(redux, redux_export), base, dev, redux, ReduxRequest(images, prompt_embeds_scale=(1.0, 0.5))
    )  # fmt: skip
    request = with_conditioning(GenerationRequest(None, **settings), conditioning)
    assert np.array_equal(response.outputs["images"].as_numpy(), generate(base, dev, request).images)
    assert refusals == [
        "redux_scale gives 3 weights for 2 images: give one, or one per image",
        "redux_image_2 was given without redux_image: number Redux images from redux_image up",
        "prompt is missing: send a prompt, or a redux_image to vary",
        "redux_pooled_scale scales Redux images, and there is none: send redux_image or drop it",
        "2 Redux images exceed this deployment's 1 (its prior's engines' batch): send fewer, or serve engines built "
        "with `build --redux --batch` over more",
    ]
