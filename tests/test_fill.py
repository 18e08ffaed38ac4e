"""FLUX.1 Fill (inpainting, outpainting) through the toolchain: the tiny-fill checkpoint diffusers' FluxFillPipeline
loads, our PyTorch backend equal to that pipeline byte for byte, the exported graphs in ONNX Runtime within 40 dB of
it at sizes the export never saw, and its requests refused in one line where a mask or an image is missing."""

import numpy as np
import pytest
from helpers import diffusers_images
from PIL import Image

from fluxexport.cli import command_line_terms
from fluxexport.compare import psnr
from fluxexport.errors import RequestError
from fluxexport.families.family import FILL_CONDITION
from fluxexport.runtime.pipeline import GenerationRequest, generate, resolve_request

PROMPT = "a red door in a white wall"
# height, width, prompts, images per prompt, steps: a batch of one at the reference's own aspect, and odd sizes
# (not multiples of 32, a tall strip) with two prompts and two images each
CASES = [(192, 288, 1, 1, 3), (144, 80, 2, 2, 2)]


@pytest.fixture(scope="module")
def fill(cache_root):
    from fluxexport.models.source import resolve_model

    return resolve_model("tiny-fill")


@pytest.fixture(scope="module")
def fill_pipeline(fill):
    from diffusers import FluxFillPipeline

    pipeline = FluxFillPipeline.from_pretrained(fill.root)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def fill_torch(fill):
    from fluxexport.pytorch.backend import TorchBackend

    return TorchBackend(fill, device="cpu")


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
    with pytest.raises(RequestError) as error:
        resolve_request(source, GenerationRequest(PROMPT, **kwargs))
    return error.value.render(command_line_terms("run"))


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


@pytest.fixture(scope="module")
def fill_export(fill, tmp_path_factory):
    """tiny-fill's five components in fp32 ONNX (the one export of this file)."""
    from fluxexport.export.onnx_export import export_model

    folder = tmp_path_factory.mktemp("fill-onnx")
    export_model(fill, folder)
    return folder


@pytest.mark.slow
@pytest.mark.xdist_group("flux1")
def test_onnxruntime_fill_matches_diffusers_at_unseen_sizes(
    fill, fill_export, fill_pipeline, reference_image, edge_mask
):
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.specs import component_specs

    specs = component_specs(fill)
    assert specs["transformer"].inputs[0].shape == ("B", "N", 384)
    assert [tensor.name for tensor in specs["vae_encoder"].outputs] == ["latent", "latent_std"]
    backend = OnnxRuntimeBackend(fill, fill_export)
    height, width, prompts, count, steps = 176, 112, 2, 1, 3  # N = 77 tokens, 176×112 pixels: never exported
    ours = generate(backend, fill, request(reference_image, edge_mask, height, width, prompts, count, steps))
    expected = theirs(fill_pipeline, reference_image, edge_mask, height, width, prompts, count, steps)
    assert psnr(ours.images, expected) >= 40
