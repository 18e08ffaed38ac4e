"""FLUX.2's text encoder held one decoder layer at a time: the streamed LM (Qwen3, or Mistral3's language model)
embeds prompts exactly as the whole float32 model does, never reads what its adapter does not run (the LM head,
the vision tower and projector, the layers past the deepest read, the cut-off final norm), and sequential
calibration streams it and gives the whole model's scales; and every FLUX.2 module streamed gives the whole
model's image."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxexport.adapters import adapter_for
from fluxexport.models.checkpoint import CheckpointTensors
from fluxexport.models.loaders import load_module
from fluxexport.models.meta import weightless_module
from fluxexport.models.source import load_folder, resolve_model
from fluxexport.pytorch.backend import TorchBackend
from fluxexport.pytorch.block_streaming import streamed_module
from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings
from fluxexport.quantize.qdq_export import calibrate_transformer

PROMPTS = ["a red fox sitting in fresh snow in a misty pine forest at dawn", "a cat"]
SETTINGS = CalibrationSettings(CALIBRATION_PROMPTS[:2], steps=2, height=128, width=128)


@pytest.fixture(scope="module")
def klein(cache_root):
    return resolve_model("tiny-klein")


def copy_of(source, folder):
    shutil.copytree(source.root, folder)
    return folder


def with_bf16_text_encoder(source, folder):
    """A copy of `source` with its text encoder stored in bf16, as published checkpoints are."""
    copy_of(source, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    save_file({key: value.to(torch.bfloat16) for key, value in load_file(str(weights)).items()}, str(weights))
    return load_folder(folder)


@pytest.fixture(scope="module")
def klein_bf16(klein, tmp_path_factory):
    return with_bf16_text_encoder(klein, tmp_path_factory.mktemp("klein-bf16") / "tiny-klein-bf16")


@pytest.fixture(scope="module")
def mistral3(tmp_path_factory):
    """tiny-flux2-dev (FLUX.2 [dev]'s text encoder class, Mistral3ForConditionalGeneration: a Mistral language model
    at `model.language_model`, an untied LM head, a Pixtral vision tower and a projector) with its text encoder
    stored in bf16, under the keys transformers saves (`language_model.model.…`)."""
    dev = resolve_model("tiny-flux2-dev")
    source = with_bf16_text_encoder(dev, tmp_path_factory.mktemp("mistral3") / "tiny-flux2-dev-bf16")
    assert source.text_encoder["architectures"] == ["Mistral3ForConditionalGeneration"]
    assert max(source.text_encoder_layers) < source.text_encoder["text_config"]["num_hidden_layers"]
    return source


@pytest.fixture(scope="module")
def text_sources(klein, klein_bf16, mistral3):
    return {"tiny-klein": klein, "bf16-stored": klein_bf16, "mistral3": mistral3}


def tokens(source) -> tuple[torch.Tensor, torch.Tensor]:
    """Both prompts padded to 24 tokens: the short one is mostly padding."""
    (tokenizer,) = source.tokenizers
    batch = tokenizer(PROMPTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    lengths = batch.attention_mask.sum(dim=1)
    assert lengths[0] > lengths[1] and lengths[0] < 24
    return batch.input_ids, batch.attention_mask


def embed(source, module: torch.nn.Module) -> torch.Tensor:
    adapter = adapter_for(source, "text_encoder", module, float32_rope=False)
    with torch.inference_mode():
        return adapter(*tokens(source))


@pytest.mark.parametrize("variant", ["tiny-klein", "bf16-stored", "mistral3"])
def test_streamed_text_encoder_embeds_as_the_whole_float32_model(variant, text_sources):
    """Bit for bit: the same float32 operations on the same values in the same order. A bf16 checkpoint's layers
    are held in bf16 and upcast module by module (bf16 → float32 is exact), the whole model was upcast at load."""
    source = text_sources[variant]
    whole = embed(source, load_module(source, "text_encoder", torch.float32))
    streamed = streamed_module(source, "text_encoder", torch.float32)
    assert torch.equal(embed(source, streamed), whole)
    held = {p.dtype for p in streamed.parameters() if p.device.type != "meta"}
    assert held == ({torch.float32} if variant == "tiny-klein" else {torch.bfloat16})
    layers = [name for name, p in streamed.named_parameters() if ".layers." in name]
    assert layers and all(streamed.get_parameter(name).device.type == "meta" for name in layers)


# per LM: where it keeps its decoder stack, tensors it holds that the text encoder never runs, and what a streamed
# one holds between runs (the embedding table; Qwen3's LM head is tied to it: the same tensor)
LAYOUTS = {
    "tiny-klein": ("model.", {"model.norm.weight"}, {"model.embed_tokens.weight", "lm_head.weight"}),
    "mistral3": (
        "model.language_model.",
        {"model.language_model.norm.weight", "lm_head.weight", "model.vision_tower.ln_pre.weight",
         "model.multi_modal_projector.linear_1.weight"},
        {"model.language_model.embed_tokens.weight"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("variant", ["tiny-klein", "mistral3"])
def test_what_the_adapter_never_runs_is_never_read(variant, text_sources, monkeypatch):
    """Only the embedding table and the layers up to the deepest read are read, each once; the LM head, the vision
    tower and projector, the layers past the deepest read and the final norm are not, and stay on meta."""
    source = text_sources[variant]
    stack, never_run, held = LAYOUTS[variant]
    read: list[str] = []
    load = CheckpointTensors.load

    def recorded(self, name, dtype=None):
        read.append(name)
        return load(self, name, dtype)

    monkeypatch.setattr(CheckpointTensors, "load", recorded)
    streamed = streamed_module(source, "text_encoder", torch.float32)
    embed(source, streamed)
    deepest = max(source.text_encoder_layers)
    runs = (f"{stack}embed_tokens.", *(f"{stack}layers.{index}." for index in range(deepest)))
    names = {name for name, _ in weightless_module(source, "text_encoder").named_parameters()}
    assert sorted(read) == sorted(name for name in names if name.startswith(runs))
    assert never_run | {f"{stack}layers.{deepest}.mlp.up_proj.weight"} <= names - set(read)
    real = {name for name, p in streamed.named_parameters(remove_duplicate=False) if p.device.type != "meta"}
    assert real == held


def test_sequential_calibration_streams_the_text_encoder(klein, monkeypatch):
    """The same scales as the whole float32 model (as FLUX.1's sequential calibration, tests/test_sequential.py),
    and the whole text encoder is never loaded: no second backend holds it."""
    import fluxexport.models.loaders as loaders

    whole = calibrate_transformer(klein, SETTINGS, "cpu")
    load = loaders.load_library_module  # every module but the transformer loads through it

    def refuse_text_encoder(source, module, *args, **kwargs):
        return pytest.fail("loaded whole") if module == "text_encoder" else load(source, module, *args, **kwargs)

    monkeypatch.setattr(loaders, "load_library_module", refuse_text_encoder)
    sequential = calibrate_transformer(klein, SETTINGS, "cpu", sequential=True)
    assert sequential.input_amax.keys() == whole.input_amax.keys()
    assert all(abs(sequential.input_amax[k] - v) <= 1e-6 * v for k, v in whole.input_amax.items())
    assert sequential.weight_amax == whole.weight_amax
    assert sequential.transformer_calls == whole.transformer_calls == 2 * 2


def test_streamed_backend_images_equal_the_whole_model(flux2_sources):
    """Every FLUX.2 module streamed (the text encoder's layers, the transformer's blocks, the VAE with the
    checkpoint's batch-norm statistics, not the config's defaults) gives the whole model's image bit for bit."""
    import numpy as np

    from fluxexport.runtime.pipeline import GenerationRequest, generate

    source = flux2_sources["tiny-klein"]
    request = GenerationRequest("a cat", height=128, width=128, num_inference_steps=2, seed=1)
    whole = generate(TorchBackend(source, device="cpu"), source, request).images
    streamed = generate(TorchBackend(source, device="cpu", stream_blocks=True), source, request).images
    assert np.array_equal(streamed, whole)
