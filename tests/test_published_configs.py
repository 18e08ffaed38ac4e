"""Published configs as they are: a config written before a key existed lacks it, and the model then is what the
defining library's default makes it. For every key our code reads from a transformer / VAE / text-encoder /
scheduler / model_index config, a copy of a tiny model without that key runs as the diffusers pipeline on that
same folder (bit for bit, and the transformer spec's inputs follow), or, where the library's default does not fit
a tiny model's shapes, we read the value the library's own config object holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import diffusers_images

from fluxexport.errors import FluxExportError
from fluxexport.families import FLUX2
from fluxexport.models.source import ModelSource, load_folder
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.specs import component_specs

CONFIG_FILES = {
    "model_index": "model_index.json",
    "transformer": "transformer/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}

# (variant, config, key): the library's default runs on the tiny model
RUNNABLE = [
    ("tiny-dev", "transformer", "guidance_embeds"),  # FluxTransformer2DModel: False (schnell-like)
    ("tiny-dev", "transformer", "in_channels"),
    ("tiny-dev", "vae", "scaling_factor"),
    ("tiny-dev", "text_encoder", "max_position_embeddings"),
    ("tiny-dev", "scheduler", "use_dynamic_shifting"),  # False: the static shift 3.0 instead of mu
    ("tiny-schnell", "scheduler", "shift"),
    ("tiny-dev", "scheduler", "base_shift"),
    ("tiny-dev", "scheduler", "max_shift"),
    ("tiny-dev", "scheduler", "base_image_seq_len"),
    ("tiny-dev", "scheduler", "max_image_seq_len"),
    ("tiny-dev", "scheduler", "time_shift_type"),
    ("tiny-flux2-dev", "transformer", "guidance_embeds"),  # FLUX.2 [dev]'s published config lacks it: True
    ("tiny-flux2-dev", "transformer", "in_channels"),  # Flux2Transformer2DModel: 128
    ("tiny-klein", "vae", "latent_channels"),
    ("tiny-klein", "vae", "batch_norm_eps"),
    ("tiny-klein", "model_index", "is_distilled"),  # Flux2KleinPipeline: False (a base model, true CFG)
    ("tiny-klein", "scheduler", "use_dynamic_shifting"),
]

# (variant, config, key): the library's default does not fit a tiny model; we must read that default
LIBRARY_DEFAULT = [
    ("tiny-dev", "transformer", "num_attention_heads"),
    ("tiny-dev", "transformer", "attention_head_dim"),
    ("tiny-dev", "transformer", "joint_attention_dim"),
    ("tiny-dev", "transformer", "pooled_projection_dim"),
    ("tiny-dev", "vae", "latent_channels"),
    ("tiny-dev", "vae", "shift_factor"),
    ("tiny-dev", "text_encoder", "hidden_size"),
    ("tiny-dev", "text_encoder", "vocab_size"),
    ("tiny-dev", "text_encoder_2", "d_model"),
    ("tiny-dev", "text_encoder_2", "vocab_size"),
    ("tiny-dev", "text_encoder_2", "num_heads"),
    ("tiny-klein", "transformer", "num_attention_heads"),
    ("tiny-klein", "transformer", "attention_head_dim"),
    ("tiny-klein", "transformer", "joint_attention_dim"),
    ("tiny-klein", "vae", "block_out_channels"),
    ("tiny-klein", "text_encoder", "hidden_size"),
    ("tiny-klein", "text_encoder", "vocab_size"),
]


@pytest.fixture(scope="module")
def tiny_roots(sources, flux2_sources) -> dict[str, Path]:
    return {name: source.root for name, source in {**sources, **flux2_sources}.items()}


def without_key(root: Path, config: str, key: str, destination: Path) -> Path:
    """A copy of the tiny model folder `root` whose `config` file lacks `key`."""
    folder = destination / root.name
    shutil.copytree(root, folder)
    path = folder / CONFIG_FILES[config]
    data = json.loads(path.read_text())
    assert key in data, f"the tiny writer no longer writes {config} {key}"
    del data[key]
    path.write_text(json.dumps(data))
    return folder


def files_configs(folder: Path) -> dict[str, dict]:
    """The folder's configs as its files hold them (the format itself, not through our reader)."""
    return {part: json.loads((folder / file).read_text()) for part, file in CONFIG_FILES.items()
            if (folder / file).is_file()}  # fmt: skip


def library_value(folder: Path, config: str, key: str):
    """What the defining library's own config object holds for `key` (models built on the meta device)."""
    if config.startswith("text_encoder"):
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(folder / config), key)
    import diffusers

    library_class = getattr(diffusers, json.loads((folder / CONFIG_FILES[config]).read_text())["_class_name"])
    with torch.device("meta"):
        model = library_class.from_config(library_class.load_config(str(folder), subfolder=config))
    return model.config[key]


def plain(value):
    return json.loads(json.dumps(value))


@pytest.mark.parametrize(("variant", "config", "key"), LIBRARY_DEFAULT)
def test_a_missing_key_reads_the_library_default(variant, config, key, tiny_roots, tmp_path):
    folder = without_key(tiny_roots[variant], config, key, tmp_path)
    ours = ModelSource(folder.name, folder, configs=files_configs(folder))  # the width checks would refuse it
    expected = library_value(folder, config, key)
    assert ours.library[config][key] == plain(expected)
    raw = json.loads((tiny_roots[variant] / CONFIG_FILES[config]).read_text())[key]
    assert plain(expected) != raw  # the library's default is not the tiny model's own value: the key mattered


def test_a_config_the_library_refuses_is_refused_in_one_line(tiny_roots, tmp_path):
    """Qwen3's config validates its layer count against its layer types: without `num_hidden_layers` it fails."""
    folder = without_key(tiny_roots["tiny-klein"], "text_encoder", "num_hidden_layers", tmp_path)
    with pytest.raises(FluxExportError) as error:
        load_folder(folder)
    assert str(error.value) == (
        "text_encoder config does not load as Qwen3ForCausalLM: ValueError: `num_hidden_layers` (32) must be equal "
        "to the number of `layer_types` (5): re-download the model"
    )


def test_flux2_language_width_reads_the_nested_default(tiny_roots, tmp_path):
    """Mistral3 nests its language model's config: a `text_config` without `hidden_size` reads Mistral's."""
    from transformers import AutoConfig

    folder = tmp_path / "dev"
    shutil.copytree(tiny_roots["tiny-flux2-dev"], folder)
    path = folder / "text_encoder" / "config.json"
    data = json.loads(path.read_text())
    del data["text_config"]["hidden_size"]
    path.write_text(json.dumps(data))
    ours = ModelSource("dev", folder, configs=files_configs(folder))
    assert ours.language["hidden_size"] == AutoConfig.from_pretrained(folder / "text_encoder").text_config.hidden_size


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "config", "key"), RUNNABLE)
def test_a_missing_key_runs_as_diffusers(variant, config, key, tiny_roots, tmp_path):
    from diffusers import DiffusionPipeline

    from fluxexport.pytorch.backend import TorchBackend

    folder = without_key(tiny_roots[variant], config, key, tmp_path)
    source = load_folder(folder, name=variant)
    pipeline = DiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)

    # the specs follow the library's reading: a `guidance` input exactly when diffusers embeds guidance
    transformer = component_specs(source)["transformer"]
    names = [tensor.name for tensor in transformer.inputs]
    assert ("guidance" in names) == bool(pipeline.transformer.config.guidance_embeds)
    assert transformer.inputs[0].dims[-1] == pipeline.transformer.config.in_channels
    assert source.vae_scale_factor == pipeline.vae_scale_factor

    height, width, steps, seed = 128, 160, 2, 3
    request = GenerationRequest(
        "a cat", height=height, width=width, num_inference_steps=steps, seed=seed, guidance_scale=4.0
    )
    ours = generate(TorchBackend(source, device="cpu"), source, request).images
    if source.family is FLUX2:
        images = pipeline(
            prompt="a cat", height=height, width=width, num_inference_steps=steps, guidance_scale=4.0,
            generator=torch.Generator().manual_seed(seed), output_type="np",
            text_encoder_out_layers=source.text_encoder_layers,
        ).images  # fmt: skip
        theirs = (images * 255).round().astype(np.uint8)
    else:
        theirs = diffusers_images(pipeline, "a cat", height, width, steps, seed, guidance_scale=4.0)
    assert ours.shape == theirs.shape == (1, height, width, 3)
    assert np.array_equal(ours, theirs)


@pytest.mark.slow
def test_text_encoder_layers_of_a_fine_tune(tmp_path, flux2_sources, flux2_pipelines):
    """`--text-encoder-layers` reads other hidden-state layers, as diffusers' `text_encoder_out_layers` does."""
    from click.testing import CliRunner
    from PIL import Image

    from fluxexport.cli import main

    out = tmp_path / "out.png"
    args = ["run", "--model", "tiny-klein", "--prompt", "a cat", "--height", 96, "--width", 128, "--steps", 2,
            "--seed", 4, "--text-encoder-layers", "2,4,5", "--backend", "torch", "--output", out]  # fmt: skip
    result = CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    images = flux2_pipelines["tiny-klein"](
        prompt="a cat", height=96, width=128, num_inference_steps=2, generator=torch.Generator().manual_seed(4),
        output_type="np", text_encoder_out_layers=(2, 4, 5),
    ).images  # fmt: skip
    theirs = (images[0] * 255).round().astype(np.uint8)
    ours = np.array(Image.open(out))
    assert np.array_equal(ours, theirs)
    default = flux2_pipelines["tiny-klein"](
        prompt="a cat", height=96, width=128, num_inference_steps=2, generator=torch.Generator().manual_seed(4),
        output_type="np", text_encoder_out_layers=flux2_sources["tiny-klein"].text_encoder_layers,
    ).images  # fmt: skip
    assert not np.array_equal(ours, (default[0] * 255).round().astype(np.uint8))  # the layers mattered


@pytest.mark.parametrize(
    ("variant", "value", "message"),
    [("tiny-klein", "2,4,9", "--text-encoder-layers 2,4,9 does not fit tiny-klein's text encoder of 5 layers: pass "
      "layers between 0 and 5"),
     ("tiny-klein", "2,4", "--text-encoder-layers 2,4 stacks 2 layers of 32 but tiny-klein's transformer takes "
      "96: pass 3 layers"),
     ("tiny-schnell", "9,18,27", "--text-encoder-layers is for FLUX.2 models; tiny-schnell is FLUX.1: leave it out"),
     ("tiny-klein", "nine", "Invalid value for '--text-encoder-layers': 'nine' is not a list of layer numbers such "
      "as 9,18,27")],
)  # fmt: skip
def test_text_encoder_layers_are_checked(variant, value, message, sources, flux2_sources, tmp_path):
    from click.testing import CliRunner

    from fluxexport.cli import main

    args = ["run", "--model", variant, "--prompt", "a cat", "--text-encoder-layers", value, "--output",
            tmp_path / "out.png"]  # fmt: skip
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == f"Error: {message}"
    assert not (tmp_path / "out.png").exists()
