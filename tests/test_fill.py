"""FLUX.1 Fill (inpainting, outpainting) through the toolchain: the tiny-fill checkpoint diffusers' FluxFillPipeline
loads, our PyTorch backend equal to that pipeline byte for byte, the exported graphs in ONNX Runtime within 40 dB of
it at sizes the export never saw, and its requests refused in one line where a mask or an image is missing."""

import numpy as np
import pytest
from conditioned import refusal_of, variant_fixtures
from helpers import diffusers_images
from PIL import Image

from fluxexport.compare import psnr
from fluxexport.families.family import FILL_CONDITION
from fluxexport.runtime.pipeline import GenerationRequest, generate, resolve_request

PROMPT = "a red door in a white wall"
# height, width, prompts, images per prompt, steps: odd sizes (not multiples of 32, a tall strip) with two prompts
# and two images each
CASES = [(144, 80, 2, 2, 2)]


fill, fill_pipeline, fill_torch, fill_export = variant_fixtures(
    "tiny-fill", "FluxFillPipeline", "fill", "fill_pipeline"
)


@pytest.fixture(scope="module")
def edge_mask(reference_image):
    """White (repaint) along the right and top edges of the reference and in a gray ramp that binarizes at 50%."""
    width, height = reference_image.size
    y, x = np.mgrid[0:height, 0:width]
    white = (x >= width - 40) | (y < 24) | ((x > 60) & (x < 120) & (y > 80) & (y < 150) & (x * 2 > 180))
    return Image.fromarray(np.where(white, 255, 60).astype(np.uint8))  # gray 60: kept (below the 50% binarization)


def request(reference_image, mask, height, width, prompts, count, steps, seed=5):
    return GenerationRequest(
        [PROMPT, "the door open"][:prompts] if prompts > 1 else PROMPT, height=height, width=width,
        num_inference_steps=steps, seed=seed, num_images_per_prompt=count, image=reference_image, mask=mask,
        max_sequence_length=64,
    )  # fmt: skip


def theirs(pipeline, reference_image, mask, height, width, prompts, count, steps, seed=5) -> np.ndarray:
    prompt = [PROMPT, "the door open"][:prompts] if prompts > 1 else PROMPT
    return diffusers_images(
        pipeline, prompt, height, width, steps, seed, count, image=reference_image, mask_image=mask,
        max_sequence_length=64,
    )  # fmt: skip


def test_tiny_fill_is_a_fill_checkpoint(fill, fill_pipeline):
    assert fill.pipeline_class == "FluxFillPipeline" and fill.reference_mode == FILL_CONDITION
    # 64 latent + 64 masked-image latent + 256 mask channels (each latent pixel's 8×8 mask pixels, packed 2×2)
    assert fill_pipeline.transformer.config.in_channels == 384
    assert fill_pipeline.transformer.config.out_channels == 64
    assert fill.default_guidance == 30.0 and fill.default_steps == 50  # FluxFillPipeline's own defaults


@pytest.mark.parametrize(("height", "width", "prompts", "count", "steps"), CASES)
def test_torch_equals_diffusers_fill(
    height, width, prompts, count, steps, fill, fill_torch, fill_pipeline, reference_image, edge_mask
):
    ours = generate(fill_torch, fill, request(reference_image, edge_mask, height, width, prompts, count, steps))
    expected = theirs(fill_pipeline, reference_image, edge_mask, height, width, prompts, count, steps)
    assert ours.images.shape == expected.shape == (prompts * count, height, width, 3)
    assert np.array_equal(ours.images, expected)


def test_the_output_takes_the_image_size_floored_to_16(fill, reference_image, edge_mask):
    resolved = resolve_request(fill, GenerationRequest(PROMPT, image=reference_image, mask=edge_mask))
    assert (resolved.width, resolved.height) == (288, 192)  # the 300×200 reference
    assert resolved.mask is edge_mask and resolved.image is reference_image


def refusal(source, **kwargs) -> str:
    return refusal_of(source, PROMPT, **kwargs)


def test_fill_requests_refused_in_one_line(fill, sources, reference_image, edge_mask):
    assert refusal(fill, image=reference_image) == (
        "tiny-fill is a FLUX.1 Fill model: it repaints its image where a mask is white: pass the mask with --mask"
    )
    assert refusal(fill, mask=edge_mask) == (
        "tiny-fill is a FLUX.1 Fill model: it repaints one image where its mask is white, got none: pass the image "
        "with --image and the mask with --mask"
    )
    assert refusal(sources["tiny-dev"], mask=edge_mask) == (
        "--mask is for FLUX.1 Fill models but tiny-dev is a FluxPipeline: use a FLUX.1 Fill model or drop --mask"
    )
    assert refusal(fill, image=Image.new("RGB", (300, 12)), mask=edge_mask) == (
        "the image is 300×12: both sides must be at least 16 px (--image)"
    )


def test_keep_reference_size_refused_where_it_means_nothing(
    fill, sources, flux2_sources, reference_image, edge_mask, tmp_path
):
    """--keep-reference-size keeps a Kontext reference at its own size; Fill's image is resized to the output (the
    image's own size unless one is set), FLUX.2 caps its references, a FluxPipeline takes none: refused in one line,
    not ignored."""
    assert refusal(fill, image=reference_image, mask=edge_mask, auto_resize_reference=False) == (
        "--keep-reference-size is for FLUX.1 Kontext references, but tiny-fill is a FluxFillPipeline (its image is "
        "resized to the output size, which is the image's own unless you set one): drop --keep-reference-size"
    )
    assert refusal(sources["tiny-dev"], auto_resize_reference=False) == (
        "--keep-reference-size is for FLUX.1 Kontext references, but tiny-dev is a FluxPipeline (it takes no Kontext "
        "reference): drop --keep-reference-size"
    )
    assert refusal(sources["tiny-kontext"], auto_resize_reference=False) == (
        "--keep-reference-size keeps a Kontext reference at its own size, but no reference was given: pass it with "
        "--image or drop --keep-reference-size"
    )
    assert refusal(flux2_sources["tiny-klein"], image=reference_image, auto_resize_reference=False) == (
        "--keep-reference-size is for FLUX.1 Kontext references, but tiny-klein is a Flux2KleinPipeline (its "
        "references are capped to about 1 megapixel, as diffusers does, and kept otherwise): drop --keep-reference-size"
    )
    kept = resolve_request(sources["tiny-kontext"], GenerationRequest(PROMPT, image=reference_image,
                                                                      auto_resize_reference=False))  # fmt: skip
    assert kept.auto_resize_reference is False and kept.image is reference_image
    from click.testing import CliRunner

    from fluxexport.cli import main

    reference_image.save(tmp_path / "photo.png")
    edge_mask.save(tmp_path / "mask.png")
    refused = CliRunner().invoke(main, [str(a) for a in [
        "run", "--model", "tiny-fill", "--prompt", PROMPT, "--image", tmp_path / "photo.png", "--mask",
        tmp_path / "mask.png", "--keep-reference-size", "--output", tmp_path / "out.png"]])  # fmt: skip
    assert refused.exit_code == 1 and not (tmp_path / "out.png").exists()
    assert refused.output.startswith("Error: --keep-reference-size is for FLUX.1 Kontext references, but tiny-fill")


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_fill.py")  # its one export made once (conftest.xdist_group)
def test_onnxruntime_fill_matches_diffusers_at_unseen_sizes(
    fill, fill_export, fill_pipeline, reference_image, edge_mask
):
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.specs import component_specs

    specs = component_specs(fill)
    assert specs["transformer"].inputs[0].dims == ("B", "N", 384)
    assert [tensor.name for tensor in specs["vae_encoder"].outputs] == ["latent", "latent_std"]
    backend = OnnxRuntimeBackend(fill, fill_export)
    height, width, prompts, count, steps = 176, 112, 2, 1, 3  # N = 77 tokens, 176×112 pixels: never exported
    ours = generate(backend, fill, request(reference_image, edge_mask, height, width, prompts, count, steps))
    expected = theirs(fill_pipeline, reference_image, edge_mask, height, width, prompts, count, steps)
    assert psnr(ours.images, expected) >= 40


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_fill.py")  # its one export made once (conftest.xdist_group)
def test_triton_pipeline_takes_image_and_mask(fill, fill_export, reference_image, edge_mask, tmp_path):
    """The repository's flux_pipeline declares `image` and `mask` (and no control image), and serves, in process
    through BLS, `run --backend onnxruntime`'s image on the same graphs; a request without its mask is refused in
    the input's own name."""
    import sys

    from test_triton_flux2 import InferenceRequest, InProcessServer, pipeline_request, standin_pb_utils

    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.triton.repository import write_repository

    repository = write_repository(fill, fill_export, tmp_path / "fill")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "triton_python_backend_utils", standin_pb_utils())
        server = InProcessServer(repository)
        inputs = {value.name for value in server.configs["flux_pipeline"].input}
        assert {"image", "mask"} <= inputs and "control_image" not in inputs and "image_2" not in inputs
        InferenceRequest.server = server
        try:
            settings = dict(height=96, width=144, num_inference_steps=2, seed=3)
            images = dict(image=np.array(reference_image), mask=np.array(edge_mask.convert("RGB")))
            response = server.infer("flux_pipeline", pipeline_request(PROMPT, **settings, **images))
            refused = server.infer("flux_pipeline", pipeline_request(PROMPT, **settings, image=images["image"]))
        finally:
            InferenceRequest.server = None
    assert not response.has_error(), response.error().message()
    expected = generate(
        OnnxRuntimeBackend(fill, fill_export), fill,
        GenerationRequest(PROMPT, height=96, width=144, num_inference_steps=2, seed=3, image=reference_image,
                          mask=edge_mask.convert("RGB")),
    )  # fmt: skip
    assert np.array_equal(response.outputs["images"].as_numpy(), expected.images)
    assert refused.error().message() == (
        "tiny-fill is a FLUX.1 Fill model: it repaints its image where a mask is white: pass the mask with mask"
    )


def test_first_block_cache_on_fill_equals_diffusers_hook(fill, fill_torch, fill_pipeline, reference_image, edge_mask):
    """The step cache's parts take Fill's wide input as the whole transformer does: diffusers' decisions, its image
    bit for bit (computed steps counted on the first single block, which a skipped step never reaches)."""
    from diffusers import FirstBlockCacheConfig

    from fluxexport.runtime.cache import CacheSettings

    cache = CacheSettings("first-block", {"threshold": 0.3})
    ours = generate(fill_torch, fill, request(reference_image, edge_mask, 128, 128, 1, 1, 10), cache=cache)
    module, calls = fill_pipeline.transformer.get_submodule("single_transformer_blocks.0.attn"), [0]
    hook = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    fill_pipeline.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.3))
    try:  # FluxFillPipeline sets no cache context itself (FluxPipeline sets "cond" around each step's call)
        with fill_pipeline.transformer.cache_context("cond"):
            expected = theirs(fill_pipeline, reference_image, edge_mask, 128, 128, 1, 1, 10)
    finally:
        fill_pipeline.transformer.disable_cache()
        hook.remove()
    assert ours.computed_steps == calls[0] < 10
    assert np.array_equal(ours.images, expected)


def test_a_lora_merges_into_fill_as_diffusers_fuse_lora(fill, fill_torch, reference_image, edge_mask, tmp_path):
    from diffusers import FluxFillPipeline

    from fluxexport.models.lora import parse_lora
    from fluxexport.models.tiny_lora import write_tiny_lora
    from fluxexport.pytorch.backend import TorchBackend

    path = write_tiny_lora(fill, tmp_path / "fill-lora.safetensors", "peft")
    merged = fill.with_loras([parse_lora(f"{path}:0.8")])
    with TorchBackend(merged, "fp32", "cpu") as backend:
        ours = generate(backend, merged, request(reference_image, edge_mask, 96, 96, 1, 1, 2)).images
    pipeline = FluxFillPipeline.from_pretrained(fill.root)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(str(path))
    pipeline.fuse_lora(lora_scale=0.8)
    expected = theirs(pipeline, reference_image, edge_mask, 96, 96, 1, 1, 2)
    plain = generate(fill_torch, fill, request(reference_image, edge_mask, 96, 96, 1, 1, 2)).images
    assert psnr(ours, expected) >= 50
    assert psnr(ours, plain) < 45  # the LoRA changes the image


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_fill.py")  # its one export made once (conftest.xdist_group)
def test_validate_compares_fill_graphs_end_to_end(fill_export, tmp_path):
    """`validate` gives Fill its own image and mask (`sample_conditions`): every component, the VAE posterior's
    std included, within its threshold, and the images within 50 dB of PyTorch's."""
    import json

    from fluxexport.commands.common import ModelOptions
    from fluxexport.commands.validate import ValidateOptions, validate_folder

    options = ValidateOptions(
        model=ModelOptions("tiny-fill"), engines=fill_export, components=["vae_encoder", "transformer"], steps=2,
        report=tmp_path / "report.json",
    )  # fmt: skip
    result = validate_folder(options)
    report = json.loads(result.path.read_text())
    assert result.failure is None and report["passed"]
    assert {row["output"] for row in report["components"] if row["component"] == "vae_encoder"} == {
        "latent", "latent_std",
    }  # fmt: skip
    assert len(report["images"]) == 2 and all(image["psnr"] >= 50 for image in report["images"])


def test_engine_profiles_take_the_wide_input(fill):
    """TensorRT profiles from the specs: the transformer's hidden_states 384 wide at every bound, the VAE encoder
    (the masked image's posterior) over the same pixel sides as the decoder's output."""
    from fluxexport.specs import ExportBounds
    from fluxexport.tensorrt.builder import BuildOptions
    from fluxexport.tensorrt.profiles import build_profiles

    buckets = BuildOptions(bounds=ExportBounds.for_model(fill), resolution_buckets=2).profile_bounds()
    transformer = build_profiles(fill, "transformer", buckets)
    assert len(transformer) == 2
    assert all(shape[2] == 384 for profile in transformer for shape in profile.shapes["hidden_states"])
    (encoder, _), (decoder, _) = (build_profiles(fill, name, buckets) for name in ("vae_encoder", "vae_decoder"))
    low, _, high = encoder.shapes["images"]
    latent_low, _, latent_high = decoder.shapes["latent"]
    assert (low[2], high[2]) == (latent_low[2] * 8, latent_high[2] * 8)


def test_run_command_takes_image_and_mask_files(fill, reference_image, edge_mask, tmp_path):
    """`run --image --mask` writes the image at the picture's size floored to /16; a mask PIL cannot read is
    refused in one line naming --mask, before any weight loads."""
    from click.testing import CliRunner

    from fluxexport.cli import main

    reference_image.save(tmp_path / "photo.png")
    edge_mask.save(tmp_path / "mask.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    common = ["run", "--model", "tiny-fill", "--prompt", PROMPT, "--image", tmp_path / "photo.png", "--steps", "1"]
    done = CliRunner().invoke(main, [str(a) for a in [*common, "--mask", tmp_path / "mask.png", "--output",
                                                      tmp_path / "out.png"]])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert Image.open(tmp_path / "out.png").size == (288, 192)
    refused = CliRunner().invoke(main, [str(a) for a in [*common, "--mask", tmp_path / "broken.png"]])
    assert refused.exit_code == 1
    assert refused.output.startswith(f"Error: cannot read --mask {tmp_path / 'broken.png'}: cannot identify image")
    assert len(refused.output.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_fill.py")  # its one export made once (conftest.xdist_group)
def test_fp8_transformer_of_fill_within_its_bound(fill_export, tmp_path):
    """`quantize` calibrates Fill with its condition in place (a picture and a mask of its own): the FP8 Q/DQ
    transformer within 6e-2 rel-L2 of PyTorch fp32 at every validation shape."""
    import json
    import shutil

    from fluxexport.commands.common import ModelOptions
    from fluxexport.commands.quantize import QuantizeOptions, quantize_fp8
    from fluxexport.commands.validate import ValidateOptions, validate_folder

    folder = tmp_path / "fill-fp8"
    shutil.copytree(fill_export, folder)
    model = ModelOptions("tiny-fill")
    quantize_fp8(QuantizeOptions(model=model, out=folder, dtype="fp32", calib_size=2, calib_steps=2,
                                 calib_resolution=64))  # fmt: skip
    result = validate_folder(
        ValidateOptions(model=model, engines=folder, components=["transformer"], steps=2, fp8=True,
                        report=tmp_path / "report.json")
    )  # fmt: skip
    rows = json.loads(result.path.read_text())["components"]
    assert result.failure is None and len(rows) == 3
    assert all(row["rel_l2"] <= 6e-2 for row in rows), [row["rel_l2"] for row in rows]
