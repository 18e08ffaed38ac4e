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
        == "unknown tiny variant 'tiny-pro': choose one of tiny-schnell, tiny-dev, tiny-kontext, tiny-klein, tiny-klein-base, tiny-flux2-dev"
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
