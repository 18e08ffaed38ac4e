"""`--cache teacache` is ali-vilab's TeaCache4FLUX: the same steps computed as the published implementation run on
the same tiny model, the same image (≥ 50 dB), on PyTorch, ONNX Runtime and the stand-in TensorRT engines, and in
the Triton pipeline's cache parsing.

The oracle (`teacache_reference`) is the logic of `TeaCache4FLUX/teacache_flux.py` in github.com/ali-vilab/TeaCache
(Apache-2.0), `teacache_forward`, rewritten here only to call the installed diffusers' FluxTransformer2DModel
(whose single blocks take and return the two streams apart): the first block's `norm1` of the embedded image with
the time embedding, its relative L1 change rescaled by np.poly1d(coefficients) and accumulated, compute at the
first and last step or when the accumulation reaches the threshold, else add the previous residual."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from helpers import diffusers_images
from test_cache import PROMPT

from fluxexport.cli import command_line_terms
from fluxexport.compare import psnr
from fluxexport.errors import FluxExportError, RequestError
from fluxexport.runtime.cache import CacheSettings, parse_cache
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.runtime.teacache import COEFFICIENTS, TeaCache, TeaCacheDecisions

STEPS = 10
THRESHOLD = 0.6  # on tiny-dev's random weights this skips some steps and computes others


def teacache_reference(transformer, threshold: float, steps: int, coefficients) -> list[bool]:
    """Patch `transformer` (a diffusers FluxTransformer2DModel) with TeaCache4FLUX's forward; returns the list its
    decisions are appended to (True: the blocks ran). Undo with `del transformer.forward`."""
    state = {"cnt": 0, "accumulated": 0.0, "previous_modulated": None, "previous_residual": None}
    decisions: list[bool] = []
    rescale = np.poly1d(coefficients)

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None, return_dict=True, **_):  # fmt: skip
        hidden_states = self.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        guidance = guidance.to(hidden_states.dtype) * 1000 if guidance is not None else None
        temb = (self.time_text_embed(timestep, pooled_projections) if guidance is None
                else self.time_text_embed(timestep, guidance, pooled_projections))  # fmt: skip
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        rotary = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        modulated = self.transformer_blocks[0].norm1(hidden_states.clone(), emb=temb.clone())[0]
        if state["cnt"] == 0 or state["cnt"] == steps - 1:
            should_calc, state["accumulated"] = True, 0
        else:
            previous = state["previous_modulated"]
            state["accumulated"] += rescale(((modulated - previous).abs().mean() / previous.abs().mean()).cpu().item())
            should_calc = not state["accumulated"] < threshold
            if should_calc:
                state["accumulated"] = 0
        state["previous_modulated"] = modulated
        state["cnt"] = (state["cnt"] + 1) % steps
        decisions.append(should_calc)
        if not should_calc:
            hidden_states = hidden_states + state["previous_residual"]
        else:
            original = hidden_states.clone()
            for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                    image_rotary_emb=rotary,
                )  # fmt: skip
            state["previous_residual"] = hidden_states - original
        output = self.proj_out(self.norm_out(hidden_states, temb))
        return (output,) if not return_dict else types.SimpleNamespace(sample=output)

    transformer.forward = types.MethodType(forward, transformer)
    return decisions


def test_teacache_settings_parse_and_refuse_in_one_line():
    cache = parse_cache("teacache")
    assert cache.knobs == {"threshold": 0.25, "coefficients": "flux1-dev"} and cache.components[0] == "transformer_head"
    assert str(parse_cache("teacache:threshold=0.4")) == "teacache:threshold=0.4,coefficients=flux1-dev"
    assert COEFFICIENTS["flux1-dev"][0] == (
        4.98651651e02,
        -2.83781631e02,
        5.58554382e01,
        -3.82021401e00,
        2.64230861e-01,
    )
    cases = {
        "teacache:threshold=-0.1": "teacache threshold must be a number ≥ 0, got -0.1 (--cache)",
        "teacache:coefficients=flux9": "teacache has no coefficients 'flux9' (no such set or file): choose one of "
        "flux1-dev, or a file written by fluxexport calibrate-teacache --model MODEL --out FILE (--cache)",
        "teacache:interval=2": "teacache has no key 'interval': it takes threshold, coefficients (--cache)",
    }
    for text, message in cases.items():
        with pytest.raises(RequestError) as error:
            parse_cache(text)
        assert error.value.render(command_line_terms()) == message
    with pytest.raises(FluxExportError, match=r"^teacache needs the run's step count"):
        parse_cache("teacache").new_state()


def test_teacache_decisions_follow_the_published_rule():
    """First and last step compute; in between the rescaled distances accumulate until the threshold, which resets
    the sum; the distance is always to the previous step's input, skipped or not."""
    decide = TeaCacheDecisions(threshold=1.0, steps=6, polynomial=(1.0, 0.0))  # rescale(x) = x
    inputs = [torch.full((1, 2, 2), value) for value in (1.0, 1.5, 1.8, 1.0, 1.1, 1.1)]
    # distances 0.5, 0.2, 0.444…, 0.1: sums 0.5 (skip), 0.7 (skip), 1.144 (compute, reset), then the last step
    assert [decide.computes(x) for x in inputs] == [True, False, False, True, False, True]


@pytest.fixture(scope="module")
def reference(sources, diffusers_pipelines):
    """(the published TeaCache's decisions, its images) on tiny-dev, PROMPT at 256², seed 1."""
    pipeline = diffusers_pipelines["tiny-dev"]
    decisions = teacache_reference(pipeline.transformer, THRESHOLD, STEPS, COEFFICIENTS["flux1-dev"][0])
    try:
        images = diffusers_images(pipeline, PROMPT, 256, 256, STEPS, 1, guidance_scale=3.5)
    finally:
        del pipeline.transformer.forward
    return decisions, images


def _request() -> GenerationRequest:
    return GenerationRequest(PROMPT, height=256, width=256, num_inference_steps=STEPS, seed=1, guidance_scale=3.5)


def _ours(backend, source) -> tuple[TeaCache, np.ndarray]:
    state = CacheSettings("teacache", {"threshold": THRESHOLD}).new_state(STEPS)
    assert isinstance(state, TeaCache)
    images = generate(backend, source, _request(), cache=state).images
    return state, images


def test_teacache_equals_the_published_implementation(reference, sources, torch_backends):
    decisions, theirs = reference
    assert 2 < sum(decisions) < STEPS, decisions  # the threshold skips some steps and computes others
    state, ours = _ours(torch_backends["tiny-dev"], sources["tiny-dev"])
    assert state.decisions == decisions and state.computed == sum(decisions)
    assert psnr(ours, theirs) >= 50


def test_teacache_on_exported_parts_and_stand_in_engines(reference, sources, parts_export, parts_engines):
    from helpers import standin_tensorrt
    from standin_tensorrt import HostDevice

    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.tensorrt.backend import TensorRTBackend

    decisions, theirs = reference
    source = sources["tiny-dev"]
    with standin_tensorrt() as trt:
        for backend in (
            OnnxRuntimeBackend(source, parts_export),
            TensorRTBackend(source, parts_engines, device=HostDevice(trt)),
        ):
            with backend:
                state, ours = _ours(backend, source)
            assert state.decisions == decisions, backend.name
            assert psnr(ours, theirs) >= 50, backend.name


def test_teacache_refuses_a_head_exported_before_it():
    """A head graph without the modulated input (exported before TeaCache) is refused in one line."""
    old_head = {"first_block_residual": torch.zeros(1, 4, 8), "image_hidden": torch.zeros(1, 4, 8)}
    state = CacheSettings("teacache").new_state(STEPS)
    with pytest.raises(FluxExportError, match=r"^the transformer_head graph has no first_block_modulated output"):
        state({}, lambda name: lambda feeds: old_head)


def test_teacache_refuses_an_old_head_before_the_first_step(sources):
    """A backend whose head declares its outputs without the modulated input (an export from before TeaCache) is
    refused in one line when the run starts: the head never runs, no step is taken; other caches still run it."""
    from fluxexport.pytorch.backend import TorchBackend

    source = sources["tiny-dev"]
    backend = TorchBackend(source, device="cpu")
    inner, calls = backend.component, []

    def old_head(feeds):
        calls.append("head")
        return {k: v for k, v in inner("transformer_head")(feeds).items() if k != "first_block_modulated"}

    old_head.output_names = ["image_hidden", "text_hidden", "temb", "first_block_residual", "image_embedded"]
    backend.component = lambda name: old_head if name == "transformer_head" else inner(name)
    steps: list[int] = []
    request = GenerationRequest(PROMPT, height=128, width=128, num_inference_steps=3, seed=0)
    with pytest.raises(FluxExportError) as error:
        generate(
            backend, source, request, on_step=lambda step, total: steps.append(step), cache=parse_cache("teacache")
        )
    assert str(error.value) == (
        "the transformer_head graph has no first_block_modulated output (exported before TeaCache): export the "
        "transformer's parts again (fluxexport export --components transformer_head,transformer_tail,"
        "transformer_out) or use another cache"
    )
    assert calls == [] and steps == []
    generate(backend, source, request, cache=parse_cache("first-block"))
    assert calls == ["head"] * 3


def test_teacache_in_the_triton_pipeline_cache_input(tmp_path, monkeypatch):
    """The Triton pipeline parses its `cache` input as `run --cache`: teacache and its refusals travel."""
    import sys

    from test_triton_flux2 import standin_pb_utils

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", standin_pb_utils())
    from fluxexport.triton.templates.flux_pipeline import served_cache

    assert str(served_cache("teacache:threshold=0.4", tmp_path)) == "teacache:threshold=0.4,coefficients=flux1-dev"
    with pytest.raises(RequestError, match="teacache has no coefficients 'x'"):
        served_cache("teacache:coefficients=x", tmp_path)


def _host_reads(backend, source, cache: str, steps: int) -> int:
    """How often a generation reads a device value back to the host (`item`, `bool`, `float`, `int`, `tolist`)."""
    state = parse_cache(cache).new_state(steps)  # MagCache's schedule is computed here, from host numbers
    reads = [0]
    patch = pytest.MonkeyPatch()
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads[0] += 1
            return _original(self, *args, **kwargs)

        patch.setattr(torch.Tensor, name, counted)
    request = GenerationRequest(PROMPT, height=64, width=64, num_inference_steps=steps, seed=1, guidance_scale=3.5)
    try:
        generate(backend, source, request, cache=state)
    finally:
        patch.undo()
    return reads[0]


def test_parts_engines_replay_cuda_graphs_and_read_the_host_once_per_step(sources, parts_engines):
    """On the (stand-in) TensorRT engines of the parts, each part's repeated shape is captured and replayed as the
    single transformer's is, and a step reads nothing back to the host but TeaCache's one decision (MagCache, whose
    schedule is known before the first step, reads nothing per step)."""
    from helpers import standin_tensorrt
    from standin_tensorrt import HostDevice

    from fluxexport.specs import TRANSFORMER_PARTS
    from fluxexport.tensorrt.backend import TensorRTBackend

    source = sources["tiny-dev"]
    with standin_tensorrt() as trt:
        backend = TensorRTBackend(source, parts_engines, device=HostDevice(trt))
        reads = {(cache, steps): _host_reads(backend, source, cache, steps)
                 for cache in ("magcache:ratios=flux-dev", "teacache:threshold=0.6") for steps in (4, 8)}  # fmt: skip
        assert trt.state.replays > 0 and trt.state.stale_replays == 0 and trt.state.failed_captures == 0
        for name in TRANSFORMER_PARTS:
            assert len(backend.runners[name].captured) == 1, name  # one shape, captured on a context of its own
        backend.close()
    assert reads[("magcache:ratios=flux-dev", 8)] == reads[("magcache:ratios=flux-dev", 4)]
    # TeaCache: one distance per step between the first and the last (8 − 2 against 4 − 2)
    assert reads[("teacache:threshold=0.6", 8)] - reads[("teacache:threshold=0.6", 4)] == 4


@pytest.mark.parametrize("model", ["tiny-dev", "tiny-flux2-dev"])
def test_the_heads_modulated_input_is_what_the_first_blocks_attention_takes(model, sources, flux2_sources,
                                                                          diffusers_pipelines, flux2_pipelines):  # fmt: skip
    """The head's `first_block_modulated` is the image input of the first block's attention in diffusers' own
    forward (FLUX.1: `norm1` with the time embedding; FLUX.2: `norm1` with the attention's shift and scale)."""
    from fluxexport.specs import component_specs, sample_inputs

    source = (sources | flux2_sources)[model]
    transformer = (diffusers_pipelines | flux2_pipelines)[model].transformer
    adapters = source.family.part("adapters")
    spec = component_specs(source)["transformer_head"]
    feeds = sample_inputs(spec, spec.export_sizes, seed=3)
    seen = []
    hook = transformer.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda _module, args, kwargs: seen.append(kwargs["hidden_states"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            whole = adapters.wrap("transformer", transformer, source.guidance_embeds, False, ())
            whole(**feeds)
            head = adapters.wrap("transformer_head", transformer, source.guidance_embeds, False, ())
            outputs = dict(zip([t.name for t in spec.outputs], head(**feeds), strict=True))
    finally:
        hook.remove()
    assert torch.equal(outputs["first_block_modulated"], seen[0])


def test_teacache_on_flux2_parts_in_onnxruntime(flux2_sources, flux2_parts_export):
    """FLUX.2 (tiny-klein): the exported parts decide as PyTorch does and give its image (≥ 50 dB), skipping steps
    between the first and the last; under true CFG (tiny-klein-base) the unconditional run decides on its own."""
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.pytorch.backend import TorchBackend

    request = GenerationRequest("a red fox", height=128, width=128, num_inference_steps=8, seed=1)
    source = flux2_sources["tiny-klein"]
    results = []
    for backend in (TorchBackend(source, device="cpu"), OnnxRuntimeBackend(source, flux2_parts_export)):
        state = parse_cache("teacache:threshold=0.6").new_state(8)
        results.append((generate(backend, source, request, cache=state).images, state.decisions))
    (theirs, reference), (ours, decisions) = results
    assert decisions == reference and decisions[0] and decisions[-1] and 2 <= sum(decisions) < 8, decisions
    assert psnr(ours, theirs) >= 50
    base = flux2_sources["tiny-klein-base"]
    guided = GenerationRequest("a red fox", height=128, width=128, num_inference_steps=8, seed=1,
                               negative_prompt="blurry", guidance_scale=4.0)  # fmt: skip
    state = parse_cache("teacache:threshold=0.6").new_state(8)
    result = generate(TorchBackend(base, device="cpu"), base, guided, cache=state)
    assert len(state.decisions) == 8 and result.computed_steps == sum(state.decisions) < 8


@pytest.mark.slow  # a calibration and generations end to end (several seconds): not in the quick loop
def test_calibrate_teacache_fits_the_recorded_pairs_and_the_file_serves_only_its_model(flux2_sources, tmp_path):
    """calibrate-teacache on tiny-klein (PyTorch parts, 6 steps, two seeds) writes ali-vilab's fit, numpy.polyfit
    of degree 4 over every recorded (input change, output change), with its provenance; the file runs tiny-klein
    without the FLUX.1-dev warning, and another model is refused in one line."""
    import dataclasses
    import json

    from fluxexport.commands.calibrate_teacache import TeaCalibrateOptions, calibrate_teacache
    from fluxexport.commands.common import ModelOptions
    from fluxexport.pytorch.backend import TorchBackend

    out = tmp_path / "klein.teacache.json"
    options = TeaCalibrateOptions(
        out=out, prompts=("a red fox",), seeds=(1, 2), model=ModelOptions("tiny-klein"), steps=6,
        height=128, width=128,
    )  # fmt: skip
    with pytest.raises(RequestError) as error:  # refused before any weight is read
        calibrate_teacache(dataclasses.replace(options, steps=4, seeds=(1,)))
    assert error.value.render(command_line_terms()) == (
        "1 run(s) of 4 steps give 3 step pairs, too few to fit a degree-4 polynomial: calibrate with at least 6 "
        "steps, or more --seed runs (--steps)"
    )
    assert not out.exists()
    result = calibrate_teacache(options)
    data = json.loads(out.read_text())
    assert len(result.pairs) == 2 * (6 - 1) and all(x > 0 and y > 0 for x, y in result.pairs)
    assert data["pairs"] == [list(pair) for pair in result.pairs]
    inputs, outputs = np.array(data["pairs"]).T
    np.testing.assert_allclose(data["coefficients"], np.polyfit(inputs, outputs, 4), rtol=1e-12)
    assert {key: data[key] for key in ("model", "steps", "prompts", "seeds", "fluxexport_version")} == {
        "model": "tiny-klein", "steps": 6, "prompts": ["a red fox"], "seeds": [1, 2],
        "fluxexport_version": __import__("fluxexport").__version__,
    }  # fmt: skip
    assert data["transformer_class"] == "Flux2Transformer2DModel" and data["date"].startswith("20")

    source = flux2_sources["tiny-klein"]
    request = GenerationRequest("a red fox", height=128, width=128, num_inference_steps=6, seed=1)
    backend = TorchBackend(source, device="cpu")
    calibrated = generate(backend, source, request, cache=parse_cache(f"teacache:coefficients={out}"))
    published = generate(backend, source, request, cache=parse_cache("teacache"))
    assert not any("teacache" in line for line in calibrated.warnings)
    assert [line for line in published.warnings if "teacache" in line] == [
        "teacache: tiny-klein (Flux2Transformer2DModel) runs with flux1-dev's polynomial (fitted on "
        "FluxTransformer2DModel); fit its own with fluxexport calibrate-teacache --model tiny-klein --out FILE and "
        "pass --cache teacache:coefficients=FILE"
    ]
    base = flux2_sources["tiny-klein-base"]
    with pytest.raises(RequestError) as error:
        generate(TorchBackend(base, device="cpu"), base, request, cache=parse_cache(f"teacache:coefficients={out}"))
    assert error.value.render(command_line_terms()) == (
        f"teacache coefficients file {out} was calibrated on tiny-klein, not tiny-klein-base: fit tiny-klein-base's "
        "own with fluxexport calibrate-teacache --model tiny-klein-base --out FILE and pass coefficients=FILE (--cache)"
    )
