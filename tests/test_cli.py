"""The command line: files written, exact one-line errors, nothing written on failure."""

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import flux1_source
from PIL import Image

from fluxexport.cli import main
from fluxexport.runtime.pipeline import GenerationRequest, generate


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_run_writes_the_runtime_image(tmp_path, sources, torch_backends):
    out = tmp_path / "cat.png"
    result = invoke("run", "--model", "tiny-schnell", "--prompt", "a cat", "--height", 144, "--width", 272,
                    "--seed", 4, "--output", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    assert "denoise per step" in result.output
    expected = generate(
        torch_backends["tiny-schnell"], sources["tiny-schnell"],
        GenerationRequest("a cat", height=144, width=272, seed=4),
    ).images[0]  # fmt: skip
    assert np.array_equal(np.array(Image.open(out)), expected)


def test_run_writes_one_file_per_image(tmp_path, sources):
    result = invoke("run", "--model", "tiny-dev", "--prompt", "a dog", "--steps", 2, "--num-images", 2,
                    "--output", tmp_path / "dog.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog_0.png", "dog_1.png"]
    assert Image.open(tmp_path / "dog_0.png").size == (256, 256)


def test_kontext_run_with_image(tmp_path, sources, reference_image):
    reference_image.save(tmp_path / "ref.png")
    result = invoke("run", "--model", "tiny-kontext", "--prompt", "blue", "--steps", 2, "--image", tmp_path / "ref.png",
                    "--keep-reference-size", "--output", tmp_path / "edit.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "reference encode" in result.output  # the reference went through the VAE encoder
    assert Image.open(tmp_path / "edit.png").size == (256, 256)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--height", "250"], "Error: height 250 is not a multiple of 16: use 240 or 256 (--height)"),
        (["--width", "1000"], "Error: width 1000 is not a multiple of 16: use 992 or 1008 (--width)"),
        (["--steps", "0"], "Error: steps must be at least 1, got 0 (--steps)"),
        (["--num-images", "0"], "Error: num-images must be at least 1, got 0 (--num-images)"),
        (
            ["--max-sequence-length", "600"],
            "Error: max-sequence-length must be in 1..512, got 600 (--max-sequence-length)",
        ),
        (
            ["--model", "tiny-pro"],
            "Error: unknown tiny variant 'tiny-pro': choose one of tiny-schnell, tiny-dev, tiny-kontext, tiny-fill, tiny-canny, tiny-depth, tiny-klein, tiny-klein-base, tiny-flux2-dev",
        ),
    ],
)
def test_bad_input_one_line_errors_and_nothing_written(tmp_path, sources, args, message):
    out = tmp_path / "never.png"
    result = invoke("run", "--prompt", "a cat", "--output", out, *args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == message
    assert list(tmp_path.iterdir()) == []


def test_image_on_a_non_kontext_model(tmp_path, sources, reference_image):
    reference_image.save(tmp_path / "ref.png")
    result = invoke(
        "run", "--model", "tiny-dev", "--prompt", "x", "--image", tmp_path / "ref.png", "--output", tmp_path / "o.png"
    )
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: --image is a Kontext reference but tiny-dev is a FluxPipeline: "
        "use a FLUX.1 Kontext model or drop --image"
    )
    assert not (tmp_path / "o.png").exists()


def test_missing_and_incomplete_model_folders(tmp_path, sources):
    result = invoke("run", "--model", tmp_path / "nothing", "--prompt", "x", "--output", tmp_path / "o.png")
    assert result.exit_code == 1 and "does not exist" in result.output
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    result = invoke("run", "--model", tmp_path / "half", "--prompt", "x", "--output", tmp_path / "o.png")
    assert result.exit_code == 1
    assert "is incomplete: missing transformer, vae, text_encoder" in result.output
    assert not (tmp_path / "o.png").exists()


def test_unwritable_output(tmp_path, sources):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("run", "--prompt", "x", "--output", blocker / "o.png")
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: cannot write {blocker / 'o.png'}: {blocker} is not a folder (--output)"
    result = invoke("run", "--prompt", "x", "--output", tmp_path / "no" / "o.png")
    assert (
        result.output.strip()
        == f"Error: output folder {tmp_path / 'no'} does not exist: create it or choose another --output"
    )


def test_truncation_warning_on_the_terminal(tmp_path, sources):
    result = invoke("run", "--prompt", " ".join(["red fox"] * 60), "--steps", 1, "--output", tmp_path / "o.png")
    assert result.exit_code == 0
    assert "Warning: CLIP prompt was truncated to 77 tokens" in result.output


@pytest.mark.parametrize("part", ["transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"])
def test_a_truncated_checkpoint_is_one_line_not_a_traceback(tmp_path, sources, part):
    import shutil

    shutil.copytree(sources["tiny-schnell"].root, tmp_path / "m")
    broken = tmp_path / "m" / part
    with broken.open("r+b") as file:  # a download cut short: the header is whole, the tensors are not
        file.truncate(broken.stat().st_size * 2 // 3)
    result = invoke("run", "--backend", "torch", "--model", tmp_path / "m", "--prompt", "x", "--steps", 1,
                    "--output", tmp_path / "o.png")  # fmt: skip
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: cannot read {broken}: Error while deserializing header: incomplete metadata, file not fully "
        "covered (it must be a .safetensors file)"
    )
    assert not (tmp_path / "o.png").exists()


def test_tiny_command_writes_folder_and_single_file(tmp_path):
    result = invoke("tiny", "tiny-schnell", "--out", tmp_path / "m", "--single-file", tmp_path / "flux1-m.safetensors")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model_index.json").is_file()
    result = invoke("run", "--model", tmp_path / "flux1-m.safetensors", "--base-model", tmp_path / "m", "--prompt", "x",
                    "--steps", 1, "--output", tmp_path / "o.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    result = invoke("tiny", "tiny-schnell", "--out", tmp_path / "m")
    assert result.exit_code == 1 and "already exists and is not empty" in result.output


def test_bench_and_serve_refuse_bad_input(tmp_path, sources):
    result = invoke("bench", "--repeats", 0)
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --repeats must be ≥ 1 and --warmup ≥ 0"
    (tmp_path / "empty").mkdir()
    result = invoke("serve", tmp_path / "empty")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {tmp_path / 'empty'} is not a model repository: write one with fluxexport triton --model MODEL "
        f"--engines DIR --out {tmp_path / 'empty'}"
    )


def test_bench_reports_every_stage(tmp_path, sources):
    import json

    result = invoke(
        "bench", "--model", "tiny-dev", "--steps", 2, "--warmup", 0, "--repeats", 2, "--json", tmp_path / "b.json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert (data["backend"], data["steps"], data["repeats"], data["height"]) == ("torch", 2, 2, 256)
    assert set(data["median_ms"]) == {"text_encode", "denoise", "denoise_per_step", "decode", "wall", "total"}
    assert data["median_ms"]["denoise_per_step"] * 2 == pytest.approx(data["median_ms"]["denoise"], rel=0.01)
    assert data["peak_gpu_memory_bytes"] is None
    # arithmetic per step from the model's widths and token counts, and the rate it ran at
    from fluxexport.benchmark import transformer_flop_per_step

    flop = transformer_flop_per_step(sources["tiny-dev"], 256, 256, 512, 1)
    assert data["transformer_tflop_per_step"] == pytest.approx(flop / 1e12)
    seconds = data["median_ms"]["denoise_per_step"] / 1000
    assert data["transformer_tflops"] == pytest.approx(flop / 1e12 / seconds)
    assert f"{flop / 1e12:.4g} TFLOP per step" in result.output and "TFLOP/s achieved" in result.output


def test_transformer_flop_formula_gives_flux1s_74_tflop(tmp_path):
    """ARCHITECTURE.md: 74.4 TFLOP per step at 1024² with 512 text tokens (59.5 linear + 14.9 attention),
    linear in batch, and the tokens of a non-square size."""
    from fluxexport.benchmark import transformer_flop_per_step

    source = flux1_source(tmp_path)
    assert transformer_flop_per_step(source, 1024, 1024, 512, 1) / 1e12 == pytest.approx(74.36, abs=0.01)
    assert transformer_flop_per_step(source, 1024, 1024, 512, 2) == 2 * transformer_flop_per_step(
        source, 1024, 1024, 512, 1
    )
    tokens = (768 // 16) * (1360 // 16) + 256
    assert transformer_flop_per_step(source, 768, 1360, 256, 1) == 57 * (24 * 3072**2 * tokens + 4 * tokens**2 * 3072)
