"""Black Forest Labs' Canny/Depth LoRAs over FLUX.1-dev: a LoRA that widens the transformer's `x_embedder` input
(64 → 128 features) turns tiny-dev into a FluxControlPipeline model, merged as diffusers' `load_lora_weights` +
`fuse_lora` leaves the transformer (bit for bit), through the export; where it cannot apply (a swap into graphs
exported at the base width, a pipeline without a control variant, a width the control pipeline does not take) it is
refused in one line."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import diffusers_images, flux1_source
from safetensors.torch import load_file, save_file

from fluxexport.cli import main
from fluxexport.errors import FluxExportError
from fluxexport.families.family import CONTROL_CONDITION, NO_REFERENCE
from fluxexport.models.lora import LoraSet, parse_lora
from fluxexport.runtime.pipeline import GenerationRequest, generate

SCALE = 0.8
PROMPT = "a glass house on a hill"


@pytest.fixture(scope="module")
def control_lora(sources, tmp_path_factory):
    """A tiny Canny/Depth LoRA for tiny-dev, written by `fluxexport tiny-lora --format control`'s writer."""
    from fluxexport.models.tiny_lora import write_tiny_lora

    return write_tiny_lora(sources["tiny-dev"], tmp_path_factory.mktemp("control-lora") / "canny-lora.safetensors",
                           "control")  # fmt: skip


@pytest.fixture(scope="module")
def merged(sources, control_lora):
    return sources["tiny-dev"].with_loras([parse_lora(f"{control_lora}:{SCALE}")])


@pytest.fixture(scope="module")
def edges():
    """A random edge map (white edges on black) of another size than the output."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(((rng.random((100, 150)) > 0.8) * 255).astype(np.uint8)).convert("RGB")


def test_a_control_lora_makes_dev_a_control_model(sources, merged, control_lora):
    dev = sources["tiny-dev"]
    assert (merged.pipeline_class, merged.reference_mode) == ("FluxControlPipeline", CONTROL_CONDITION)
    assert (merged.transformer["in_channels"], merged.transformer["out_channels"]) == (128, 64)
    assert (dev.pipeline_class, dev.reference_mode, dev.transformer["in_channels"]) == (
        "FluxPipeline", NO_REFERENCE, 64,
    )  # fmt: skip
    assert merged.with_loras(()).transformer["in_channels"] == 64 and merged.fingerprint() != dev.fingerprint()
    from fluxexport.specs import component_specs

    spec = component_specs(merged)["transformer"]
    hidden = next(tensor for tensor in spec.inputs if tensor.name == "hidden_states")
    assert hidden.dims[-1] == 128  # the export's input: 64 latent + 64 control-image latent channels
    lora = LoraSet([parse_lora(str(control_lora))])
    assert lora.input_width("transformer", "x_embedder") == 128
    assert sorted(lora.replaced["transformer"]) == [
        "single_transformer_blocks.0.attn.norm_k.weight", "single_transformer_blocks.0.attn.norm_q.weight",
        "transformer_blocks.0.attn.norm_added_k.weight", "transformer_blocks.0.attn.norm_added_q.weight",
        "transformer_blocks.0.attn.norm_k.weight", "transformer_blocks.0.attn.norm_q.weight",
    ]  # fmt: skip


def test_merged_like_diffusers_load_lora_weights_and_fuse(merged, sources, control_lora, edges):
    """Every transformer tensor equals diffusers' FluxControlPipeline after `load_lora_weights` + `fuse_lora`
    (widened x_embedder, lora_B biases, the norms replaced at any scale), and so does the image, byte for byte
    (odd size, two prompts × two images)."""
    from diffusers import FluxControlPipeline

    from fluxexport.models.loaders import load_transformer
    from fluxexport.pytorch.backend import TorchBackend

    pipeline = FluxControlPipeline.from_pretrained(sources["tiny-dev"].root, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(str(control_lora))
    pipeline.fuse_lora(lora_scale=SCALE)
    theirs = {name.replace(".base_layer", ""): tensor for name, tensor in pipeline.transformer.state_dict().items()
              if "lora_" not in name}  # fmt: skip
    ours = load_transformer(merged).state_dict()
    assert sorted(ours) == sorted(theirs) and ours["x_embedder.weight"].shape == (theirs["x_embedder.weight"].shape)
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []
    base = load_transformer(sources["tiny-dev"]).state_dict()
    assert not torch.equal(ours["transformer_blocks.0.attn.norm_q.weight"], base["transformer_blocks.0.attn.norm_q.weight"])
    prompts, height, width = [PROMPT, "a stone tower"], 80, 112
    request = GenerationRequest(
        prompts, height=height, width=width, num_inference_steps=2, seed=5, num_images_per_prompt=2,
        control_image=edges, max_sequence_length=64,
    )  # fmt: skip
    with TorchBackend(merged, "fp32", "cpu") as backend:
        images = generate(backend, merged, request).images
    reference = diffusers_images(pipeline, prompts, height, width, 2, 5, 2, control_image=edges, max_sequence_length=64)
    assert images.shape == (4, height, width, 3) and np.array_equal(images, reference)


def refusal(args) -> str:
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code == 1, result.output
    return result.output.strip().splitlines()[-1]


def test_a_widening_lora_is_refused_where_it_cannot_apply(sources, exports, merged, control_lora, edges, tmp_path):
    from fluxexport.artifacts.folders import open_export
    from fluxexport.onnxruntime.backend import swapped_initializers

    name = control_lora.name
    edges.save(tmp_path / "edges.png")
    run = ["run", "--prompt", PROMPT, "--height", 64, "--width", 64, "--steps", 1, "--output", tmp_path / "x.png"]
    # swapped into graphs exported at the base width (run --lora on a base export; the same check guards refit
    # and a Triton repository's per-request LoRAs): export with it merged instead
    assert refusal([*run, "--model", "tiny-dev", "--backend", "onnxruntime", "--engines", exports["tiny-dev"],
                    "--lora", control_lora, "--control-image", tmp_path / "edges.png"]) == (
        f"Error: LoRA {name} widens the transformer's x_embedder to 128 input features (a Canny/Depth LoRA), which "
        f"the graphs in {exports['tiny-dev']} (exported at the base model's width) cannot swap in: export with it "
        f"merged (fluxexport export --lora {name})"
    )  # fmt: skip
    with pytest.raises(FluxExportError, match=r"which transformer\.onnx \(exported at the base model's width\) cannot"):
        swapped_initializers(merged, merged.lora_set, "transformer", open_export(exports["tiny-dev"]).graphs()["transformer"])
    # refit into refittable base engines, a Triton repository's per-request LoRAs: refused before anything is written
    from helpers import build_folder, standin_tensorrt

    from fluxexport.tensorrt.refit import refit_engines
    from fluxexport.triton.repository import write_repository

    engines = build_folder(sources["tiny-dev"], exports["tiny-dev"], tmp_path / "engines", components=["transformer"],
                           refittable=True)  # fmt: skip
    before = sorted(path.name for path in engines.iterdir())
    with standin_tensorrt(), pytest.raises(FluxExportError) as error:
        refit_engines(merged, engines)
    assert str(error.value).endswith(f"which the engines in {engines} (exported at the base model's width) cannot "
                                     f"swap in: export with it merged (fluxexport export --lora {name})")  # fmt: skip
    assert sorted(path.name for path in engines.iterdir()) == before
    with pytest.raises(FluxExportError, match=r"which transformer\.onnx \(exported at the base model's width\) cannot"):
        write_repository(sources["tiny-dev"], exports["tiny-dev"], tmp_path / "repo", request_loras=merged.loras)
    assert not (tmp_path / "repo").exists()
    assert not (tmp_path / "x.png").exists()
    # a pipeline without a control variant (Kontext)
    assert refusal([*run, "--model", "tiny-kontext", "--lora", control_lora]) == (
        f"Error: LoRA {name} widens the transformer's input to 128 features (a Canny/Depth LoRA, for FluxPipeline "
        f"models) but tiny-kontext is a FluxKontextPipeline: pass it with a FluxPipeline model or drop --lora {name}"
    )
    # a width the control pipeline does not take
    state = load_file(str(control_lora))
    key = "transformer.x_embedder.lora_A.weight"
    save_file(dict(state, **{key: state[key][:, :96].contiguous()}), str(tmp_path / "narrow.safetensors"))
    with pytest.raises(FluxExportError) as error:
        sources["tiny-dev"].with_loras([parse_lora(str(tmp_path / "narrow.safetensors"))]).pipeline_class  # noqa: B018
    assert str(error.value) == (
        "LoRA narrow.safetensors widens the transformer's input to 96 features, which a FluxControlPipeline does not "
        "take (FluxControlPipeline's input (4 × 16 latent + 64 condition channels) is 128 but the transformer's "
        "in_channels is 96): it was made for another model"
    )
    # the widened model asks for its control image, as a Canny model does
    assert refusal([*run, "--model", "tiny-dev", "--lora", control_lora]).endswith("pass the map with --control-image")


def test_bfl_layout_reads_through_diffusers_conversion(tmp_path):
    """BFL's own layout of the published LoRAs (`img_in.lora_A`, fused qkv, `lora_B.bias`, `…query_norm.scale`),
    at FLUX.1's real widths and depth (rank 2: diffusers swaps halves of the final norm's A rows), read through diffusers' conversion: the widened x_embedder, the
    biases and the norms it replaces, and FLUX.1-dev's real configs become FluxControlPipeline's."""
    path = tmp_path / "flux1-canny-dev-lora.safetensors"
    save_file(bfl_control_lora(), str(path))
    dev = flux1_source(tmp_path).with_loras([parse_lora(str(path))])
    lora = dev.lora_set
    assert lora.input_width("transformer", "x_embedder") == 128
    assert lora.layers["transformer"]["x_embedder"][0].bias is not None
    assert len(lora.replaced["transformer"]) == 19 * 4 + 38 * 2
    assert dev.pipeline_class == "FluxControlPipeline"
    assert (dev.transformer["in_channels"], dev.transformer["out_channels"]) == (128, 64)


def bfl_control_lora(rank: int = 2, width: int = 3072) -> dict[str, torch.Tensor]:
    """Every key BFL's Canny/Depth LoRA files hold (FLUX.1's 19 double and 38 single blocks), zeros."""
    linears = {"img_in": (128, width), "txt_in": (4096, width), "time_in.in_layer": (256, width),
               "time_in.out_layer": (width, width), "vector_in.in_layer": (768, width),
               "vector_in.out_layer": (width, width), "guidance_in.in_layer": (256, width),
               "guidance_in.out_layer": (width, width), "final_layer.linear": (width, 64),
               "final_layer.adaLN_modulation.1": (width, 2 * width)}  # fmt: skip
    for block in (f"double_blocks.{i}" for i in range(19)):
        for stream in ("img", "txt"):
            linears |= {f"{block}.{stream}_mod.lin": (width, 6 * width), f"{block}.{stream}_attn.qkv": (width, 3 * width),
                        f"{block}.{stream}_attn.proj": (width, width), f"{block}.{stream}_mlp.0": (width, 4 * width),
                        f"{block}.{stream}_mlp.2": (4 * width, width)}  # fmt: skip
    for block in (f"single_blocks.{i}" for i in range(38)):
        linears |= {f"{block}.modulation.lin": (width, 3 * width), f"{block}.linear1": (width, 7 * width),
                    f"{block}.linear2": (5 * width, width)}  # fmt: skip
    state = {}
    for name, (fan_in, fan_out) in linears.items():
        state |= {f"{name}.lora_A.weight": torch.zeros(rank, fan_in), f"{name}.lora_B.weight": torch.zeros(fan_out, rank),
                  f"{name}.lora_B.bias": torch.zeros(fan_out)}  # fmt: skip
    norms = [f"double_blocks.{i}.{stream}_attn.norm" for i in range(19) for stream in ("img", "txt")]
    norms += [f"single_blocks.{i}.norm" for i in range(38)]
    return state | {f"{norm}.{kind}_norm.scale": torch.ones(128) for norm in norms for kind in ("query", "key")}


def test_the_export_streams_the_widened_merged_weights(merged):
    """What `export --lora` builds the graph from: the transformer built weightless from the config (parameters on
    meta) widened to 128 input features, its widened x_embedder streamed from the checkpoint zero-padded and merged,
    equal to the merged model's own; the graph's spec takes 128 channels and gives back 64. (Seen here: the whole
    merged tiny-dev folder exported and run with --control-image on ONNX Runtime is within 91 dB of PyTorch.)"""
    from fluxexport.models.checkpoint import CheckpointTensors
    from fluxexport.models.loaders import load_transformer
    from fluxexport.models.meta import weightless_module
    from fluxexport.specs import component_specs

    module = weightless_module(merged, "transformer")
    assert module.x_embedder.weight.shape[1] == 128 and module.config.in_channels == 128
    assert module.x_embedder.weight.device.type == "meta"
    weights = dict(load_transformer(merged).named_parameters())
    tensors = CheckpointTensors(merged, "transformer")
    for name in ("x_embedder.weight", "x_embedder.bias", "transformer_blocks.0.attn.norm_q.weight",
                 "transformer_blocks.0.attn.to_q.weight", "proj_out.weight"):  # fmt: skip
        assert torch.equal(tensors.load(name), weights[name].detach()), name
    spec = component_specs(merged)["transformer"]
    assert spec.inputs[0].dims[-1] == 128 and spec.outputs[0].dims[-1] == 64
