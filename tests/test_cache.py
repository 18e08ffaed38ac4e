"""Step caching: `--cache taylorseer` and `--cache first-block` equal diffusers' own hooks (TaylorSeer in lite mode,
First Block Cache) image for image, on the same computed steps, around any backend's transformer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import diffusers_images

from fluxexport.cli import command_line_terms, main
from fluxexport.compare import psnr
from fluxexport.errors import FluxExportError
from fluxexport.runtime.cache import CacheSettings, TaylorSeer, parse_cache
from fluxexport.runtime.pipeline import GenerationRequest, generate

PROMPT = "a red fox in the snow"


def test_cache_settings_parse_with_diffusers_defaults():
    assert str(parse_cache(None)) == "none" and str(parse_cache("none")) == "none"
    assert parse_cache("taylorseer").knobs == {"interval": 5, "order": 1, "warmup": 3}
    assert str(parse_cache("taylorseer:interval=3, warmup=2")) == "taylorseer:interval=3,order=1,warmup=2"
    assert parse_cache("first-block").knobs == {"threshold": 0.05}
    assert str(parse_cache("first-block:threshold=0.2")) == "first-block:threshold=0.2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("magic", "unknown cache 'magic': choose one of none, first-block, taylorseer, magcache, teacache (--cache)"),
        ("first-block:threshold=-1", "first-block threshold must be a number ≥ 0, got -1 (--cache)"),
        ("first-block:interval=2", "first-block has no key 'interval': it takes threshold (--cache)"),
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
    assert error.value.render(command_line_terms()) == message  # as the CLI words it


def test_taylorseer_computes_diffusers_schedule():
    """Full evaluations at the warm-up steps, then every interval-th step (28 steps, defaults: 0,1,2,4,9,…,24)."""
    cache = CacheSettings("taylorseer").new_state()
    assert isinstance(cache, TaylorSeer)
    computed = [step for step in range(28) if cache.computes(step)]
    assert computed == [0, 1, 2, 4, 9, 14, 19, 24]


def _generate_both(cache, config, counted: str, steps: int, batch: int, sources, torch_backends, pipelines):
    """(our result with `cache`, diffusers' images with the same hook `config`, diffusers' full transformer runs:
    calls of the module `counted` inside its transformer, which a skipped or predicted step never reaches)."""
    request = GenerationRequest(
        PROMPT, height=256, width=256, num_inference_steps=steps, seed=1, num_images_per_prompt=batch,
        guidance_scale=3.5,
    )  # fmt: skip
    ours = generate(torch_backends["tiny-dev"], sources["tiny-dev"], request, cache=cache)
    pipeline = pipelines["tiny-dev"]
    module, calls = pipeline.transformer.get_submodule(counted), [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    pipeline.transformer.enable_cache(config)
    try:
        theirs = diffusers_images(pipeline, PROMPT, 256, 256, steps, 1, batch, guidance_scale=3.5)
    finally:
        pipeline.transformer.disable_cache()
        module._forward_hooks.clear()
    return ours, theirs, calls[0]


@pytest.mark.parametrize(
    ("knobs", "steps", "batch"), [({"interval": 3, "order": 1, "warmup": 2}, 12, 1), ({"order": 2}, 9, 2)]
)
def test_taylorseer_equals_diffusers_hook(knobs, steps, batch, sources, torch_backends, diffusers_pipelines):
    from diffusers import TaylorSeerCacheConfig

    cache = CacheSettings("taylorseer", knobs)
    k = cache.knobs
    config = TaylorSeerCacheConfig(
        cache_interval=k["interval"], max_order=k["order"], disable_cache_before_step=k["warmup"], use_lite_mode=True
    )
    ours, theirs, runs = _generate_both(
        cache, config, "transformer_blocks.0.attn", steps, batch, sources, torch_backends, diffusers_pipelines
    )
    assert ours.computed_steps == runs < steps
    assert psnr(ours.images, theirs) >= 50
    assert np.array_equal(ours.images, theirs)  # bit-exact on CPU fp32
    request = GenerationRequest(
        PROMPT, height=256, width=256, num_inference_steps=steps, seed=1, num_images_per_prompt=batch,
        guidance_scale=3.5,
    )  # fmt: skip
    plain = generate(torch_backends["tiny-dev"], sources["tiny-dev"], request).images
    assert not np.array_equal(plain, ours.images)  # the cache changed something: predicted steps ran


@pytest.mark.parametrize(("threshold", "steps", "batch"), [(0.2, 12, 1), (0.5, 12, 1), (0.4, 8, 2)])
def test_first_block_cache_equals_diffusers_hook(threshold, steps, batch, sources, torch_backends, diffusers_pipelines):
    """The transformer in parts (head, tail, out) with diffusers' decisions: the same steps computed, the same
    image bit for bit (counted on the first single block, which a skipped step never reaches)."""
    from diffusers import FirstBlockCacheConfig

    cache = CacheSettings("first-block", {"threshold": threshold})
    ours, theirs, runs = _generate_both(
        cache, FirstBlockCacheConfig(threshold=threshold), "single_transformer_blocks.0.attn", steps, batch, sources,
        torch_backends, diffusers_pipelines,
    )  # fmt: skip
    assert ours.computed_steps == runs < steps
    assert np.array_equal(ours.images, theirs)  # bit-exact on CPU fp32


def test_first_block_parts_equal_the_whole_transformer(sources, torch_backends):
    """head → tail → out computes exactly what the single transformer computes."""
    from fluxexport.specs import component_specs, sample_inputs

    backend, spec = torch_backends["tiny-dev"], component_specs(sources["tiny-dev"])["transformer"]
    feeds = sample_inputs(spec, {"B": 2, "N": 24, "L": 13})
    head = backend.component("transformer_head")(feeds)
    tail = backend.component("transformer_tail")(
        {key: head[key] for key in ("image_hidden", "text_hidden", "temb")}
        | {k: feeds[k] for k in ("img_ids", "txt_ids")}
    )
    out = backend.component("transformer_out")({"image_hidden": tail["tail_hidden"], "temb": head["temb"]})
    assert torch.equal(out["latent"], backend.component("transformer")(feeds)["latent"])


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
    refused = CliRunner().invoke(main, ["run", "--model", "tiny-dev", "--prompt", PROMPT, "--cache", "deepcache"])
    assert refused.exit_code == 1
    assert (
        refused.output
        == "Error: unknown cache 'deepcache': choose one of none, first-block, taylorseer, magcache, teacache (--cache)\n"
    )
    assert not (tmp_path / "flux.png").exists()


def test_validate_compares_images_made_with_the_same_cache(exports, tmp_path):
    import json

    report = tmp_path / "validation.json"
    result = CliRunner().invoke(main, [
        "validate", "--model", "tiny-dev", "--engines", str(exports["tiny-dev"]), "--components", "clip",
        "--steps", "6", "--cache", "taylorseer:interval=2,warmup=2", "--report", str(report),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["cache"] == "taylorseer:interval=2,order=1,warmup=2" and data["passed"] is True


@pytest.fixture(scope="module")
def parts_folder(parts_export):
    """tiny-dev's session export plus the transformer in parts, through `export --transformer-parts` (conftest's
    session `parts_export`, shared with the engine tests)."""
    return parts_export


def test_first_block_cache_on_onnxruntime_graphs(sources, exports, parts_folder, torch_backends):
    """The parts pass the TensorRT check; the cache around them decides as around PyTorch, within 45 dB."""
    from fluxexport.artifacts.folders import open_export
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    assert set(open_export(parts_folder).components) >= {"transformer_head", "transformer_tail", "transformer_out"}
    cache = parse_cache("first-block:threshold=0.2")
    request = GenerationRequest(PROMPT, height=256, width=256, num_inference_steps=12, seed=1, guidance_scale=3.5)
    with OnnxRuntimeBackend(sources["tiny-dev"], parts_folder) as graphs:
        cached = generate(graphs, sources["tiny-dev"], request, cache=cache)
    reference = generate(torch_backends["tiny-dev"], sources["tiny-dev"], request, cache=cache)
    assert cached.computed_steps == reference.computed_steps < 12
    assert psnr(cached.images, reference.images) >= 45
    with pytest.raises(FluxExportError) as error:
        generate(
            OnnxRuntimeBackend(sources["tiny-dev"], exports["tiny-dev"]), sources["tiny-dev"], request, cache=cache
        )
    assert str(error.value).startswith(f"{exports['tiny-dev']} has no transformer_head graph (it has clip, ")
    assert str(error.value).endswith(
        "run fluxexport export --model tiny-dev --dtype fp32 --components transformer_head,transformer_tail,"
        f"transformer_out --out {exports['tiny-dev']} (the parts "
        "--cache first-block, magcache and teacache run)"
    )


def test_first_block_cache_on_engines(sources, parts_folder, parts_engines):
    """Engines of the parts (built by `build`'s own code over the stand-in TensorRT, conftest's session
    `parts_engines`) give the ONNX Runtime image."""
    from helpers import standin_tensorrt
    from standin_tensorrt import HostDevice

    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.tensorrt.backend import TensorRTBackend

    source, engines = sources["tiny-dev"], parts_engines
    cache = parse_cache("first-block:threshold=0.2")
    request = GenerationRequest(PROMPT, height=256, width=256, num_inference_steps=8, seed=2, guidance_scale=3.5)
    with standin_tensorrt() as trt, TensorRTBackend(source, engines, device=HostDevice(trt)) as backend:
        ours = generate(backend, source, request, cache=cache)
    with OnnxRuntimeBackend(source, parts_folder) as graphs:
        expected = generate(graphs, source, request, cache=cache)
    assert ours.computed_steps == expected.computed_steps < 8
    assert np.array_equal(ours.images, expected.images)
