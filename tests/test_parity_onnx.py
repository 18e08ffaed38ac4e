"""Exported graphs run in ONNX Runtime and match PyTorch per component and diffusers end to end."""

import numpy as np
import pytest
from helpers import diffusers_images
from PIL import Image

from fluxexport.compare import psnr
from fluxexport.errors import FluxExportError
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.specs import component_specs, validation_sizes
from fluxexport.validate.graphs import compare_component

VARIANTS = ["tiny-schnell", "tiny-dev", "tiny-kontext"]
COMPONENTS = ["clip", "t5", "transformer", "vae_decoder", "vae_encoder"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("component", COMPONENTS)
def test_component_matches_pytorch_across_the_dynamic_range(variant, component, sources, torch_backends, ort_backends):
    spec = component_specs(sources[variant])[component]
    sizes = validation_sizes(spec)
    assert {s["B"] for s, _ in sizes} == {1, 2, 3}
    for axis in spec.axes:  # three values per dynamic axis, one of them never seen at export
        assert len({s[axis] for s, _ in sizes}) == 3, axis
    results = compare_component(
        spec, ort_backends[variant].component(component), torch_backends[variant].component(component), 1e-5
    )
    assert len(results) == 3 * len(spec.outputs)
    assert all(r.passed for r in results), [(r.output, r.sizes, r.rel_l2) for r in results if not r.passed]
    assert all(r.cosine > 0.999999 for r in results)


RESOLUTIONS = [(144, 272, 1, 2), (256, 256, 3, 3), (320, 176, 2, 4)]  # height, width, batch, steps


@pytest.mark.parametrize("variant", ["tiny-schnell", "tiny-dev"])
@pytest.mark.parametrize(("height", "width", "batch", "steps"), RESOLUTIONS)
def test_onnxruntime_image_matches_diffusers(
    variant, height, width, batch, steps, sources, ort_backends, diffusers_pipelines
):
    prompt = "a lighthouse at sunset"
    request = GenerationRequest(
        prompt, height=height, width=width, num_inference_steps=steps, seed=11, num_images_per_prompt=batch
    )
    ours = generate(ort_backends[variant], sources[variant], request).images
    theirs = diffusers_images(diffusers_pipelines[variant], prompt, height, width, steps, 11, batch)
    assert ours.shape == theirs.shape
    assert psnr(ours, theirs) >= 50


@pytest.mark.parametrize(("height", "width", "batch", "steps"), RESOLUTIONS)
def test_onnxruntime_kontext_matches_diffusers(
    height, width, batch, steps, sources, ort_backends, diffusers_pipelines, reference_image
):
    prompt = "turn the disc into a sun"
    request = GenerationRequest(
        prompt, height=height, width=width, num_inference_steps=steps, seed=2, num_images_per_prompt=batch,
        image=reference_image, auto_resize_reference=False,
    )  # fmt: skip
    ours = generate(ort_backends["tiny-kontext"], sources["tiny-kontext"], request).images
    theirs = diffusers_images(
        diffusers_pipelines["tiny-kontext"],
        prompt,
        height,
        width,
        steps,
        2,
        batch,
        image=reference_image,
        _auto_resize=False,
    )
    assert psnr(ours, theirs) >= 50


def test_cli_run_on_onnxruntime(tmp_path, sources, exports, torch_backends):
    from click.testing import CliRunner

    from fluxexport.cli import main

    out = tmp_path / "ort.png"
    result = CliRunner().invoke(
        main, ["run", "--model", "tiny-dev", "--backend", "onnxruntime", "--engines", str(exports["tiny-dev"]),
               "--prompt", "a fox", "--height", "144", "--width", "272", "--steps", "3", "--output", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "onnxruntime · 3 steps" in result.output
    expected = generate(
        torch_backends["tiny-dev"],
        sources["tiny-dev"],
        GenerationRequest("a fox", height=144, width=272, num_inference_steps=3),
    ).images[0]
    assert psnr(np.array(Image.open(out)), expected) >= 50


def test_engines_of_another_model_are_refused(sources, exports):
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    with pytest.raises(FluxExportError) as error:
        OnnxRuntimeBackend(sources["tiny-schnell"], exports["tiny-dev"])
    assert str(error.value) == (
        f"the graphs in {exports['tiny-dev']} were exported from 'tiny-dev', not from 'tiny-schnell': "
        "pass the same --model as at export, or export again"
    )


def test_missing_graph_and_bf16_graph_errors(sources, bf16_export, tmp_path):
    from fluxexport.export.onnx_export import export_model
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    export_model(sources["tiny-dev"], tmp_path, ["clip"])
    with pytest.raises(
        FluxExportError,
        match="has no transformer graph \\(it has clip\\): run fluxexport export --model tiny-dev --dtype fp32 "
        "--components transformer",
    ):
        OnnxRuntimeBackend(sources["tiny-dev"], tmp_path).component("transformer")
    with pytest.raises(FluxExportError, match="is a bf16 graph, which ONNX Runtime cannot run on CPU"):
        OnnxRuntimeBackend(sources["tiny-dev"], bf16_export).component("transformer")
    with pytest.raises(FluxExportError, match="has no manifest.json"):
        OnnxRuntimeBackend(sources["tiny-dev"], tmp_path / "nothing")
