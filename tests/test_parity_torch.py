"""`fluxexport run --backend torch` reproduces diffusers' pipelines image for image."""

import numpy as np
import pytest
from helpers import diffusers_images

from fluxexport.compare import psnr
from fluxexport.runtime.pipeline import GenerationRequest, generate

# (height, width, batch, seed, steps): four resolutions, two of them non-square, batch 1 and 2
CASES = [
    (144, 272, 1, 0, 2),
    (256, 256, 2, 7, 4),
    (512, 320, 1, 123, 3),
    (320, 176, 2, 42, 5),
]


@pytest.mark.parametrize("variant", ["tiny-schnell", "tiny-dev"])
@pytest.mark.parametrize(("height", "width", "batch", "seed", "steps"), CASES)
def test_text_to_image_matches_diffusers(
    variant, height, width, batch, seed, steps, sources, torch_backends, diffusers_pipelines
):
    prompt = "an astronaut riding a horse on the moon"
    request = GenerationRequest(
        prompt, height=height, width=width, num_inference_steps=steps, seed=seed, num_images_per_prompt=batch,
        guidance_scale=4.0,
    )  # fmt: skip
    ours = generate(torch_backends[variant], sources[variant], request).images
    theirs = diffusers_images(
        diffusers_pipelines[variant], prompt, height, width, steps, seed, batch, guidance_scale=4.0
    )
    assert ours.shape == theirs.shape == (batch, height, width, 3)
    assert psnr(ours, theirs) >= 50
    assert np.array_equal(ours, theirs)  # bit-exact on CPU fp32


# The preferred-size path encodes a ~1 MP reference, so it runs at one resolution only.
KONTEXT_CASES = [(False, *case) for case in CASES[:3]] + [(True, *CASES[0])]


@pytest.mark.parametrize(("auto_resize", "height", "width", "batch", "seed", "steps"), KONTEXT_CASES)
def test_kontext_with_reference_matches_diffusers(
    auto_resize, height, width, batch, seed, steps, sources, torch_backends, diffusers_pipelines, reference_image
):
    prompt = "make the disc blue"
    request = GenerationRequest(
        prompt, height=height, width=width, num_inference_steps=steps, seed=seed, num_images_per_prompt=batch,
        image=reference_image, auto_resize_reference=auto_resize,
    )  # fmt: skip
    ours = generate(torch_backends["tiny-kontext"], sources["tiny-kontext"], request).images
    theirs = diffusers_images(
        diffusers_pipelines["tiny-kontext"], prompt, height, width, steps, seed, batch,
        image=reference_image, _auto_resize=auto_resize,
    )  # fmt: skip
    assert psnr(ours, theirs) >= 50
    assert np.array_equal(ours, theirs)


def test_kontext_without_reference_is_text_to_image(sources, torch_backends, diffusers_pipelines):
    request = GenerationRequest("a castle", height=256, width=256, num_inference_steps=3, seed=5)
    ours = generate(torch_backends["tiny-kontext"], sources["tiny-kontext"], request).images
    theirs = diffusers_images(diffusers_pipelines["tiny-kontext"], "a castle", 256, 256, 3, 5)
    assert np.array_equal(ours, theirs)


def test_prompt_2_and_sequence_length(sources, torch_backends, diffusers_pipelines):
    request = GenerationRequest(
        "a cat", prompt_2="a watercolor painting of a cat", height=144, width=272, num_inference_steps=2, seed=1,
        max_sequence_length=77,
    )  # fmt: skip
    ours = generate(torch_backends["tiny-dev"], sources["tiny-dev"], request).images
    theirs = diffusers_images(
        diffusers_pipelines["tiny-dev"], "a cat", 144, 272, 2, 1,
        prompt_2="a watercolor painting of a cat", max_sequence_length=77,
    )  # fmt: skip
    assert np.array_equal(ours, theirs)


def test_long_prompt_is_truncated_with_a_warning(sources, torch_backends, diffusers_pipelines):
    prompt = " ".join(["a red fox sitting in a misty forest"] * 20)
    request = GenerationRequest(prompt, height=144, width=272, num_inference_steps=2, seed=3)
    result = generate(torch_backends["tiny-schnell"], sources["tiny-schnell"], request)
    assert any(w.startswith("CLIP prompt was truncated to 77 tokens") for w in result.warnings)
    assert any(w.startswith("T5 prompt was truncated to 256 tokens") for w in result.warnings)
    assert np.array_equal(result.images, diffusers_images(diffusers_pipelines["tiny-schnell"], prompt, 144, 272, 2, 3))


def test_timings_cover_every_stage(sources, torch_backends, reference_image):
    request = GenerationRequest("x", height=144, width=272, num_inference_steps=2, image=reference_image,
                                auto_resize_reference=False)  # fmt: skip
    steps_seen = []
    result = generate(torch_backends["tiny-kontext"], sources["tiny-kontext"], request,
                      on_step=lambda done, total: steps_seen.append((done, total)))  # fmt: skip
    assert steps_seen == [(1, 2), (2, 2)]
    assert set(result.timings) == {"text_encode", "reference_encode", "denoise", "denoise_per_step", "decode", "total"}
    assert all(value > 0 for value in result.timings.values())
