"""FLUX.1 Canny and Depth (FluxControlPipeline) through the toolchain: tiny-canny and tiny-depth, which diffusers'
FluxControlPipeline loads (one architecture: only the control image a user gives, an edge or a depth map, differs),
our PyTorch backend equal to that pipeline byte for byte, ONNX Runtime within 40 dB of it at sizes the export never
saw, and control requests refused in one line."""

import numpy as np
import pytest
from conditioned import refusal_of, variant_fixtures
from helpers import diffusers_images
from PIL import Image

from fluxexport.compare import psnr
from fluxexport.families.family import CONTROL_CONDITION
from fluxexport.runtime.pipeline import GenerationRequest, generate, resolve_request

PROMPT = "a glass house on a hill"
CASES = [(144, 80, 2, 2, 2)]  # height, width, prompts, images per prompt, steps: odd sizes, a batch of 4

canny, control_pipeline, canny_torch, canny_export = variant_fixtures(
    "tiny-canny", "FluxControlPipeline", "canny", "control_pipeline"
)


@pytest.fixture(scope="module")
def edges(reference_image):
    """An edge map of the reference (what a Canny model follows): white where the gray level jumps."""
    gray = np.asarray(reference_image.convert("L"), dtype=np.int16)
    jumps = (np.abs(np.diff(gray, axis=0, prepend=0)) + np.abs(np.diff(gray, axis=1, prepend=0))) > 20
    return Image.fromarray((jumps * 255).astype(np.uint8)).convert("RGB")


def prompts(count: int) -> str | list[str]:
    return [PROMPT, "a stone tower"][:count] if count > 1 else PROMPT


def both_sides(backend, source, pipeline, edges, height, width, count, per_prompt, steps, seed):
    """(ours, diffusers') uint8 images of one control request on `backend` and on `pipeline`."""
    request = GenerationRequest(
        prompts(count), height=height, width=width, num_inference_steps=steps, seed=seed,
        num_images_per_prompt=per_prompt, control_image=edges, max_sequence_length=64,
    )  # fmt: skip
    theirs = diffusers_images(
        pipeline, prompts(count), height, width, steps, seed, per_prompt, control_image=edges, max_sequence_length=64
    )
    return generate(backend, source, request).images, theirs


def test_canny_and_depth_are_one_control_architecture(canny, control_pipeline, cache_root):
    from fluxexport.models.source import resolve_model

    depth = resolve_model("tiny-depth")
    for source in (canny, depth):
        assert source.pipeline_class == "FluxControlPipeline" and source.reference_mode == CONTROL_CONDITION
        assert source.transformer["in_channels"] == 128 and source.transformer["out_channels"] == 64
    assert canny.default_guidance == 3.5 and canny.default_steps == 28  # FluxControlPipeline's own defaults
    assert control_pipeline.transformer.config.in_channels == 128


@pytest.mark.parametrize(("height", "width", "count", "per_prompt", "steps"), CASES)
def test_torch_equals_diffusers_control(
    height, width, count, per_prompt, steps, canny, canny_torch, control_pipeline, edges
):
    ours, theirs = both_sides(canny_torch, canny, control_pipeline, edges, height, width, count, per_prompt, steps, 9)
    assert ours.shape == theirs.shape == (count * per_prompt, height, width, 3)
    assert np.array_equal(ours, theirs)


def refusal(source, **kwargs) -> str:
    return refusal_of(source, PROMPT, **kwargs)


def test_control_requests_refused_in_one_line(canny, sources, edges, reference_image):
    assert refusal(canny) == (
        "tiny-canny is a FLUX.1 Canny/Depth model: it follows an edge or depth map: pass the map with --control-image"
    )
    assert refusal(canny, image=reference_image, control_image=edges) == (
        "tiny-canny is a FLUX.1 Canny/Depth model: it follows a control image, not a reference: pass the edge or "
        "depth map with --control-image and drop --image"
    )
    assert refusal(sources["tiny-kontext"], image=reference_image, control_image=edges) == (
        "--control-image is for FLUX.1 Canny/Depth models but tiny-kontext is a FluxKontextPipeline: use a FLUX.1 "
        "Canny/Depth model or drop --control-image"
    )
    assert refusal(canny, control_image=Image.new("RGB", (8, 64))) == (
        "the control-image is 8×64: both sides must be at least 16 px (--control-image)"
    )
    assert refusal(canny, control_image=edges, auto_resize_reference=False) == (  # not ignored
        "--keep-reference-size is for FLUX.1 Kontext references, but tiny-canny is a FluxControlPipeline (its control "
        "image is resized to the output size, which is the map's own unless you set one): drop --keep-reference-size"
    )


def test_the_output_takes_the_control_image_size(canny, edges):
    resolved = resolve_request(canny, GenerationRequest(PROMPT, control_image=edges))
    assert (resolved.width, resolved.height) == (288, 192)  # the 300×200 map, floored to /16
    resolved = resolve_request(canny, GenerationRequest(PROMPT, control_image=edges, height=96, width=64))
    assert (resolved.width, resolved.height) == (64, 96)  # resized to the asked size, as diffusers does


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_control.py")  # its one export made once (conftest.xdist_group)
def test_onnxruntime_control_matches_diffusers_at_unseen_sizes(canny, canny_export, control_pipeline, edges):
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(canny, canny_export)
    # 112×208 (91 tokens), batch 3: never exported
    ours, theirs = both_sides(backend, canny, control_pipeline, edges, 112, 208, 1, 3, 3, 4)
    assert psnr(ours, theirs) >= 40
