"""Step caches on FLUX.2: `--cache first-block`, `taylorseer` and `magcache` equal diffusers' hooks on
Flux2KleinPipeline ([klein] distilled, and base with true CFG) and Flux2Pipeline ([dev]) image for image, on the
same computed steps; the transformer's three parts equal the whole one and hold each weight once; exported parts
run in ONNX Runtime, as stand-in TensorRT engines, in FP8 and with LoRAs swapped in.

Two gaps in diffusers 0.42 that the oracle bridges (both are the hooks' plumbing, never their decisions or math):
- its First Block Cache fails on FLUX.2 (`TypeError: unsupported operand type(s) for -: 'Tensor' and 'list'`,
  huggingface/diffusers#14280, open PR #14359): the first (double) block keeps the streams apart, the last
  (single) block returns them joined. `_fbc_bridge` hands the hook's state from one layout to the other, as that
  PR does in the model: the tail residual is the joined stream's difference, split back per stream;
- Flux2Pipeline calls its transformer outside any cache context, which the hooks need ("No cache context is
  set"): the oracle runs it inside `cache_context("cond")`, as Flux2KleinPipeline does itself.
"""

from __future__ import annotations

import ast
import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_flux2 import diffusers_flux2

from fluxexport.cli import main
from fluxexport.compare import psnr
from fluxexport.errors import RequestError
from fluxexport.runtime.cache import CacheSettings, StepCache, parse_cache
from fluxexport.runtime.magcache import write_ratios
from fluxexport.runtime.pipeline import GenerationRequest, calibrate_mag_ratios, generate
from fluxexport.runtime.step_cache import tail_feeds
from fluxexport.specs import TRANSFORMER_PARTS, component_specs, sample_inputs

PROMPT = "a red fox in the snow"
STEPS, HEIGHT, WIDTH = 10, 128, 160  # 80 image tokens: a size no export sample has
# diffusers' hook counted per transformer call: every full evaluation reaches the first single block
COUNTED = "single_transformer_blocks.0.attn"


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).double().norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def backends(flux2_sources):
    from fluxexport.pytorch.backend import TorchBackend

    return {name: TorchBackend(source, device="cpu") for name, source in flux2_sources.items()}


def _request(steps: int = STEPS, batch: int = 1) -> GenerationRequest:
    return GenerationRequest(
        PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=steps, seed=1, num_images_per_prompt=batch,
        guidance_scale=4.0,
    )  # fmt: skip


def through_parts(component, feeds: dict) -> torch.Tensor:
    """head → tail → out, as the caches compute a step they do not skip."""
    head = component("transformer_head")(feeds)
    tail = component("transformer_tail")(tail_feeds(head, feeds))
    return component("transformer_out")({"image_hidden": tail["tail_hidden"], "temb": head["temb"]})["latent"]


# --- the parts ---------------------------------------------------------------------------------------------------


def test_flux2_parts_specs(flux2_sources):
    """FLUX.1's names where a tensor means the same; the head also gives the double blocks' modulation vectors
    (shift, scale, gate of attention and MLP per stream), which the tail takes."""
    specs = component_specs(flux2_sources["tiny-flux2-dev"])
    assert tuple(specs)[-3:] == TRANSFORMER_PARTS
    head, tail, out = (specs[name] for name in TRANSFORMER_PARTS)
    assert head.inputs == specs["transformer"].inputs and "guidance" in [t.name for t in head.inputs]
    assert {t.name: t.dims for t in head.outputs} == {
        "first_block_residual": ("B", "N", 32), "image_hidden": ("B", "N", 32), "text_hidden": ("B", "L", 32),
        "temb": ("B", 32), "image_embedded": ("B", "N", 32), "first_block_modulated": ("B", "N", 32),
        "image_modulation": ("B", 192),
        "text_modulation": ("B", 192),
    }  # fmt: skip
    assert [t.name for t in tail.inputs] == [
        "image_hidden", "text_hidden", "temb", "image_modulation", "text_modulation", "img_ids", "txt_ids"
    ]  # fmt: skip
    assert tail.input("img_ids").dims == ("N", 4) and [t.name for t in tail.outputs] == ["tail_hidden"]
    assert [t.name for t in out.inputs] == ["image_hidden", "temb"] and out.outputs[0].dims == ("B", "N", 128)
    assert head.axes == specs["transformer"].axes == tail.axes


def _random_transformer():
    """A random FLUX.2 transformer with two double and two single blocks (the tiny variants have one of each), with
    the guidance embedding."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    ).eval()  # fmt: skip


def _random_feeds(batch=2, tokens=20, text=9, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, 8, (n, 4), generator=generator).float()  # noqa: E731
    return {
        "hidden_states": torch.randn(batch, tokens, 16, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text, 24, generator=generator),
        "timestep": torch.rand(batch, generator=generator),
        "img_ids": ids(tokens),
        "txt_ids": ids(text),
        "guidance": torch.full((batch,), 4.0),
    }


def _adapter_components(model, float32_rope: bool, specs):
    """The parts of `model` as components by name (what a backend's `component` gives), through the adapters."""
    from fluxexport.adapters import named_outputs
    from fluxexport.families.flux2 import adapters as FLUX2_ADAPTERS

    adapters = {name: FLUX2_ADAPTERS.wrap(name, model, True, float32_rope, ()) for name in TRANSFORMER_PARTS}

    def component(name):
        def run(feeds):
            with torch.inference_mode():
                result = adapters[name](*(feeds[t.name] for t in specs[name].inputs if t.name in feeds))
            return named_outputs(specs[name], result)

        return run

    return component


def test_parts_equal_the_whole_transformer(flux2_sources, backends):
    """head → tail → out computes exactly what the transformer computes: the tiny variants through the PyTorch
    backend, and a transformer with two double and two single blocks (the tail's double blocks run) through the
    adapters, diffusers' RoPE and float32 RoPE (what is exported) alike."""
    from fluxexport.families.flux2 import adapters as FLUX2_ADAPTERS

    for variant in ("tiny-klein", "tiny-flux2-dev"):
        spec = component_specs(flux2_sources[variant])["transformer"]
        for sizes in ({"B": 2, "N": 24, "L": 13}, {"B": 1, "N": 80, "L": 40}):
            feeds = sample_inputs(spec, sizes)
            component = backends[variant].component
            assert torch.equal(through_parts(component, feeds), component("transformer")(feeds)["latent"])
    model, specs = _random_transformer(), component_specs(flux2_sources["tiny-flux2-dev"])  # names with guidance
    for float32_rope in (False, True):
        whole = FLUX2_ADAPTERS.wrap("transformer", model, True, float32_rope, ())
        component = _adapter_components(model, float32_rope, specs)
        for seed, (batch, tokens, text) in enumerate([(2, 20, 9), (1, 33, 5)]):
            feeds = _random_feeds(batch, tokens, text, seed)
            with torch.inference_mode():
                expected = whole(**feeds)
                if not float32_rope:
                    assert torch.equal(expected, model(**feeds, return_dict=False)[0])
            assert torch.equal(through_parts(component, feeds), expected)


def test_each_weight_lives_in_one_part(flux2_sources):
    """The parameters each part's forward reads: the head the embedders, the time embedding, the double blocks'
    modulations and the first block; the tail the other blocks and the single blocks' modulation; the output part
    norm_out and proj_out. No parameter in two parts, none in no part."""
    model, specs = _random_transformer(), component_specs(flux2_sources["tiny-flux2-dev"])
    component, owners = _adapter_components(model, False, specs), dict(model.named_modules())
    feeds, read = _random_feeds(), {}
    for part in TRANSFORMER_PARTS:
        ran: set[str] = set()
        hooks = [
            module.register_forward_pre_hook(lambda _module, _args, name=name, ran=ran: ran.add(name))
            for name, module in owners.items()
            if any(True for _ in module.parameters(recurse=False))
        ]
        outputs = component(part)(feeds)
        for hook in hooks:
            hook.remove()
        feeds |= outputs
        if "tail_hidden" in outputs:  # the output layers take the stream after the tail
            feeds["image_hidden"] = outputs["tail_hidden"]
        read[part] = {f"{name}.{key}" for name in ran for key, _ in owners[name].named_parameters(recurse=False)}
    everything = {name for name, _ in model.named_parameters()}
    assert sum(len(names) for names in read.values()) == len(everything)
    assert set().union(*read.values()) == everything
    tops = {part: sorted({name.split(".")[0] for name in names}) for part, names in read.items()}
    assert tops == {
        "transformer_head": ["context_embedder", "double_stream_modulation_img", "double_stream_modulation_txt",
                             "time_guidance_embed", "transformer_blocks", "x_embedder"],
        "transformer_tail": ["single_stream_modulation", "single_transformer_blocks", "transformer_blocks"],
        "transformer_out": ["norm_out", "proj_out"],
    }  # fmt: skip
    blocks = {part: {name.split(".")[1] for name in names if name.startswith("transformer_blocks.")}
              for part, names in read.items()}  # fmt: skip
    assert blocks == {"transformer_head": {"0"}, "transformer_tail": {"1"}, "transformer_out": set()}


# --- parity with diffusers' hooks --------------------------------------------------------------------------------


class Recorded(StepCache):
    """A step cache that notes, transformer call by call (both CFG runs, in order), whether the cache it wraps
    computed the full transformer; its CFG branch writes to the same log."""

    def __init__(self, inner: StepCache, log: list[bool]) -> None:
        super().__init__()
        self.inner, self.log, self.name, self.components = inner, log, inner.name, inner.components

    def __call__(self, feeds, component):
        before = self.inner.computed
        outputs = self.inner(feeds, component)
        self.log.append(self.inner.computed > before)
        self.steps, self.computed = self.inner.steps, self.inner.computed
        return outputs

    def branch(self) -> StepCache:
        return Recorded(self.inner.branch(), self.log)


def _fbc_bridge(transformer) -> list:
    """Torch forward hooks that let diffusers' First Block Cache run on FLUX.2 (see the module docstring): after the
    first block, the hook's saved block output becomes the joined [text, image] stream the last block returns;
    after the last block, the tail residual (of the joined stream) is split back into (image, text)."""
    from diffusers.hooks import HookRegistry

    head, tail = transformer.transformer_blocks[0], transformer.single_transformer_blocks[-1]
    hook = HookRegistry.check_if_exists_or_initialize(head).get_hook("fbc_leader_block_hook")
    text_length = [0]

    def joined(_module, _args, output):
        state = hook.state_manager.get_state()
        text_length[0] = output[0].shape[1]
        if isinstance(state.head_block_output, list):  # a computed step: (image, text) as the hook saved them
            image, text = state.head_block_output
            state.head_block_output = torch.cat([text, image], dim=1)

    def split(_module, _args, _output):
        state = hook.state_manager.get_state()
        if state.should_compute:
            residual, _ = state.tail_block_residuals
            state.tail_block_residuals = (residual[:, text_length[0] :], residual[:, : text_length[0]])

    return [head.register_forward_hook(joined), tail.register_forward_hook(split)]


def _diffusers_run(pipeline, config, steps: int = STEPS, batch: int = 1) -> tuple[np.ndarray, list[bool]]:
    """diffusers' images with the hook `config` on, and per transformer call (in order) whether it reached the
    first single block (a skipped or predicted call never does)."""
    from diffusers import FirstBlockCacheConfig, Flux2Pipeline

    transformer, log = pipeline.transformer, []
    hooks = [
        transformer.register_forward_pre_hook(lambda *_: log.append(False)),
        transformer.get_submodule(COUNTED).register_forward_hook(lambda *_: log.__setitem__(-1, True)),
    ]
    transformer.enable_cache(config)
    if isinstance(config, FirstBlockCacheConfig):
        hooks += _fbc_bridge(transformer)
    context = transformer.cache_context("cond") if isinstance(pipeline, Flux2Pipeline) else contextlib.nullcontext()
    try:
        with context:
            images = diffusers_flux2(
                pipeline, PROMPT, 1, height=HEIGHT, width=WIDTH, num_inference_steps=steps, guidance_scale=4.0,
                num_images_per_prompt=batch,
            )  # fmt: skip
    finally:
        transformer.disable_cache()
        for hook in hooks:
            hook.remove()
    return images, log


def _compare(variant, cache, config, flux2_sources, backends, flux2_pipelines, steps=STEPS, batch=1):
    """(our result, our log, diffusers' images, diffusers' log) of the same request with the same cache."""
    source, log = flux2_sources[variant], []
    state = Recorded(cache.new_state(steps), log)
    ours = generate(backends[variant], source, _request(steps, batch), cache=state)
    theirs, their_log = _diffusers_run(flux2_pipelines[variant], config, steps, batch)
    return ours, log, theirs, their_log


def _check(ours, log, theirs, their_log, source, steps=STEPS):
    assert log == their_log  # the same calls computed, both CFG runs
    runs = 2 if source.uses_true_cfg else 1
    assert len(log) == runs * steps and 0 < ours.computed_steps < steps
    assert ours.computed_steps == sum(log[::runs])  # the conditional run's
    assert np.array_equal(ours.images, theirs)  # bit-exact on CPU fp32


@pytest.mark.parametrize(
    ("variant", "threshold", "batch"),
    [("tiny-klein", 1.0, 1), ("tiny-klein", 0.8, 2), ("tiny-klein-base", 1.0, 1), ("tiny-flux2-dev", 0.5, 1)],
)
def test_first_block_cache_equals_diffusers_hook(variant, threshold, batch, flux2_sources, backends, flux2_pipelines):
    from diffusers import FirstBlockCacheConfig

    cache = CacheSettings("first-block", {"threshold": threshold})
    results = _compare(variant, cache, FirstBlockCacheConfig(threshold=threshold), flux2_sources, backends,
                       flux2_pipelines, batch=batch)  # fmt: skip
    _check(*results, flux2_sources[variant])


@pytest.mark.parametrize(
    ("variant", "knobs"),
    [("tiny-klein", {"interval": 3, "warmup": 2}), ("tiny-klein-base", {"order": 2}), ("tiny-flux2-dev", {})],
)
def test_taylorseer_equals_diffusers_hook(variant, knobs, flux2_sources, backends, flux2_pipelines):
    from diffusers import TaylorSeerCacheConfig

    cache = CacheSettings("taylorseer", knobs)
    k = cache.knobs
    config = TaylorSeerCacheConfig(
        cache_interval=k["interval"], max_order=k["order"], disable_cache_before_step=k["warmup"], use_lite_mode=True
    )
    _check(*_compare(variant, cache, config, flux2_sources, backends, flux2_pipelines), flux2_sources[variant])


@pytest.fixture(scope="module")
def calibrated(flux2_sources, backends) -> dict[str, list[float]]:
    """Each variant's MagCache ratios, measured by our runtime on the parity request (all steps computed)."""
    return {name: calibrate_mag_ratios(backends[name], source, _request()) for name, source in flux2_sources.items()}


@pytest.mark.parametrize("variant", ["tiny-klein", "tiny-klein-base", "tiny-flux2-dev"])
def test_calibration_equals_diffusers_calibrate_mode(variant, calibrated, flux2_pipelines, capsys):
    """Our ratios are those diffusers' calibrate mode prints (the conditional run's first, under true CFG)."""
    from diffusers import MagCacheConfig

    capsys.readouterr()
    _diffusers_run(flux2_pipelines[variant], MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    printed = capsys.readouterr().out.split("MagCacheConfig(mag_ratios=...):")[1].strip().splitlines()[0]
    assert len(calibrated[variant]) == STEPS and calibrated[variant][0] == 1.0
    assert calibrated[variant] == ast.literal_eval(printed)  # to the bit on CPU fp32


@pytest.mark.parametrize(
    ("variant", "threshold"), [("tiny-klein", 0.3), ("tiny-klein-base", 1.0), ("tiny-flux2-dev", 0.3)]
)
def test_magcache_equals_diffusers_hook(variant, threshold, calibrated, flux2_sources, backends, flux2_pipelines,
                                        tmp_path):  # fmt: skip
    """Our calibrated ratios in both (from a file for ours, as `run` reads them)."""
    from diffusers import MagCacheConfig

    path = write_ratios(tmp_path / "ratios.json", calibrated[variant])
    cache = CacheSettings("magcache", {"ratios": str(path), "threshold": threshold}, steps=STEPS)
    config = MagCacheConfig(mag_ratios=calibrated[variant], threshold=threshold, num_inference_steps=STEPS)
    _check(*_compare(variant, cache, config, flux2_sources, backends, flux2_pipelines), flux2_sources[variant])


def test_flux1_ratios_are_refused_for_flux2(flux2_sources, backends):
    with pytest.raises(RequestError) as error:
        generate(backends["tiny-klein"], flux2_sources["tiny-klein"], _request(), cache=parse_cache("magcache:ratios=flux-dev"))  # fmt: skip
    from fluxexport.cli import command_line_terms

    assert error.value.render(command_line_terms()) == (  # as the CLI words it
        "magcache ratios=flux-dev are FLUX.1-dev's, not tiny-klein's: measure its own with fluxexport "
        "calibrate-magcache --model tiny-klein --prompt TEXT --out FILE and pass ratios=FILE (--cache)"
    )


def _invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


@pytest.mark.slow  # a calibration and generations end to end (several seconds): not in the quick loop
def test_cli_calibrates_and_runs_flux2_with_a_cache(calibrated, flux2_sources, tmp_path):
    """`calibrate-magcache` writes the ratios `calibrate_mag_ratios` measures; `run` reports the computed steps."""
    out = tmp_path / "klein.json"
    result = _invoke("calibrate-magcache", "--model", "tiny-klein", "--prompt", PROMPT, "--steps", STEPS, "--height",
                     HEIGHT, "--width", WIDTH, "--seed", 1, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["ratios"] == calibrated["tiny-klein"]
    for cache, computed in ((f"magcache:threshold=0.3,ratios={out}", None), ("taylorseer:interval=3,warmup=2", 5)):
        result = _invoke("run", "--model", "tiny-klein", "--prompt", PROMPT, "--steps", STEPS, "--height", HEIGHT,
                         "--width", WIDTH, "--seed", 1, "--cache", cache, "--output", tmp_path / "fox.png")  # fmt: skip
        assert result.exit_code == 0, result.output
        summary = "".join(result.output.split())  # the console wraps long lines, even inside a path
        ran = int(summary.split("transformer:computed")[1].split("of")[0])
        assert f"transformer:computed{ran}of{STEPS}steps({parse_cache(cache)})" in summary
        assert 0 < ran < STEPS and ran == (computed or ran)


# --- exported parts ----------------------------------------------------------------------------------------------


def test_exported_parts_hold_the_transformers_weights_once(flux2_parts_export):
    """The checkpoint tensors behind the parts' initializers: disjoint, and together every one the transformer graph
    holds (the exporter's optimizer keeps one of several equal tensors, such as the tiny model's all-ones norm
    weights, so one graph may name fewer)."""
    from helpers import manifest_json

    graphs = manifest_json(flux2_parts_export)["components"]
    held = {name: {origin["tensor"] for origin in graphs[name]["weights"].values()} for name in TRANSFORMER_PARTS}
    assert sum(len(tensors) for tensors in held.values()) == len(set().union(*held.values()))
    assert set().union(*held.values()) >= {origin["tensor"] for origin in graphs["transformer"]["weights"].values()}
    assert "single_stream_modulation.linear.weight" in held["transformer_tail"]
    assert {"double_stream_modulation_img.linear.weight", "double_stream_modulation_txt.linear.weight"} <= held[
        "transformer_head"
    ]


def test_exported_parts_run_the_caches_in_onnxruntime(flux2_sources, flux2_parts_export, backends, tmp_path):
    """At shapes the export never saw: the parts chained equal the transformer graph; each cache decides as around
    PyTorch, and its image is within 40 dB of PyTorch's (measured 96 dB for both)."""
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    source = flux2_sources["tiny-klein"]
    spec = component_specs(source)["transformer"]
    with OnnxRuntimeBackend(source, flux2_parts_export) as graphs:
        for seed, sizes in enumerate([{"B": 1, "N": 80, "L": 40}, {"B": 3, "N": 64, "L": 7}]):
            feeds = sample_inputs(spec, sizes, seed=seed)
            assert (
                rel_l2(through_parts(graphs.component, feeds), graphs.component("transformer")(feeds)["latent"]) <= 1e-6
            )
            assert rel_l2(through_parts(graphs.component, feeds), backends["tiny-klein"].component("transformer")(feeds)["latent"]) <= 1e-5  # fmt: skip
        for text in ("first-block:threshold=1.0", "magcache:threshold=0.3,ratios=" + str(
            write_ratios(tmp_path / "ratios.json", calibrate_mag_ratios(graphs, source, _request()))
        )):  # fmt: skip
            cache = parse_cache(text)
            graph_result = generate(graphs, source, _request(), cache=cache)
            reference = generate(backends["tiny-klein"], source, _request(), cache=cache)
            assert graph_result.computed_steps == reference.computed_steps < STEPS, text
            assert psnr(graph_result.images, reference.images) >= 40, text


def test_cache_on_stand_in_engines_of_the_parts(flux2_sources, flux2_parts_export, tmp_path):
    """Engines of the parts (profiles from the FLUX.2 part specs, built by `build`'s own code over the stand-in
    TensorRT) give ONNX Runtime's image with First Block Cache."""
    from helpers import build_folder, standin_tensorrt
    from standin_tensorrt import HostDevice

    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.tensorrt.backend import TensorRTBackend

    source = flux2_sources["tiny-klein"]
    names = ["text_encoder", "vae_decoder", *TRANSFORMER_PARTS]
    engines = build_folder(source, flux2_parts_export, tmp_path / "engines", components=names)
    cache = parse_cache("first-block:threshold=1.0")
    with standin_tensorrt() as trt, TensorRTBackend(source, engines, device=HostDevice(trt)) as backend:
        ours = generate(backend, source, _request(), cache=cache)
    with OnnxRuntimeBackend(source, flux2_parts_export) as graphs:
        expected = generate(graphs, source, _request(), cache=cache)
    assert ours.computed_steps == expected.computed_steps < STEPS
    assert np.array_equal(ours.images, expected.images)


def test_a_lora_swaps_into_the_flux2_parts(flux2_sources, flux2_parts_export, tmp_path):
    """Each part takes the LoRA deltas of the weights it holds: the parts chained with a LoRA swapped in (ONNX
    Runtime, base graphs) equal the transformer graph with it swapped in, and differ from the graphs without it."""
    from test_flux2 import _flux2_lora

    from fluxexport.models.lora import parse_lora
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    source = flux2_sources["tiny-klein"]
    path = _flux2_lora(tmp_path / "klein.safetensors", source, alpha=8.0)
    merged = source.with_loras([parse_lora(f"{path}:0.7")])
    feeds = sample_inputs(component_specs(source)["transformer"], {"B": 1, "N": 80, "L": 40})
    with (
        OnnxRuntimeBackend(merged, flux2_parts_export) as swapped,
        OnnxRuntimeBackend(source, flux2_parts_export) as plain,
    ):
        parts = through_parts(swapped.component, feeds)
        assert rel_l2(parts, swapped.component("transformer")(feeds)["latent"]) <= 1e-6
        assert rel_l2(parts, through_parts(plain.component, feeds)) > 1e-3


def test_fp8_parts_compute_the_fake_quantized_transformer(flux2_sources, flux2_parts_export, tmp_path):
    """`quantize --transformer-parts` on FLUX.2: the FP8 parts (fp32 base) chained compute the transformer with the
    same FP8 fake quantization, and the output part stays in the base dtype."""
    from helpers import manifest_json

    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings
    from fluxexport.quantize.qdq_export import fake_quantized_transformer, quantize_transformer, read_calibration

    source, folder = flux2_sources["tiny-klein"], tmp_path / "onnx"
    shutil.copytree(flux2_parts_export, folder)
    settings = CalibrationSettings(CALIBRATION_PROMPTS[:2], steps=2, height=128, width=128)
    quantize_transformer(source, folder, settings, base_dtype="fp32", components=TRANSFORMER_PARTS)
    fp8 = manifest_json(folder)["fp8"]
    assert {name: fp8[name]["file"] for name in fp8} == {name: f"{name}.fp8.onnx" for name in TRANSFORMER_PARTS}
    assert (
        fp8["transformer_head"]["quantization"]["layers"] > 0 and fp8["transformer_out"]["quantization"]["layers"] == 0
    )
    calibration, _ = read_calibration(folder / "calibration.json", source)
    reference = fake_quantized_transformer(source, calibration.input_amax, "fp32", calibration.weight_amax)
    feeds = sample_inputs(component_specs(source)["transformer"], {"B": 1, "N": 80, "L": 40})
    with OnnxRuntimeBackend(source, folder, fp8=True) as graphs, torch.inference_mode():
        assert rel_l2(through_parts(graphs.component, feeds), reference(**feeds)) <= 1e-6
