import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from fluxexport.compare import psnr
from fluxexport.errors import FluxExportError
from fluxexport.models.single_file import bfl_to_diffusers, diffusers_to_bfl, load_bfl_transformer
from fluxexport.models.source import resolve_model
from fluxexport.models.tiny import write_bfl_single_file
from fluxexport.runtime.pipeline import GenerationRequest, generate


@pytest.fixture(scope="module")
def bfl_checkpoint(sources, tmp_path_factory):
    return write_bfl_single_file(sources["tiny-dev"].root, tmp_path_factory.mktemp("bfl") / "flux1-tiny.safetensors")


def test_written_file_has_bfl_keys(bfl_checkpoint):
    keys = set(load_file(str(bfl_checkpoint)))
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in keys
    assert "model.diffusion_model.single_blocks.0.linear1.weight" in keys
    assert "model.diffusion_model.final_layer.adaLN_modulation.1.weight" in keys
    assert not any("transformer_blocks" in key for key in keys)


def test_loads_to_the_identical_transformer(bfl_checkpoint, sources):
    original = FluxTransformer2DModel.from_pretrained(sources["tiny-dev"].root, subfolder="transformer").state_dict()
    loaded = load_bfl_transformer(bfl_checkpoint, sources["tiny-dev"].root).state_dict()
    assert set(loaded) == set(original)
    assert all(torch.equal(loaded[key], original[key]) for key in original)


def test_mapping_agrees_with_diffusers_converter_at_full_width():
    """diffusers' converter only handles FLUX.1's real width: compare on meta tensors (shapes, no memory)."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    checkpoint = diffusers_to_bfl(model.state_dict())
    ours = bfl_to_diffusers(dict(checkpoint))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))
    assert set(ours) == set(theirs) == set(model.state_dict())
    assert all(ours[key].shape == theirs[key].shape for key in ours)


def test_single_file_run_equals_folder_run(bfl_checkpoint, sources, torch_backends):
    from fluxexport.pytorch.backend import TorchBackend

    source = resolve_model(str(bfl_checkpoint), base="tiny-dev")
    assert source.transformer_file == bfl_checkpoint and source.name == "flux1-tiny"
    request = GenerationRequest("a red fox", height=144, width=272, num_inference_steps=3, seed=9)
    ours = generate(TorchBackend(source, device="cpu"), source, request).images
    folder = generate(torch_backends["tiny-dev"], sources["tiny-dev"], request).images
    # Same weights, but diffusers' mmapped tensors sit at unaligned addresses and the CPU GEMM rounds
    # differently on them: equal up to float32 rounding, not bit for bit.
    assert psnr(ours, folder) >= 50
    assert np.abs(ours.astype(int) - folder.astype(int)).max() <= 1


def test_wrong_checkpoints_are_refused(tmp_path, bfl_checkpoint, sources):
    not_flux = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(not_flux))
    with pytest.raises(FluxExportError, match="not a black-forest-labs FLUX transformer checkpoint"):
        load_bfl_transformer(not_flux, sources["tiny-dev"].root)
    # a dev checkpoint (guidance embedder) does not fit schnell's config
    with pytest.raises(FluxExportError, match="does not fit"):
        load_bfl_transformer(bfl_checkpoint, sources["tiny-schnell"].root)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(FluxExportError, match="cannot read"):
        load_bfl_transformer(garbage, sources["tiny-dev"].root)
