import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_flux_transformer_checkpoint_to_diffusers,
)
from safetensors.torch import load_file, save_file

from fluxexport.compare import psnr
from fluxexport.errors import FluxExportError
from fluxexport.families import FLUX2
from fluxexport.models.checkpoint import CheckpointTensors
from fluxexport.models.single_file import BFL_PREFIX, bfl_to_diffusers, diffusers_to_bfl, load_bfl_transformer
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


@pytest.mark.parametrize(
    ("model_class", "converter", "single"),
    [
        (FluxTransformer2DModel, convert_flux_transformer_checkpoint_to_diffusers, 2),
        (Flux2Transformer2DModel, convert_flux2_transformer_checkpoint_to_diffusers, 3),
    ],
)
def test_mapping_agrees_with_diffusers_converter_at_full_width(model_class, converter, single):
    """Several blocks of each kind at the published widths (FLUX.1-dev's, FLUX.2 [dev]'s; diffusers' FLUX.1
    converter only handles FLUX.1's real width), on meta tensors (shapes, no memory)."""
    with torch.device("meta"):
        model = model_class(num_layers=2, num_single_layers=single, guidance_embeds=True)
    checkpoint = diffusers_to_bfl(model.state_dict())
    ours = bfl_to_diffusers(dict(checkpoint))
    theirs = converter(dict(checkpoint))
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


# FLUX.2: `flux2-dev.safetensors` and the [klein] files, read into Flux2Transformer2DModel's keys.


@pytest.fixture(scope="module")
def flux2_bfl_files(flux2_sources, tmp_path_factory):
    """tiny-klein's and tiny-flux2-dev's (guidance embedder) transformers written in BFL's FLUX.2 layout."""
    folder = tmp_path_factory.mktemp("bfl-flux2")
    return {name: write_bfl_single_file(flux2_sources[name].root, folder / f"{name}-bfl.safetensors")
            for name in ("tiny-klein", "tiny-flux2-dev")}  # fmt: skip


def folder_state(source):
    return load_file(str(source.root / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("name", ["tiny-klein", "tiny-flux2-dev"])
def test_flux2_conversion_equals_diffusers_converter(name, flux2_bfl_files):
    checkpoint = load_file(str(flux2_bfl_files[name]))
    assert "model.diffusion_model.single_stream_modulation.lin.weight" in checkpoint
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in checkpoint
    assert ("model.diffusion_model.guidance_in.in_layer.weight" in checkpoint) == (name == "tiny-flux2-dev")
    ours = bfl_to_diffusers(dict(checkpoint))
    # diffusers' converter takes the keys without the `model.diffusion_model.` prefix (its loader strips it)
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(
        {k.removeprefix(BFL_PREFIX): v for k, v in checkpoint.items()}
    )
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


@pytest.mark.parametrize("name", ["tiny-klein", "tiny-flux2-dev"])
def test_flux2_round_trip_gives_the_folder_back(name, flux2_bfl_files, flux2_sources):
    original = folder_state(flux2_sources[name])
    converted = bfl_to_diffusers(load_file(str(flux2_bfl_files[name])))
    assert set(converted) == set(original)
    assert all(torch.equal(converted[key], original[key]) for key in original)
    loaded = load_bfl_transformer(flux2_bfl_files[name], flux2_sources[name].root)
    assert type(loaded) is Flux2Transformer2DModel
    assert all(torch.equal(value, original[key]) for key, value in loaded.state_dict().items())


def test_flux2_fused_qkv_streams_by_rows(flux2_bfl_files, flux2_sources):
    source = resolve_model(str(flux2_bfl_files["tiny-flux2-dev"]), base="tiny-flux2-dev")
    streamed = CheckpointTensors(source, "transformer")
    original = folder_state(flux2_sources["tiny-flux2-dev"])
    assert set(streamed.locations) == set(original)
    assert streamed.locations["transformer_blocks.0.attn.add_k_proj.weight"].rows == (32, 64)
    assert streamed.locations["single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"].rows is None
    assert streamed.locations["norm_out.linear.weight"].swap_halves
    assert all(torch.equal(streamed.load(key), original[key]) for key in original)


def realigned(backend):
    """`backend` with its transformer's weights copied to fresh (allocator-aligned) memory. A safetensors file
    is memory-mapped with its tensors wherever its header's length puts them, and the CPU GEMM rounds differently
    at different alignments: two files holding the same weights compute alike, bit for bit, once both are
    realigned (without, this run differs from the folder's in 7 pixels by 1)."""
    for parameter in backend.module("transformer").parameters():
        parameter.data = parameter.data.clone()
    return backend


def test_flux2_single_file_run_equals_folder_run(flux2_bfl_files, flux2_sources):
    from fluxexport.pytorch.backend import TorchBackend

    source = resolve_model(str(flux2_bfl_files["tiny-klein"]), base="tiny-klein")
    assert source.family is FLUX2 and source.transformer_file == flux2_bfl_files["tiny-klein"]
    assert source.name == "tiny-klein-bfl" and source.root == flux2_sources["tiny-klein"].root
    request = GenerationRequest("a red fox", height=128, width=192, num_inference_steps=2, seed=9)
    ours = generate(realigned(TorchBackend(source, device="cpu")), source, request).images
    folder = flux2_sources["tiny-klein"]
    assert np.array_equal(ours, generate(realigned(TorchBackend(folder, device="cpu")), folder, request).images)


@pytest.mark.slow
def test_flux2_streamed_export_from_a_single_file_equals_the_folders(flux2_bfl_files, flux2_dev_export, tmp_path):
    """The transformer streamed from the single file (row slices of the fused qkv, the swapped final modulation)
    is the session's export from the folder: the same graph on bit-identical weights, the same outputs."""
    import onnxruntime
    from helpers import assert_same_graph

    from fluxexport.export.onnx_export import export_component
    from fluxexport.specs import component_specs, sample_inputs

    single = resolve_model(str(flux2_bfl_files["tiny-flux2-dev"]), base="tiny-flux2-dev")
    spec = component_specs(single)["transformer"]
    ours = export_component(single, spec, tmp_path, "fp32")  # streams by default
    theirs = flux2_dev_export / "transformer.onnx"
    assert_same_graph(ours.path, theirs)
    feeds = {key: value.numpy() for key, value in sample_inputs(spec, spec.export_sizes, seed=3).items()}
    (latent,) = onnxruntime.InferenceSession(str(ours.path)).run(None, feeds)
    (expected,) = onnxruntime.InferenceSession(str(theirs)).run(None, feeds)
    assert np.linalg.norm(latent - expected) / np.linalg.norm(expected) <= 1e-6


def test_a_single_file_of_the_other_family_is_refused(bfl_checkpoint, flux2_bfl_files, flux2_sources, sources):
    with pytest.raises(FluxExportError) as error:
        resolve_model(str(bfl_checkpoint), base="tiny-klein")
    assert str(error.value) == (
        f"flux1-tiny.safetensors is a FLUX.1 transformer but the base model {flux2_sources['tiny-klein'].root} is "
        "FLUX.2: pass a FLUX.1 --base-model"
    )
    with pytest.raises(FluxExportError) as error:
        resolve_model(str(flux2_bfl_files["tiny-klein"]), base="tiny-dev")
    assert str(error.value) == (
        f"tiny-klein-bfl.safetensors is a FLUX.2 transformer but the base model {sources['tiny-dev'].root} is FLUX.1: "
        "pass a FLUX.2 --base-model"
    )


def test_flux2_files_truncated_or_foreign_are_refused(flux2_bfl_files, flux2_sources, tmp_path):
    state = load_file(str(flux2_bfl_files["tiny-klein"]))
    truncated, fp8 = tmp_path / "truncated.safetensors", tmp_path / "fp8.safetensors"
    save_file({k: v for k, v in state.items() if not k.endswith("txt_attn.qkv.weight")}, str(truncated))
    save_file(state | {BFL_PREFIX + "single_blocks.0.linear1.weight_scale": torch.ones(1)}, str(fp8))
    with pytest.raises(FluxExportError) as error:
        CheckpointTensors(resolve_model(str(truncated), base="tiny-klein"), "transformer")
    assert str(error.value) == (
        "checkpoint is missing double_blocks.0.txt_attn.qkv.weight: it is truncated or not a FLUX.2 transformer"
    )
    with pytest.raises(FluxExportError) as error:
        load_bfl_transformer(fp8, flux2_sources["tiny-klein"].root)
    assert str(error.value) == (
        "checkpoint has keys FLUX.2 does not (single_blocks.0.linear1.weight_scale): it is not a FLUX.2 transformer"
    )


def test_cli_runs_a_flux2_single_file(flux2_bfl_files, bfl_checkpoint, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from fluxexport.cli import main

    def run(model, out):
        args = ["run", "--model", model, "--base-model", "tiny-klein", "--prompt", "x", "--backend", "torch",
                "--steps", 1, "--output", out]  # fmt: skip
        return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)

    result = run(flux2_bfl_files["tiny-klein"], tmp_path / "x.png")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "x.png").size == (256, 256)
    result = run(bfl_checkpoint, tmp_path / "y.png")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: flux1-tiny.safetensors is a FLUX.1 transformer")
    assert not (tmp_path / "y.png").exists()
