"""Step caching: `--cache taylorseer` equals diffusers' own TaylorSeer hook (lite mode) image for image, on the
same computed steps, around any backend's transformer."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import diffusers_images

from fluxexport.cli import main
from fluxexport.compare import psnr
from fluxexport.errors import FluxExportError
from fluxexport.runtime.cache import CacheSettings, TaylorSeer, parse_cache
from fluxexport.runtime.pipeline import GenerationRequest, generate

PROMPT = "a red fox in the snow"


def test_cache_settings_parse_with_diffusers_defaults():
    assert str(parse_cache(None)) == "none" and str(parse_cache("none")) == "none"
    assert parse_cache("taylorseer").knobs == {"interval": 5, "order": 1, "warmup": 3}
    assert str(parse_cache("taylorseer:interval=3, warmup=2")) == "taylorseer:interval=3,order=1,warmup=2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("magic", "unknown cache 'magic': choose one of none, taylorseer (--cache)"),
        ("taylorseer:speed=2", "taylorseer has no key 'speed': it takes interval, order, warmup (--cache)"),
        ("none:interval=2", "none has no key 'interval': it takes no keys (--cache)"),
        ("taylorseer:interval=0", "taylorseer interval must be an integer ≥ 1, got 0 (--cache)"),
        ("taylorseer:order=1.5", "taylorseer order must be an integer ≥ 1, got 1.5 (--cache)"),
        ("taylorseer:warmup=x", "taylorseer warmup must be an integer ≥ 0, got 'x' (--cache)"),
        ("taylorseer:interval", "'interval' is not key=value: write --cache taylorseer:key=value,… (--cache)"),
    ],
)
def test_bad_cache_settings_are_refused_in_one_line(text, message):
    with pytest.raises(FluxExportError) as error:
        parse_cache(text)
    assert str(error.value) == message


def test_taylorseer_computes_diffusers_schedule():
    """Full evaluations at the warm-up steps, then every interval-th step (28 steps, defaults: 0,1,2,4,9,…,24)."""
    cache = CacheSettings("taylorseer").new_state()
    assert isinstance(cache, TaylorSeer)
    computed = [step for step in range(28) if cache.computes(step)]
    assert computed == [0, 1, 2, 4, 9, 14, 19, 24]


def _count_transformer_runs(pipeline) -> list[int]:
    """Calls of the first block's attention: a step diffusers' TaylorSeer predicts never reaches it."""
    calls = [0]
    pipeline.transformer.transformer_blocks[0].attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    ("knobs", "steps", "batch"), [({"interval": 3, "order": 1, "warmup": 2}, 12, 1), ({"order": 2}, 9, 2)]
)
def test_taylorseer_equals_diffusers_hook(knobs, steps, batch, sources, torch_backends, diffusers_pipelines):
    from diffusers import TaylorSeerCacheConfig

    cache = CacheSettings("taylorseer", knobs)
    request = GenerationRequest(
        PROMPT, height=256, width=256, num_inference_steps=steps, seed=1, num_images_per_prompt=batch,
        guidance_scale=3.5,
    )  # fmt: skip
    ours = generate(torch_backends["tiny-dev"], sources["tiny-dev"], request, cache=cache)
    pipeline = diffusers_pipelines["tiny-dev"]
    k = cache.knobs
    config = TaylorSeerCacheConfig(
        cache_interval=k["interval"], max_order=k["order"], disable_cache_before_step=k["warmup"], use_lite_mode=True
    )
    calls = _count_transformer_runs(pipeline)
    pipeline.transformer.enable_cache(config)
    try:
        theirs = diffusers_images(pipeline, PROMPT, 256, 256, steps, 1, batch, guidance_scale=3.5)
    finally:
        pipeline.transformer.disable_cache()
        pipeline.transformer.transformer_blocks[0].attn._forward_hooks.clear()
    assert ours.computed_steps == calls[0] < steps
    assert psnr(ours.images, theirs) >= 50
    assert np.array_equal(ours.images, theirs)  # bit-exact on CPU fp32
    plain = generate(torch_backends["tiny-dev"], sources["tiny-dev"], request).images
    assert not np.array_equal(plain, ours.images)  # the cache changed something: predicted steps ran


def test_taylorseer_on_onnxruntime_graphs(sources, ort_backends, torch_backends):
    """The same cache around the ONNX Runtime graphs: the same steps computed, the same image within 45 dB."""
    cache = parse_cache("taylorseer:interval=3,warmup=2")
    request = GenerationRequest(PROMPT, height=256, width=256, num_inference_steps=12, seed=1)
    graphs = generate(ort_backends["tiny-dev"], sources["tiny-dev"], request, cache=cache)
    reference = generate(torch_backends["tiny-dev"], sources["tiny-dev"], request, cache=cache)
    assert graphs.computed_steps == reference.computed_steps == 5
    assert psnr(graphs.images, reference.images) >= 45


def test_run_reports_the_computed_steps(tmp_path, sources):
    result = CliRunner().invoke(main, [
        "run", "--model", "tiny-dev", "--prompt", PROMPT, "--steps", "12", "--height", "64", "--width", "64",
        "--cache", "taylorseer:interval=3,warmup=2", "--output", str(tmp_path / "fox.png"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "transformer: computed 5 of 12 steps (taylorseer:interval=3,order=1,warmup=2)" in result.output
    refused = CliRunner().invoke(main, ["run", "--model", "tiny-dev", "--prompt", PROMPT, "--cache", "teacache"])
    assert refused.exit_code == 1
    assert refused.output == "Error: unknown cache 'teacache': choose one of none, taylorseer (--cache)\n"
    assert not (tmp_path / "flux.png").exists()
