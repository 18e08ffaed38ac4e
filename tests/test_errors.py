"""Errors with a kind: a request's fault carries its input, problem and fix as data, and each front end words it
(the CLI with its flags, Triton with its inputs); our own faults are another type. Every request value is checked
before any model loads."""

from __future__ import annotations

import time

import pytest
from helpers import cli_invoke, cli_refusal

from fluxexport.errors import FluxExportError, InternalError, RequestError, Terms
from fluxexport.runtime.cache import parse_cache
from fluxexport.runtime.latents import check_image_size
from fluxexport.runtime.schedule import check_steps

TRITON = Terms({"num_images_per_prompt": "num_images"}, given="in the {name} input", drop="drop the {name} input")


def cli_terms(command: str | None = None) -> Terms:
    from fluxexport.cli import command_line_terms

    return command_line_terms(command)


@pytest.mark.parametrize(
    ("refuse", "field", "cli", "triton"),
    [
        (lambda: check_steps(0), "num_inference_steps", "steps must be at least 1, got 0 (--steps)",
         "num_inference_steps must be at least 1, got 0"),
        (lambda: check_image_size(250, 256), "height", "height 250 is not a multiple of 16: use 240 or 256 (--height)",
         "height 250 is not a multiple of 16: use 240 or 256"),
        (lambda: check_image_size(256, 2048, 16, 1024), "width",
         "width 2048 is past the 1024 px this model serves: use 1024 or less (--width)",
         "width 2048 is past the 1024 px this model serves: use 1024 or less"),
        (lambda: parse_cache("magic"), "cache",
         "unknown cache 'magic': choose one of none, first-block, taylorseer, magcache, teacache (--cache)",
         "unknown cache 'magic': choose one of none, first-block, taylorseer, magcache, teacache"),
        (lambda: parse_cache("taylorseer:interval"), "cache",
         "'interval' is not key=value: write --cache taylorseer:key=value,… (--cache)",
         "'interval' is not key=value: write cache taylorseer:key=value,…"),
    ],
)  # fmt: skip
def test_request_errors_carry_their_input_and_each_front_end_words_them(refuse, field, cli, triton):
    with pytest.raises(RequestError) as error:
        refuse()
    assert error.value.field == field
    assert error.value.render(cli_terms()) == cli and error.value.render(TRITON) == triton
    assert "\n" not in str(error.value) and "--" not in str(error.value)  # the library's own words name no flag


def test_fixes_that_name_the_input_are_worded_per_front_end():
    error = RequestError("negative_prompt", "tiny-klein runs without true CFG", "{drop}", pointer=False)
    assert error.render(cli_terms()) == "tiny-klein runs without true CFG: drop --negative-prompt"
    assert error.render(TRITON) == "tiny-klein runs without true CFG: drop the negative_prompt input"
    empty = RequestError("prompt", "prompt is empty", "pass the text to draw {given}", pointer=False)
    assert empty.render(cli_terms()) == "prompt is empty: pass the text to draw with --prompt"
    assert empty.render(TRITON) == "prompt is empty: pass the text to draw in the prompt input"
    count = RequestError("num_images_per_prompt", "{name} must be in 1..64, got 0")
    assert count.render(cli_terms()) == "num-images must be in 1..64, got 0 (--num-images)"
    assert count.render(cli_terms("bench")) == "batch must be in 1..64, got 0 (--batch)"
    assert count.render(TRITON) == "num_images must be in 1..64, got 0"


def test_kinds_are_types_and_a_plain_refusal_becomes_the_requests_word_for_word():
    assert issubclass(RequestError, FluxExportError) and issubclass(InternalError, FluxExportError)
    assert not issubclass(InternalError, RequestError)
    failed = InternalError("vae_decoder: out of memory", "vae_decoder")
    assert failed.component == "vae_decoder" and str(failed) == "vae_decoder: out of memory"
    plain = FluxExportError("2 references need 8256 tokens {name}: serve graphs exported using --max-references 2")
    made = RequestError.of(plain, "image")
    assert made.field == "image" and made.render(cli_terms()) == made.render(TRITON) == str(plain)
    assert RequestError.of(made, "cache") is made


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--height", "100000"], "height 100000 is past the 1024 px this model serves: use 1024 or less (--height)"),
        (["--width", "-16"], "width -16 is not a multiple of 16: use 16 (--width)"),
        (["--guidance", "nan"], "guidance must be a finite number, got nan (--guidance)"),
        (["--guidance", "-inf"], "guidance must be a finite number, got -inf (--guidance)"),
        (["--steps", "100000"], "steps must be at most 1000, got 100000 (--steps)"),
        (["--num-images", "0"], "num-images must be at least 1, got 0 (--num-images)"),
        (["--num-images", "1000000"], "num-images must be at most 64, got 1000000 (--num-images)"),
        (["--seed", str(2**64)], f"seed must be in {-(2**63)}..{2**64 - 1}, got {2**64} (--seed)"),
        (["--max-sequence-length", "0"], "max-sequence-length must be in 1..512, got 0 (--max-sequence-length)"),
        (["--prompt", "x" * 20000], "prompt holds 20000 characters, at most 16384: the text encoders read 512 "
                                    "tokens at most; shorten it"),
        (["--cache", "first-block:threshold=nan"], "first-block threshold must be a number ≥ 0, got nan (--cache)"),
        (["--lora", "ink.safetensors:nan"], "--lora ink.safetensors:nan: the scale must be a number in -10..10"),
        (["--lora", "ink.safetensors:8e9"], "--lora ink.safetensors:8e9: the scale must be a number in -10..10"),
    ],
)  # fmt: skip
def test_run_refuses_each_value_in_one_line_before_any_model_loads(options, message, tmp_path, monkeypatch):
    """Issue 29's `--height 100000` (which started a ~100k-token attention) and `--guidance nan` (which wrote an
    image): each answered in one line, with no weight read and nothing written."""
    from fluxexport.models import loaders

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a model was loaded for a request that is refused")

    for name in [name for name in dir(loaders) if name.startswith("load_")]:
        monkeypatch.setattr(loaders, name, no_loading)
    started = time.perf_counter()
    args = ["--prompt", "a cat", *options] if "--prompt" not in options else options
    assert cli_refusal("run", *args, "--output", tmp_path / "out.png") == f"Error: {message}"
    assert time.perf_counter() - started < 30 and list(tmp_path.iterdir()) == []


def test_bench_and_validate_refuse_request_values_in_their_own_flags(tmp_path):
    assert cli_refusal("bench", "--batch", "0") == "Error: batch must be at least 1, got 0 (--batch)"
    assert cli_refusal("bench", "--height", "100000") == (
        "Error: height 100000 is past the 1024 px this model serves: use 1024 or less (--height)"
    )
    assert cli_refusal("bench", "--steps", "0") == "Error: steps must be at least 1, got 0 (--steps)"
    assert cli_refusal("validate", "--engines", tmp_path, "--steps", "0") == (
        "Error: steps must be at least 1, got 0 (--steps)"  # before the folder is read: it holds no graphs
    )
    refused = cli_refusal("validate", "--engines", tmp_path, "--cache", "taylorseer:interval=0")
    assert refused == "Error: taylorseer interval must be an integer ≥ 1, got 0 (--cache)"
    assert cli_invoke("bench", "--cache", "magic").exit_code == 1


def test_a_lora_that_is_no_safetensors_file_is_refused_before_any_model_loads(tmp_path):
    junk = tmp_path / "ink.safetensors"
    junk.write_bytes(b"junk")
    refused = cli_refusal("run", "--prompt", "a cat", "--lora", junk, "--output", tmp_path / "out.png")
    assert (
        refused == f"Error: --lora {junk}: not a safetensors file (Error while deserializing header: header too small)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ink.safetensors"]


def test_a_lora_of_another_model_is_refused_before_any_weight_loads(tmp_path, monkeypatch):
    """A LoRA made for FLUX.2 [klein]'s layers, given to tiny-schnell: refused in one line from the modules built
    on the meta device, before any loader runs (fuzzing had found it refused only once the model loaded)."""
    from fluxexport.models import loaders
    from fluxexport.models.source import resolve_model
    from fluxexport.models.tiny_lora import write_tiny_lora

    lora = write_tiny_lora(resolve_model("tiny-klein"), tmp_path / "klein.safetensors")

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a model was loaded for a request that is refused")

    for name in [name for name in dir(loaders) if name.startswith("load_")]:
        monkeypatch.setattr(loaders, name, no_loading)
    out = tmp_path / "out"
    out.mkdir()
    message = cli_refusal("run", "--prompt", "a cat", "--lora", lora, "--output", out / "image.png")
    assert message.startswith("Error: ") and message.endswith("it was made for another model"), message
    assert list(out.iterdir()) == []
