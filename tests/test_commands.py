"""The commands layer called directly (no CliRunner): typed options in, typed results and files out, and the
one-line refusals; plus the CLI's `--engines` with no `--backend` (issue 29: the backend follows the folder)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import build_folder, cli_invoke, cli_refusal
from PIL import Image

from fluxexport.backend_factory import choose_backend
from fluxexport.commands.bench import BenchOptions, run_bench
from fluxexport.commands.common import BackendOptions, ModelOptions
from fluxexport.commands.run import RunOptions, run_images
from fluxexport.errors import FluxExportError
from fluxexport.runtime.pipeline import GenerationRequest, generate

TINY = ModelOptions("tiny-schnell")
SMALL = {"height": 64, "width": 96, "steps": 2}
ENGINES_WITH_TORCH = "--engines is for --backend onnxruntime or tensorrt: drop it or pick one"


def test_run_images_writes_the_pipelines_images(sources, torch_backends, tmp_path):
    """run_images writes one PNG per image, each the pipeline's own image for the request, on torch by default."""
    out = tmp_path / "fox.png"
    lines: list[str] = []
    result = run_images(RunOptions("a fox", TINY, num_images=2, seed=3, output=out, **SMALL), log=lines.append)
    assert result.backend == "torch" and result.model == "tiny-schnell"
    assert result.paths == [tmp_path / "fox_0.png", tmp_path / "fox_1.png"]
    assert (result.request.height, result.request.width, result.request.steps, result.request.batch) == (64, 96, 2, 2)
    expected = generate(torch_backends["tiny-schnell"], sources["tiny-schnell"],
                        GenerationRequest("a fox", height=64, width=96, num_inference_steps=2, seed=3,
                                          num_images_per_prompt=2)).images  # fmt: skip
    written = np.stack([np.asarray(Image.open(path)) for path in result.paths])
    assert np.array_equal(written, expected)
    assert result.generation.computed_steps == 2 and lines == []  # torch has no transformer graph to name


def test_run_images_refuses_before_any_work(sources, tmp_path):
    """Bad values, an --engines folder with torch, an unwritable output: one line each, nothing written."""
    refusals = {
        RunOptions("a fox", TINY, height=100, output=tmp_path / "a.png"): "height",
        RunOptions("a fox", TINY, BackendOptions("torch", tmp_path), output=tmp_path / "b.png"): ENGINES_WITH_TORCH,
        RunOptions("a fox", TINY, output=tmp_path / "no" / "c.png", **SMALL): (
            f"output folder {tmp_path / 'no'} does not exist: create it or choose another --output"
        ),
    }
    for options, message in refusals.items():
        with pytest.raises(FluxExportError) as raised:
            run_images(options)
        assert message in str(raised.value) and "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_run_images_follows_an_export_folder(sources, exports, ort_backends, tmp_path):
    """With --engines and no --backend, an export folder runs on ONNX Runtime: the images ONNX Runtime gives."""
    folder = exports["tiny-schnell"]
    result = run_images(RunOptions("a fox", TINY, BackendOptions(engines=folder), output=tmp_path / "o.png", **SMALL))
    assert result.backend == "onnxruntime"
    expected = generate(ort_backends["tiny-schnell"], sources["tiny-schnell"],
                        GenerationRequest("a fox", height=64, width=96, num_inference_steps=2)).images  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(result.paths[0]))[None], expected)
    other = RunOptions("a fox", TINY, BackendOptions(engines=exports["tiny-dev"]), output=tmp_path / "x.png", **SMALL)
    with pytest.raises(
        FluxExportError, match="^" + re.escape(f"the graphs in {exports['tiny-dev']} were exported from ")
    ):
        run_images(other)  # another model's graphs: refused, not ignored (issue 29)
    assert not (tmp_path / "x.png").exists()


def test_the_backend_follows_the_folder_kind(sources, exports, tmp_path):
    """No --backend: an export folder → onnxruntime, an engine folder (build's own code) → tensorrt, nothing →
    torch; a named backend stays; torch with a folder is refused; a folder without a manifest is refused."""
    engines = build_folder(sources["tiny-schnell"], exports["tiny-schnell"], tmp_path / "e", components=["vae_decoder"])
    assert choose_backend(None, exports["tiny-schnell"]) == "onnxruntime"
    assert choose_backend(None, engines) == "tensorrt"
    assert choose_backend(None, None) == "torch"
    assert choose_backend("onnxruntime", engines) == "onnxruntime"  # the backend then says what it cannot run
    with pytest.raises(FluxExportError, match=f"^{ENGINES_WITH_TORCH}$"):
        choose_backend("torch", exports["tiny-schnell"])
    with pytest.raises(FluxExportError, match=r"has no manifest.json: export graphs into it with `fluxexport export`$"):
        choose_backend(None, tmp_path)


def test_run_bench_writes_its_json(sources, tmp_path):
    """run_bench measures on torch and writes the numbers it returns; bad counts are refused in one line."""
    out = tmp_path / "bench.json"
    result = run_bench(BenchOptions(TINY, height=64, width=64, steps=1, warmup=0, repeats=1, json_path=out))
    assert result.backend == "torch" and result.json_path == out
    assert json.loads(out.read_text()) == result.numbers and result.numbers["steps"] == 1
    with pytest.raises(FluxExportError, match="^--repeats must be ≥ 1 and --warmup ≥ 0$"):
        run_bench(BenchOptions(TINY, repeats=0))


@pytest.mark.parametrize("command", ["run", "bench", "calibrate-magcache"])
def test_cli_refuses_engines_with_the_torch_backend(command, sources, tmp_path):
    """`--backend torch --engines DIR`: one line naming the fix, on every command that takes both."""
    extra = {"run": ["--prompt", "a fox"], "bench": [],
             "calibrate-magcache": ["--prompt", "a fox", "--out", tmp_path / "r.json"]}[command]  # fmt: skip
    message = cli_refusal(command, "--model", "tiny-schnell", "--backend", "torch", "--engines", tmp_path, *extra)
    assert message == f"Error: {ENGINES_WITH_TORCH}"


def test_cli_run_with_engines_and_no_backend_runs_onnxruntime(sources, exports, tmp_path):
    """`run --engines DIR` without --backend runs the graphs (issue 29: it used to run torch and ignore DIR)."""
    out = tmp_path / "o.png"
    result = cli_invoke("run", "--model", "tiny-schnell", "--prompt", "a fox", "--engines", exports["tiny-schnell"],
                        "--height", 64, "--width", 64, "--steps", 1, "--output", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "onnxruntime · 1 steps · batch 1" in result.output
    assert result.output.strip().splitlines()[-1] == str(out)


def test_plan_export_says_what_it_will_write(sources, tmp_path):
    """The plan names the family's graphs (plus the parts when asked), the folder, and a note for each graph kept
    in another precision than asked; nothing is written by planning."""
    from fluxexport.commands.export import ExportOptions, plan_export
    from fluxexport.specs import TRANSFORMER_PARTS

    out = tmp_path / "onnx"
    plan = plan_export(ExportOptions(TINY, out=out, dtype="fp16", transformer_parts=True))
    assert plan.out == out and plan.names == [*sources["tiny-schnell"].components, *TRANSFORMER_PARTS]
    assert plan.notes == [
        "t5: T5 overflows in fp16 (inf, then zeros); kept bf16",
        "vae_decoder: the VAE is never exported in fp16 (its activations overflow fp16); kept fp32",
        "vae_encoder: the VAE is never exported in fp16 (its activations overflow fp16); kept fp32",
    ]
    assert not out.exists()


def test_quantize_and_validate_refuse_before_any_model_runs(sources, tmp_path, monkeypatch):
    """Saved scales with a calibration option, a calibration size below 1, validate with no export to find: one
    line each, naming the fix."""
    from fluxexport.commands.quantize import QuantizeOptions, quantize_fp8
    from fluxexport.commands.validate import ValidateOptions, validate_folder

    saved = tmp_path / "calibration.json"
    refusals = [
        (lambda: quantize_fp8(QuantizeOptions(TINY, out=tmp_path, calibration_file=saved, calib_steps=2)),
         "--calibration reuses saved scales, so --calib-steps would be ignored: drop one of them"),
        (lambda: quantize_fp8(QuantizeOptions(TINY, out=tmp_path, calib_size=0)),
         "calib-size must be at least 1, got 0 (--calib-size)"),
        (lambda: validate_folder(ValidateOptions(ModelOptions("tiny-dev"))),
         "engines/tiny-dev/onnx does not exist: export the graphs first (fluxexport export --model tiny-dev) or pass "
         "--engines"),
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for call, message in refusals:
        with pytest.raises(FluxExportError) as raised:
            call()
        assert str(raised.value) == message
    assert sorted(path.name for path in tmp_path.iterdir()) == []
