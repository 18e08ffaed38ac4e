"""`--cache magcache` is diffusers' MagCache hook: the same steps computed (and which), the same image bit for bit,
and our calibration measures what diffusers' calibrate mode measures."""

from __future__ import annotations

import ast
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import diffusers_images
from test_cache import PROMPT, _generate_both

from fluxexport.cli import main
from fluxexport.compare import psnr
from fluxexport.errors import FluxExportError, RequestError
from fluxexport.runtime.cache import CacheSettings, parse_cache
from fluxexport.runtime.magcache import MagCache, interpolate_ratios, write_ratios
from fluxexport.runtime.pipeline import GenerationRequest, calibrate_mag_ratios

CALIBRATION_PROMPTS = [PROMPT, "a lighthouse on a cliff at dusk"]
CALIBRATION_STEPS = 12


def _calibration_request(steps: int = CALIBRATION_STEPS) -> GenerationRequest:
    return GenerationRequest(
        CALIBRATION_PROMPTS, height=256, width=256, num_inference_steps=steps, seed=1, guidance_scale=3.5
    )


@pytest.fixture(scope="module")
def calibrated(sources, torch_backends) -> list[float]:
    """tiny-dev's ratios, measured by our runtime over two prompts, 12 steps."""
    return calibrate_mag_ratios(torch_backends["tiny-dev"], sources["tiny-dev"], _calibration_request())


@pytest.fixture(scope="module")
def ratios_file(calibrated, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("magcache") / "tiny-dev.json"
    return str(write_ratios(path, calibrated, model="tiny-dev", prompts=CALIBRATION_PROMPTS))


def test_magcache_settings_parse_with_diffusers_defaults(ratios_file, calibrated):
    cache = parse_cache(f"magcache:ratios={ratios_file}")
    assert cache.knobs == {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2, "ratios": ratios_file}
    assert cache.mag_ratios == tuple(calibrated) and cache.components[0] == "transformer_head"
    text = "magcache:threshold=0.1,max_skip_steps=2,retention_ratio=0.25,ratios=flux-dev"
    assert str(parse_cache("magcache:ratios=flux-dev, threshold=0.1,max_skip_steps=2,retention_ratio=0.25")) == text


def test_bad_magcache_settings_are_refused_in_one_line(tmp_path):
    empty, missing = tmp_path / "empty.json", tmp_path / "missing.json"
    empty.write_text(json.dumps({"ratios": [1.0, -0.5]}))
    cases = {
        "magcache": "magcache needs ratios: pass ratios=FILE (written by fluxexport calibrate-magcache) or "
        "ratios=flux-dev (diffusers' FLUX.1-dev ratios) (--cache)",
        f"magcache:ratios={missing}": f"magcache ratios file {missing} does not exist: write one with fluxexport "
        f"calibrate-magcache --model MODEL --prompt TEXT --out {missing}, or use ratios=flux-dev for FLUX.1-dev (--cache)",
        f"magcache:ratios={empty}": f'magcache ratios file {empty} holds no ratios: it needs {{"ratios": [positive '
        f"numbers, …]}} as fluxexport calibrate-magcache writes it (--cache)",
        "magcache:ratios=flux-dev,retention_ratio=1.5": "magcache retention_ratio must be a number in [0, 1], got "
        "1.5 (--cache)",
        "magcache:ratios=flux-dev,max_skip_steps=-1": "magcache max_skip_steps must be an integer ≥ 0, got -1 (--cache)",
        "magcache:ratios=flux-dev,max_skip_steps=1.5": "magcache max_skip_steps must be an integer ≥ 0, got 1.5 "
        "(--cache)",
        "magcache:ratios=flux-dev,threshold=x": "magcache threshold must be a number ≥ 0, got 'x' (--cache)",
        "magcache:ratios=flux-dev,calibrate=1": "magcache has no key 'calibrate': it takes threshold, max_skip_steps, "
        "retention_ratio, ratios (--cache)",
    }
    from fluxexport.cli import command_line_terms

    for text, message in cases.items():
        with pytest.raises(RequestError) as error:
            parse_cache(text)
        assert error.value.render(command_line_terms()) == message  # as the CLI words it
    with pytest.raises(FluxExportError, match=r"^magcache needs the run's step count: pass new_state\(steps\)"):
        parse_cache("magcache:ratios=flux-dev").new_state()


@pytest.mark.parametrize("steps", [1, 7, 28, 50])
def test_ratios_are_interpolated_as_diffusers_does(steps):
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS, nearest_interp

    ours = interpolate_ratios(FLUX_MAG_RATIOS.tolist(), steps)
    assert torch.equal(ours, FLUX_MAG_RATIOS if steps == 28 else nearest_interp(FLUX_MAG_RATIOS, steps))


def test_calibration_equals_diffusers_calibrate_mode(calibrated, diffusers_pipelines, capsys):
    """diffusers prints its ratios at the end of a calibrate=True run; ours are the same run's, one per step."""
    from diffusers import MagCacheConfig

    pipeline = diffusers_pipelines["tiny-dev"]
    pipeline.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=CALIBRATION_STEPS))
    try:
        capsys.readouterr()
        diffusers_images(pipeline, CALIBRATION_PROMPTS, 256, 256, CALIBRATION_STEPS, 1, guidance_scale=3.5)
        printed = capsys.readouterr().out.split("MagCacheConfig(mag_ratios=...):")[1]
    finally:
        pipeline.transformer.disable_cache()
    theirs = ast.literal_eval(printed.strip())
    assert len(calibrated) == CALIBRATION_STEPS and calibrated[0] == 1.0
    assert calibrated == pytest.approx(theirs, rel=1e-6, abs=0)  # equal to the bit on CPU fp32 so far


def test_magcache_computes_diffusers_steps(diffusers_pipelines):
    """Which steps run the blocks, with FLUX.1-dev's ratios over 28 steps: the steps in which diffusers' hook lets
    the first block run (recorded by step index)."""
    from diffusers import MagCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    state = parse_cache("magcache:ratios=flux-dev").new_state(28)
    assert isinstance(state, MagCache)
    ours = [step for step, computes in enumerate(state.schedule) if computes]
    pipeline, step, ran = diffusers_pipelines["tiny-dev"], [0], []
    block = pipeline.transformer.get_submodule("transformer_blocks.0.attn")
    block.register_forward_hook(lambda *_: ran.append(step[0]))
    pipeline.transformer.enable_cache(MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=28))

    def advance(_pipeline, index, _timestep, kwargs):
        step[0] = index + 1
        return kwargs

    try:
        diffusers_images(pipeline, PROMPT, 64, 64, 28, 1, guidance_scale=3.5, callback_on_step_end=advance)
    finally:
        pipeline.transformer.disable_cache()
        block._forward_hooks.clear()
    assert ours == ran and len(ours) < 28


@pytest.mark.parametrize(
    ("knobs", "steps", "batch"),
    [({}, 12, 1), ({"threshold": 0.5, "max_skip_steps": 2, "retention_ratio": 0.1}, 8, 2), ({"threshold": 1}, 20, 1)],
)
def test_magcache_equals_diffusers_hook(knobs, steps, batch, ratios_file, calibrated, sources, torch_backends,
                                        diffusers_pipelines):  # fmt: skip
    """Our ratios (12 steps, interpolated to 8 and 20 as diffusers does) in both: the same number of full runs
    (counted on the first block, which a skipped step never reaches), and the same image bit for bit (the head
    gives the embedded image stream the residual is added to)."""
    from diffusers import MagCacheConfig

    cache = CacheSettings("magcache", knobs | {"ratios": ratios_file}, steps=steps)
    k = cache.knobs
    config = MagCacheConfig(
        threshold=k["threshold"], max_skip_steps=k["max_skip_steps"], retention_ratio=k["retention_ratio"],
        num_inference_steps=steps, mag_ratios=calibrated,
    )  # fmt: skip
    ours, theirs, runs = _generate_both(
        cache, config, "transformer_blocks.0.attn", steps, batch, sources, torch_backends, diffusers_pipelines
    )
    assert ours.computed_steps == runs < steps
    assert psnr(ours.images, theirs) >= 50
    assert np.array_equal(ours.images, theirs)


def _invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


@pytest.mark.slow  # a calibration and generations end to end (several seconds): not in the quick loop
def test_calibrate_magcache_command_writes_the_ratios_run_uses(calibrated, sources, tmp_path):
    """The command's file holds `calibrate_mag_ratios`' ratios of the same request, and `run` skips steps with it."""
    out = tmp_path / "ratios.json"
    prompts = [arg for prompt in CALIBRATION_PROMPTS for arg in ("--prompt", prompt)]
    result = _invoke("calibrate-magcache", "--model", "tiny-dev", "--backend", "torch", *prompts, "--steps",
                     CALIBRATION_STEPS, "--height", 256, "--width", 256, "--guidance", 3.5, "--seed", 1, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out)
    assert f"magcache ratios ({CALIBRATION_STEPS} steps)" in result.output
    written = json.loads(out.read_text())
    assert written["ratios"] == calibrated
    assert {key: written[key] for key in ("model", "prompts", "height", "width", "steps")} == {
        "model": "tiny-dev", "prompts": CALIBRATION_PROMPTS, "height": 256, "width": 256, "steps": CALIBRATION_STEPS,
    }  # fmt: skip
    result = _invoke("run", "--model", "tiny-dev", "--prompt", PROMPT, "--steps", CALIBRATION_STEPS, "--seed", 1,
                     "--cache", f"magcache:ratios={out}", "--output", tmp_path / "cached.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = " ".join(result.output.split())  # the console wraps long lines
    computed = int(summary.split("transformer: computed ")[1].split(" of ")[0])
    assert f"transformer: computed {computed} of {CALIBRATION_STEPS} steps (magcache:threshold=0.06," in summary
    assert 0 < computed < CALIBRATION_STEPS
    assert (tmp_path / "cached.png").is_file()


def test_calibrate_magcache_refuses_bad_input_in_one_line(sources, tmp_path):
    def refusal(*args):
        result = _invoke("calibrate-magcache", "--prompt", "a fox", "--steps", 2, *args)
        assert result.exit_code != 0
        return result.output.strip().splitlines()[-1]

    assert refusal("--model", "tiny-dev") == "Error: Missing option '--out'."
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert refusal("--model", "tiny-dev", "--out", blocker / "r.json") == (
        f"Error: cannot write {blocker / 'r.json'}: {blocker} is not a folder (--out)"
    )
    assert refusal("--model", "tiny-dev", "--out", tmp_path / "no" / "r.json") == (
        f"Error: folder {tmp_path / 'no'} does not exist: create it or choose another --out"
    )
    assert refusal("--model", "tiny-dev", "--out", tmp_path) == (
        f"Error: cannot write {tmp_path}: it is a folder (--out)"
    )
    assert refusal("--model", "tiny-dev", "--height", 250, "--out", tmp_path / "r.json") == (
        "Error: height 250 is not a multiple of 16: use 240 or 256 (--height)"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]  # nothing written, nothing half-written
