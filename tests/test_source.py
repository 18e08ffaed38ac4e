import json
import shutil

import huggingface_hub.constants
import pytest

from fluxexport.errors import FluxExportError
from fluxexport.models.source import load_folder, resolve_model


def test_tiny_names_resolve_to_the_cache(sources, cache_root):
    assert sources["tiny-schnell"].root == cache_root / "tiny" / "tiny-schnell"
    assert resolve_model("tiny-schnell").root == sources["tiny-schnell"].root


def test_missing_folder(tmp_path):
    with pytest.raises(FluxExportError, match="does not exist"):
        load_folder(tmp_path / "nope")


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(FluxExportError, match="has no model_index.json"):
        load_folder(tmp_path)


def test_incomplete_folder_names_missing_parts(tmp_path, sources):
    folder = tmp_path / "partial"
    shutil.copytree(sources["tiny-dev"].root, folder)
    shutil.rmtree(folder / "vae")
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(FluxExportError) as error:
        load_folder(folder)
    assert str(error.value) == f"FLUX.1 model folder {folder} is incomplete: missing vae, tokenizer_2"


def test_hub_id_offline_names_the_id(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FluxExportError) as error:
        resolve_model("black-forest-labs/FLUX.1-schnell")
    assert "'black-forest-labs/FLUX.1-schnell'" in str(error.value)
    assert "unreachable" in str(error.value)


def test_hub_id_from_the_local_hub_cache(monkeypatch, tmp_path, sources):
    """A hub id resolves through huggingface_hub's cache layout (what a download leaves behind)."""
    hub = tmp_path / "hub"
    repo = hub / "models--acme--tiny-flux"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(sources["tiny-schnell"].root, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    source = resolve_model("acme/tiny-flux")
    assert source.name == "tiny-flux"
    assert source.root == repo / "snapshots" / revision
    assert source.configs == sources["tiny-schnell"].configs


def test_single_file_needs_a_base_model(tmp_path):
    checkpoint = tmp_path / "flux1-dev.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(FluxExportError, match="holds only the transformer: add --base-model"):
        resolve_model(str(checkpoint))


def test_invalid_json_is_a_clear_error(tmp_path, sources):
    folder = tmp_path / "broken"
    shutil.copytree(sources["tiny-schnell"].root, folder)
    (folder / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(FluxExportError, match="is not valid JSON"):
        load_folder(folder)


def test_model_defaults(sources):
    schnell, dev = sources["tiny-schnell"], sources["tiny-dev"]
    assert (schnell.default_steps, schnell.default_max_sequence_length, schnell.guidance_embeds) == (4, 256, False)
    assert (dev.default_steps, dev.default_max_sequence_length, dev.guidance_embeds) == (28, 512, True)
    assert json.loads((schnell.root / "fluxexport_tiny.json").read_text())["variant"] == "tiny-schnell"
    assert schnell.fingerprint() != dev.fingerprint()


@pytest.mark.parametrize(
    ("part", "key", "value", "message"),
    [
        ("text_encoder", "hidden_size", 48,
         "text_encoder/config.json hidden_size is 48 but the transformer's pooled_projection_dim is 32"),
        ("text_encoder_2", "d_model", 64,
         "text_encoder_2/config.json d_model is 64 but the transformer's joint_attention_dim is 32"),
        ("vae", "latent_channels", 4, "vae/config.json latent_channels × 4 is 16 but the transformer's out_channels is 64"),
    ],
)  # fmt: skip
def test_parts_of_different_widths_are_refused_at_load(tmp_path, sources, part, key, value, message):
    folder = tmp_path / "mixed"
    shutil.copytree(sources["tiny-dev"].root, folder)
    config = folder / part / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {key: value}))
    with pytest.raises(FluxExportError) as error:
        load_folder(folder)
    assert str(error.value) == f"{folder}: {message}: the parts come from different models"


def test_a_changed_checkpoint_of_the_same_name_is_said_so(sources):
    from fluxexport.models.source import made_from

    assert made_from("tiny-schnell", sources["tiny-dev"]) == "'tiny-schnell', not from 'tiny-dev'"
    assert (
        made_from("tiny-dev", sources["tiny-dev"])
        == "'tiny-dev' as it was then (its files, LoRAs or --text-encoder-layers have changed since)"
    )


@pytest.mark.parametrize(
    ("variant", "pipeline", "title"),
    [("tiny-klein", "Flux2KleinKVPipeline", "FLUX.2"), ("tiny-klein", "Flux2KleinInpaintPipeline", "FLUX.2")],
)  # fmt: skip
def test_a_flux_pipeline_we_do_not_run_is_refused(variant, pipeline, title, tmp_path, sources, flux2_sources):
    """klein 9B KV and inpainting load their FLUX transformer but run it otherwise: refused, not run as the plain
    pipeline."""
    folder = tmp_path / pipeline
    shutil.copytree({**sources, **flux2_sources}[variant].root, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": pipeline}))
    with pytest.raises(FluxExportError) as error:
        load_folder(folder)
    assert str(error.value) == (
        f"pipeline {pipeline!r} is a {title} pipeline fluxexport does not run: it runs FluxPipeline, "
        "FluxKontextPipeline, FluxFillPipeline, FluxControlPipeline, Flux2KleinPipeline, Flux2Pipeline; export a "
        "checkpoint of one of those"
    )


@pytest.mark.parametrize(("pipeline", "condition"), [("FluxFillPipeline", 320), ("FluxControlPipeline", 64)])
def test_a_tool_pipeline_over_a_plain_transformer_is_refused(pipeline, condition, tmp_path, sources):
    """FLUX.1 Fill and Canny/Depth need their wider transformer: a FLUX.1-dev transformer under their pipeline
    class is refused when the folder opens, naming both widths."""
    folder = tmp_path / pipeline
    shutil.copytree(sources["tiny-dev"].root, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": pipeline}))
    with pytest.raises(FluxExportError) as error:
        load_folder(folder)
    assert str(error.value) == (
        f"{folder}: {pipeline}'s input (4 × 16 latent + {condition} condition channels) is {64 + condition} but the "
        "transformer's in_channels is 64: the parts come from different models"
    )


# A published FLUX.2 [klein] repository's files: BFL's single file at the root, weights in both formats
KLEIN_REPO_FILES = [
    "model_index.json", "README.md", "flux-2-klein-4b.safetensors",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
    "transformer/diffusion_pytorch_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
    "text_encoder/config.json", "text_encoder/model-00001-of-00002.safetensors",
    "text_encoder/model-00002-of-00002.safetensors", "text_encoder/model.safetensors.index.json",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.bin.index.json",
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/chat_template.jinja",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
]  # fmt: skip


def test_hub_download_takes_what_the_pipeline_reads(monkeypatch, tmp_path, flux2_sources):
    """The download filter is diffusers' own (`DiffusionPipeline.download`), over the repository's listing: the
    tokenizer's chat template comes along; pickled weights, the root single file and the README stay behind."""
    import types

    import diffusers.pipelines.pipeline_utils as pipeline_utils
    from huggingface_hub.utils import filter_repo_objects

    snapshot = tmp_path / "snapshot"
    shutil.copytree(flux2_sources["tiny-klein"].root, snapshot)
    asked: dict = {}

    def snapshot_download(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        return str(snapshot)

    listing = types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=name) for name in KLEIN_REPO_FILES])
    monkeypatch.setattr(pipeline_utils, "_resolve_revision", lambda *args, **kwargs: None)
    monkeypatch.setattr(pipeline_utils, "model_info", lambda *args, **kwargs: listing)
    monkeypatch.setattr(pipeline_utils, "hf_hub_download", lambda repo_id, name, **kwargs: str(snapshot / name))
    monkeypatch.setattr(pipeline_utils, "snapshot_download", snapshot_download)
    source = resolve_model("acme/klein-4b")
    assert (source.name, source.root, asked["repo_id"]) == ("klein-4b", snapshot, "acme/klein-4b")
    patterns = {"allow_patterns": asked["allow_patterns"], "ignore_patterns": asked["ignore_patterns"]}
    fetched = set(filter_repo_objects(KLEIN_REPO_FILES, **patterns))
    assert fetched == {
        "model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
        "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
        "tokenizer/chat_template.jinja", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
    }  # fmt: skip


def test_hub_repository_without_safetensors_is_refused(monkeypatch, tmp_path, flux2_sources):
    import types

    import diffusers.pipelines.pipeline_utils as pipeline_utils

    snapshot = tmp_path / "snapshot"
    shutil.copytree(flux2_sources["tiny-klein"].root, snapshot)
    pickled = [name for name in KLEIN_REPO_FILES if not name.endswith(".safetensors")]
    listing = types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=name) for name in pickled])
    monkeypatch.setattr(pipeline_utils, "_resolve_revision", lambda *args, **kwargs: None)
    monkeypatch.setattr(pipeline_utils, "model_info", lambda *args, **kwargs: listing)
    monkeypatch.setattr(pipeline_utils, "hf_hub_download", lambda repo_id, name, **kwargs: str(snapshot / name))
    with pytest.raises(FluxExportError) as error:
        resolve_model("acme/klein-4b")
    assert str(error.value) == (
        "hub repository 'acme/klein-4b' has no safetensors weights for every part: fluxexport reads safetensors only"
    )
