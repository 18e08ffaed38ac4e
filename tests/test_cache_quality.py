"""What a step cache costs, measured: `validate --cache` reports each side's cached image against its own uncached
one (same seed) and both sides' skip decisions; `bench --cache` counts only the computed steps in its TFLOP/s."""

from __future__ import annotations

import json

from click.testing import CliRunner

from fluxexport.cli import main
from fluxexport.compare import psnr
from fluxexport.runtime.cache import parse_cache
from fluxexport.runtime.pipeline import GenerationRequest, generate

STEPS = 6


def test_validate_reports_what_the_cache_costs(sources, torch_backends, parts_export, tmp_path):
    """teacache on the exported parts: per image, the graphs' and PyTorch's PSNR against their uncached images
    (PyTorch's equal to our own run of the same requests) and the same skip decisions on both sides."""
    report = tmp_path / "validation.json"
    cache = "teacache:threshold=0.6"
    result = CliRunner().invoke(main, [
        "validate", "--model", "tiny-dev", "--engines", str(parts_export), "--components", "clip",
        "--steps", str(STEPS), "--cache", cache, "--report", str(report),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"what cache {cache},coefficients=flux1-dev costs" in result.output
    rows = json.loads(report.read_text())["cache_quality"]
    assert len(rows) == 2  # the square and the non-square image
    first = rows[0]
    request = GenerationRequest("a red fox in the snow", height=first["height"], width=first["width"],
                                num_inference_steps=STEPS, seed=0)  # validate's own request  # fmt: skip
    source, backend = sources["tiny-dev"], torch_backends["tiny-dev"]
    cached = generate(backend, source, request, cache=parse_cache(cache))
    uncached = generate(backend, source, request)
    assert first["reference_psnr"] == psnr(cached.images, uncached.images)
    assert sum(first["reference_decisions"]) == cached.computed_steps < STEPS  # it skipped, so it costs something
    assert all(row["same_decisions"] and row["decisions"] == row["reference_decisions"] for row in rows)
    assert all(30 < row["psnr"] < float("inf") for row in rows), rows


def test_bench_counts_only_computed_steps(tmp_path):
    """The achieved TFLOP/s of a cached run is the transformer's arithmetic of the computed steps over the denoising
    time, not every step's."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, [
        "bench", "--model", "tiny-dev", "--device", "cpu", "--steps", "8", "--height", "64", "--width", "64",
        "--warmup", "0", "--repeats", "1", "--cache", "taylorseer:interval=3,warmup=2", "--json", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    numbers = json.loads(out.read_text())
    assert numbers["computed_steps"] == 4  # steps 0, 1, 3, 6
    denoise_s = numbers["median_ms"]["denoise"] / 1000
    expected = numbers["transformer_tflop_per_step"] * 4 / denoise_s
    assert abs(numbers["transformer_tflops"] - expected) <= 1e-9 * expected


def test_magcache_ratios_are_refused_for_another_model_or_step_count(tmp_path):
    """A ratios file records the model and step count it was calibrated on (calibrate-magcache writes them): a run
    of another model or another step count is refused in one line; a file that records neither interpolates."""
    import pytest

    from fluxexport.cli import command_line_terms
    from fluxexport.errors import RequestError
    from fluxexport.runtime.magcache import MagCache, write_ratios

    path = write_ratios(tmp_path / "ratios.json", [1.0, 0.95, 0.9, 0.9], model="tiny-dev", steps=4)
    cache = parse_cache(f"magcache:ratios={path}")
    cache.check_calibrated_for("tiny-dev")
    assert isinstance(cache.new_state(4), MagCache)
    refusals = {
        lambda: cache.check_calibrated_for("tiny-schnell"): f"magcache ratios file {path} was calibrated on tiny-dev, "
        "not tiny-schnell: measure tiny-schnell's own with fluxexport calibrate-magcache --model tiny-schnell "
        "--prompt TEXT --out FILE (--cache)",
        lambda: cache.new_state(6): f"magcache ratios file {path} was calibrated at 4 steps, not 6: run 4 steps, or "
        "calibrate again with fluxexport calibrate-magcache --steps 6 (--cache)",
    }
    for call, message in refusals.items():
        with pytest.raises(RequestError) as error:
            call()
        assert error.value.render(command_line_terms()) == message
    bare = write_ratios(tmp_path / "bare.json", [1.0, 0.95, 0.9, 0.9])
    assert isinstance(parse_cache(f"magcache:ratios={bare}").new_state(6), MagCache)
