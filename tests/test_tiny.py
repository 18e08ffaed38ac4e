import hashlib

import pytest
from diffusers import FluxKontextPipeline, FluxPipeline

from fluxexport.errors import FluxExportError
from fluxexport.models.tiny import write_tiny


def _hashes(folder):
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_tiny_is_deterministic(tmp_path, sources):
    again = write_tiny("tiny-dev", tmp_path / "again")
    assert _hashes(again) == _hashes(sources["tiny-dev"].root)


@pytest.mark.parametrize(
    ("variant", "cls", "guidance", "dynamic"),
    [
        ("tiny-schnell", FluxPipeline, False, False),
        ("tiny-dev", FluxPipeline, True, True),
        ("tiny-kontext", FluxKontextPipeline, True, True),
    ],
)
def test_tiny_folders_load_unmodified_in_diffusers(sources, variant, cls, guidance, dynamic):
    source = sources[variant]
    pipeline = cls.from_pretrained(source.root)
    assert type(pipeline) is cls
    assert pipeline.transformer.config.guidance_embeds is guidance
    assert pipeline.scheduler.config.use_dynamic_shifting is dynamic
    assert pipeline.vae_scale_factor == 8
    assert pipeline.tokenizer.model_max_length == 77
    assert type(pipeline.tokenizer).__name__ == "CLIPTokenizer"
    assert "T5Tokenizer" in type(pipeline.tokenizer_2).__name__
    # real tokenizers: words map to learned pieces, not to unknowns
    ids = pipeline.tokenizer("a photo of a cat").input_ids
    assert ids[0] == pipeline.tokenizer.bos_token_id and ids[-1] == pipeline.tokenizer.eos_token_id
    assert pipeline.tokenizer.unk_token_id not in ids[1:-1]  # CLIP's unk is its eos, as in the real one
    t5_ids = pipeline.tokenizer_2("a photo of a cat").input_ids
    assert t5_ids[-1] == pipeline.tokenizer_2.eos_token_id and pipeline.tokenizer_2.unk_token_id not in t5_ids
    assert source.is_kontext is (cls is FluxKontextPipeline)
    assert source.default_size == 256
    total = sum(path.stat().st_size for path in source.root.rglob("*.safetensors"))
    assert total < 5_000_000


def test_write_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FluxExportError, match="already exists and is not empty"):
        write_tiny("tiny-dev", tmp_path / "taken")


def test_unknown_variant(tmp_path):
    with pytest.raises(FluxExportError) as error:
        write_tiny("tiny-pro", tmp_path / "x")
    assert (
        str(error.value)
        == "unknown tiny variant 'tiny-pro': choose one of tiny-schnell, tiny-dev, tiny-kontext, tiny-fill, tiny-canny, tiny-depth, tiny-klein, tiny-klein-base, tiny-flux2-dev"
    )
    assert not (tmp_path / "x").exists()


def test_a_cached_tiny_model_of_an_older_revision_is_written_again(tmp_path, monkeypatch):
    import json

    from fluxexport.models.tiny import TINY_MARKER, TINY_REVISION, materialise_tiny

    monkeypatch.setenv("FLUXEXPORT_CACHE", str(tmp_path))
    folder = materialise_tiny("tiny-schnell")
    marker = json.loads((folder / TINY_MARKER).read_text())
    (folder / TINY_MARKER).write_text(json.dumps(marker | {"revision": TINY_REVISION - 1}))
    (folder / "stale.txt").write_text("from the older revision")
    assert materialise_tiny("tiny-schnell") == folder
    assert json.loads((folder / TINY_MARKER).read_text())["revision"] == TINY_REVISION
    assert not (folder / "stale.txt").exists() and not list(folder.parent.glob(".tiny-schnell.*"))


# ---- tiny-lora: random LoRAs that fit the tiny models, in each format models/lora.py reads --------------------

TINY_LORAS = [("tiny-dev", fmt) for fmt in ("peft", "kohya", "xlabs")] + [
    ("tiny-klein", fmt) for fmt in ("peft", "kohya", "ai-toolkit")
]
LORA_REQUEST = {"prompt": "a red fox", "height": 128, "width": 128, "num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def lora_base_images(sources, flux2_sources):
    """Each variant's image without a LoRA (the PyTorch backend, LORA_REQUEST)."""
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.runtime.pipeline import GenerationRequest, generate

    images = {}
    for variant in dict.fromkeys(variant for variant, _ in TINY_LORAS):
        source = (sources | flux2_sources)[variant]
        with TorchBackend(source, "fp32", "cpu") as backend:
            images[variant] = generate(backend, source, GenerationRequest(**LORA_REQUEST)).images
    return images


@pytest.mark.parametrize(("variant", "fmt"), TINY_LORAS)
def test_tiny_lora_loads_in_our_reader_sized_as_written_and_changes_the_image(
    variant, fmt, sources, flux2_sources, lora_base_images, tmp_path
):
    """`fluxexport tiny-lora` writes a file our loader (diffusers' conversion of that format) reads as exactly the
    layers it targets, each update alpha/rank·B·A of RELATIVE·‖W‖ (kohya's and FLUX.2 PEFT's alphas included),
    and the image changes visibly without turning to noise."""
    import torch
    from click.testing import CliRunner

    from fluxexport.cli import main
    from fluxexport.compare import psnr
    from fluxexport.models.loaders import load_clip, load_transformer
    from fluxexport.models.lora import LoraSet, parse_lora
    from fluxexport.models.tiny_lora import RELATIVE, targets
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.runtime.pipeline import GenerationRequest, generate

    source = (sources | flux2_sources)[variant]
    path = tmp_path / f"{fmt}.safetensors"
    result = CliRunner().invoke(main, ["tiny-lora", variant, "--format", fmt, "--out", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(path)
    lora = LoraSet([parse_lora(str(path))], source.family.name)
    transformer = load_transformer(source)
    models = {"transformer": transformer, "clip": load_clip(source) if "clip" in lora.layers else None}
    wanted = targets(fmt, source.family.name, transformer)
    adapted = {(target.model, name) for target in wanted for name in target.modules}
    assert {(model, name) for model, layers in lora.layers.items() for name in layers} == adapted
    for target in wanted:
        weights = dict(models[target.model].named_parameters())
        stacked = torch.cat([weights[f"{name}.weight"].detach() for name in target.modules])
        change = torch.cat([lora.delta(target.model, f"{name}.weight") for name in target.modules])
        assert change.norm().item() == pytest.approx(RELATIVE * stacked.norm().item(), rel=1e-4), target.key
    merged = source.with_loras([parse_lora(str(path))])
    with TorchBackend(merged, "fp32", "cpu") as backend:
        images = generate(backend, merged, GenerationRequest(**LORA_REQUEST)).images
    assert 20 < psnr(images, lora_base_images[variant]) < 45


@pytest.mark.parametrize("variant", ["tiny-schnell", "tiny-klein"])
def test_run_takes_a_tiny_lora(variant, tmp_path):
    """What the README's LoRA section does offline: write a tiny LoRA, then `run --lora FILE:SCALE` with it."""
    from click.testing import CliRunner

    from fluxexport.cli import main

    lora = tmp_path / "tiny.safetensors"
    assert CliRunner().invoke(main, ["tiny-lora", variant, "--out", str(lora)]).exit_code == 0
    result = CliRunner().invoke(main, [
        "run", "--model", variant, "--prompt", "a red fox", "--height", "64", "--width", "64", "--steps", "1",
        "--lora", f"{lora}:0.8", "--output", str(tmp_path / "fox.png"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fox.png").is_file()


def test_tiny_lora_refusals(tmp_path):
    from click.testing import CliRunner

    from fluxexport.cli import main

    def refusal(*args) -> str:
        result = CliRunner().invoke(main, ["tiny-lora", *map(str, args)])
        assert result.exit_code == 1
        return result.output.strip().splitlines()[-1]

    assert refusal("tiny-klein", "--format", "xlabs", "--out", tmp_path / "x.safetensors") == (
        "Error: tiny-klein (FLUX.2) takes LoRAs in peft, kohya, ai-toolkit, not xlabs (--format)"
    )
    assert (
        refusal("tiny-dev", "--out", tmp_path / "x.pt")
        == f"Error: {tmp_path / 'x.pt'}: a LoRA file must end in .safetensors (--out)"
    )
    assert refusal("tiny-dev", "--out", tmp_path / "missing" / "x.safetensors") == (
        f"Error: folder {tmp_path / 'missing'} does not exist: create it or choose another --out"
    )
    assert refusal("flux-dev", "--out", tmp_path / "x.safetensors").startswith("Error: unknown tiny variant 'flux-dev'")
    assert list(tmp_path.iterdir()) == []
