"""Every command a refusal hints at runs as given: each test triggers a refusal on the tiny models, checks the
exact command in its one line, then runs that command (FILE, DIR, TEXT, MODEL and PREFIX replaced by real values)
and checks that it succeeds and fixes what was refused; commands that need a GPU, TensorRT, the network or a
full export of their own are checked to parse (no "Missing option", no "No such option")."""

import shlex
import shutil
from pathlib import Path

import pytest
from helpers import cli_invoke, cli_refusal

from fluxexport.cli import main
from fluxexport.errors import FluxExportError

TINY_RUN = ("--prompt", "a red fox", "--height", "64", "--width", "64", "--steps", "1")


def hinted(message: str, command: str, **values) -> list[str]:
    """`command` (as the message spells it) checked to be in `message`, split, placeholders replaced."""
    assert command in message, message
    words = shlex.split(command)
    assert words[0] == "fluxexport"
    return [str(values.get(word, word)) for word in words[1:]]


def run_hint(message: str, command: str, **values) -> str:
    args = hinted(message, command, **values)
    result = cli_invoke(*args)
    assert result.exit_code == 0, f"{' '.join(args)}\n{result.output}"
    return result.output


def parses(message: str, command: str, **values) -> None:
    """The hinted command gets past argument parsing (what is checked of commands this host cannot run)."""
    name, *rest = hinted(message, command, **values)
    command_object = main.get_command(None, name)
    assert command_object is not None, f"no command {name}"
    with command_object.make_context(name, rest):
        pass


@pytest.mark.slow  # a calibration and generations end to end (several seconds): not in the quick loop
def test_magcache_hints_calibrate_then_run(tmp_path):
    """FLUX.1-dev's ratios on tiny-klein, and a missing ratios file: both hint at calibrate-magcache, whose file
    `run --cache magcache:ratios=FILE` then takes."""
    message = cli_refusal("run", "--model", "tiny-klein", *TINY_RUN, "--cache", "magcache:ratios=flux-dev",
                      "--output", tmp_path / "x.png")  # fmt: skip
    assert message == (
        "Error: magcache ratios=flux-dev are FLUX.1-dev's, not tiny-klein's: measure its own with fluxexport "
        "calibrate-magcache --model tiny-klein --prompt TEXT --out FILE and pass ratios=FILE (--cache)"
    )
    ratios = tmp_path / "klein.json"
    command = "fluxexport calibrate-magcache --model tiny-klein --prompt TEXT --out FILE"
    run_hint(message, command, TEXT="a red fox", FILE=ratios)
    result = cli_invoke("run", "--model", "tiny-klein", *TINY_RUN[:-2], "--steps", "28", "--cache",
                    f"magcache:ratios={ratios}", "--output", tmp_path / "klein.png")  # fmt: skip
    assert result.exit_code == 0, result.output

    missing = tmp_path / "dev.json"
    message = cli_refusal("run", "--model", "tiny-dev", *TINY_RUN, "--cache", f"magcache:ratios={missing}")
    assert message == (
        f"Error: magcache ratios file {missing} does not exist: write one with fluxexport calibrate-magcache "
        f"--model MODEL --prompt TEXT --out {missing}, or use ratios=flux-dev for FLUX.1-dev (--cache)"
    )
    run_hint(message, f"fluxexport calibrate-magcache --model MODEL --prompt TEXT --out {missing}",
             MODEL="tiny-dev", TEXT="a red fox")  # fmt: skip
    assert missing.is_file()


def test_onnxruntime_after_a_bf16_quantize_hints_at_quantize_fp32(exports, tmp_path):
    """`quantize` (bf16 by default) then `run --backend onnxruntime`: the hint re-quantizes on an fp32 base."""
    folder = tmp_path / "onnx"
    shutil.copytree(exports["tiny-schnell"], folder)
    quantized = cli_invoke("quantize", "--model", "tiny-schnell", "--calib-size", "1", "--calib-steps", "1",
                       "--calib-resolution", "64", "--out", folder)  # fmt: skip
    assert quantized.exit_code == 0, quantized.output
    run = ("run", "--model", "tiny-schnell", "--backend", "onnxruntime", "--engines", folder, *TINY_RUN,
           "--output", tmp_path / "fox.png")  # fmt: skip
    message = cli_refusal(*run)
    command = f"fluxexport quantize --model tiny-schnell --dtype fp32 --calibration {folder / 'calibration.json'} --out {folder}"
    assert message == (
        f"Error: transformer in {folder} is an fp8 graph on a bf16 base, which ONNX Runtime cannot run on CPU: run "
        f"it with TensorRT, or {command} for onnxruntime"
    )
    run_hint(message, command)
    result = cli_invoke(*run)
    assert result.exit_code == 0, result.output


def test_onnxruntime_bf16_graphs_hint_at_an_fp32_export(bf16_export, tmp_path):
    message = cli_refusal("run", "--model", "tiny-dev", "--backend", "onnxruntime", "--engines", bf16_export, *TINY_RUN,
                      "--output", tmp_path / "fox.png")  # fmt: skip
    assert message.startswith(f"Error: clip in {bf16_export} is a bf16 graph, which ONNX Runtime cannot run on CPU")
    command = "fluxexport export --model tiny-dev --dtype fp32 --out DIR"
    assert message.endswith(f"{command} and run --engines DIR for onnxruntime")
    parses(message, command, DIR=tmp_path / "fp32")  # a whole export: the session's fp32 exports are its output


def test_missing_parts_and_optimized_graphs_hint_at_export_and_optimize(exports, tmp_path):
    folder = tmp_path / "onnx"
    shutil.copytree(exports["tiny-dev"], folder)
    cached = ("run", "--model", "tiny-dev", "--backend", "onnxruntime", "--engines", folder, *TINY_RUN[:-2],
              "--steps", "3", "--cache", "first-block", "--output", tmp_path / "fox.png")  # fmt: skip
    message = cli_refusal(*cached)
    command = (
        f"fluxexport export --model tiny-dev --dtype fp32 --components transformer_head,transformer_tail,"
        f"transformer_out --out {folder}"
    )
    assert message.endswith(f"{command} (the parts --cache first-block, magcache and teacache run)")
    run_hint(message, command)
    assert cli_invoke(*cached).exit_code == 0

    optimized = ("run", "--model", "tiny-dev", "--backend", "onnxruntime", "--engines", folder, "--optimized",
                 *TINY_RUN, "--output", tmp_path / "fox.png")  # fmt: skip
    message = cli_refusal(*optimized)
    command = f"fluxexport optimize --model tiny-dev --engines {folder}"
    assert message == f"Error: {folder} has no optimized graphs (none): run {command}"
    run_hint(message, command)
    result = cli_invoke(*optimized)
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_validate_hints_name_the_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folder is relative: engines/<model>/onnx where the command runs
    message = cli_refusal("validate", "--model", "tiny-klein")
    assert message == (
        "Error: engines/tiny-klein/onnx does not exist: export the graphs first (fluxexport export --model "
        "tiny-klein) or pass --engines"
    )
    parses(message, "fluxexport export --model tiny-klein")  # a whole export (what the `exports` fixtures run)

    folder = tmp_path / "onnx"
    assert cli_invoke("export", "--model", "tiny-dev", "--components", "vae_decoder", "--out", folder).exit_code == 0
    message = cli_refusal("validate", "--model", "tiny-dev", "--engines", folder, "--components", "clip")
    command = f"fluxexport export --model tiny-dev --dtype fp32 --components clip --out {folder}"
    assert message == f"Error: {folder} has no clip graph: export it first ({command})"
    run_hint(message, command)
    assert (folder / "clip.onnx").is_file()


def test_serve_hints_work_from_any_directory(exports, tmp_path, monkeypatch):
    from fluxexport.triton.server import check_repository, environment_candidates, python_environment

    empty = tmp_path / "empty"
    empty.mkdir()
    message = cli_refusal("serve", empty)
    command = f"fluxexport triton --model MODEL --engines DIR --out {empty}"
    assert message == f"Error: {empty} is not a model repository: write one with {command}"
    run_hint(message, command, MODEL="tiny-schnell", DIR=exports["tiny-schnell"])
    assert check_repository(empty) == empty

    monkeypatch.chdir(tmp_path)  # not the checkout: its .venv-triton is still the one found
    checkout = Path(__file__).resolve().parents[1]
    monkeypatch.delenv("FLUXEXPORT_TRITON_ENV", raising=False)
    assert environment_candidates() == [checkout / ".venv-triton"]
    monkeypatch.setenv("FLUXEXPORT_TRITON_ENV", str(tmp_path / "none"))
    with pytest.raises(FluxExportError) as refused:
        python_environment()
    script = checkout / "scripts" / "setup_triton_env.sh"
    assert str(refused.value) == (
        f"FLUXEXPORT_TRITON_ENV {tmp_path / 'none'} has no bin/python: create it with bash {script}, or pass "
        "--python-env PREFIX (or set FLUXEXPORT_TRITON_ENV=PREFIX) naming an environment with numpy<2, onnxruntime "
        "and fluxexport"
    )
    assert script.is_file()  # it installs packages (network): not run here
    assert "--python-env PREFIX" in str(refused.value)
    with main.get_command(None, "serve").make_context("serve", ["--python-env", str(tmp_path), str(empty)]):
        pass


def test_engine_hints_parse(exports, sources, tmp_path):
    """build's graph problems and the TensorRT LoRA refusal name commands that need TensorRT or a GPU (build,
    refit) or a whole export of their own: they parse as given."""
    from helpers import build_folder

    from fluxexport.artifacts.folders import open_export
    from fluxexport.tensorrt.precision import graph_dtypes, graph_problems
    from fluxexport.triton.repository import write_repository

    folder = tmp_path / "onnx"
    shutil.copytree(exports["tiny-schnell"], folder)
    problems = graph_problems(open_export(folder), graph_dtypes("fp8", ["clip", "transformer"]))
    assert problems == [
        "clip: the graph is fp32, a bf16 engine needs a bf16 graph (run fluxexport export --model tiny-schnell "
        "--dtype bf16 --out DIR, then build --onnx DIR)",
        f"transformer: no graph in {folder} (run fluxexport quantize --model tiny-schnell --out {folder})",
    ]
    parses(problems[0], "fluxexport export --model tiny-schnell --dtype bf16 --out DIR", DIR=tmp_path / "bf16")
    parses(problems[1], f"fluxexport quantize --model tiny-schnell --out {folder}")

    lora = tmp_path / "tiny.safetensors"
    assert cli_invoke("tiny-lora", "tiny-schnell", "--out", lora).exit_code == 0
    engines = build_folder(sources["tiny-schnell"], exports["tiny-schnell"], tmp_path / "engines")
    with pytest.raises(FluxExportError) as refused:
        write_repository(sources["tiny-schnell"], engines, tmp_path / "repo", request_loras=[object()])
    command = "fluxexport refit --model tiny-schnell --engines DIR --lora FILE"
    parses(str(refused.value), command, DIR=engines, FILE=lora)


def test_triton_and_deploy_write_under_engines_by_default(exports, tmp_path, monkeypatch):
    """No folder named like a Python package (`triton/`, which shadows the package torch imports) in the working
    directory: the repository and the manifests go to engines/<model>/."""
    monkeypatch.chdir(tmp_path)
    result = cli_invoke("triton", "--model", "tiny-schnell", "--engines", exports["tiny-schnell"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "engines/tiny-schnell/triton"
    result = cli_invoke("deploy", "--repository", "engines/tiny-schnell/triton", "--storage-uri", "s3://bucket/flux")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "engines/tiny-schnell/k8s"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["engines"]
