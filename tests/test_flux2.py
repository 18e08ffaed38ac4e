"""FLUX.2 through the toolchain: the family read from the checkpoint, the PyTorch runtime equal to diffusers'
Flux2KleinPipeline ([klein] distilled, and base with true CFG) and Flux2Pipeline ([dev]: Mistral3 text encoder,
system message, guidance embedding) bit for bit (batches, odd sizes, reference images), and the exported graphs
equal to PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fluxexport.compare import psnr
from fluxexport.errors import FluxExportError
from fluxexport.families import FLUX1, FLUX2, detect_family
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.runtime.schedule import empirical_mu
from fluxexport.specs import TRANSFORMER_PARTS, component_specs


def diffusers_flux2(pipeline, prompt, seed, **kwargs) -> np.ndarray:
    """uint8 images from diffusers, reading the tiny model's text layers (1, 2, 3) as our runtime does."""
    kwargs.setdefault("text_encoder_out_layers", (1, 2, 3))
    images = pipeline(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images
    return (images * 255).round().astype(np.uint8)


def test_family_is_read_from_the_checkpoint():
    assert detect_family({"_class_name": "Flux2KleinPipeline"}) is FLUX2
    assert detect_family({"_class_name": "Flux2Pipeline"}) is FLUX2
    assert detect_family({"_class_name": "FluxKontextPipeline"}) is FLUX1
    assert detect_family({}, {"_class_name": "Flux2Transformer2DModel"}) is FLUX2
    assert detect_family({}) is FLUX1
    with pytest.raises(FluxExportError) as error:
        detect_family({"_class_name": "StableDiffusionPipeline"})
    assert str(error.value) == (
        "pipeline 'StableDiffusionPipeline' is not a FLUX model fluxexport knows: it exports FluxPipeline, "
        "FluxKontextPipeline, FluxFillPipeline, FluxControlPipeline, Flux2KleinPipeline, Flux2Pipeline"
    )


def test_tiny_klein_is_a_flux2_folder(flux2_sources):
    klein, base = flux2_sources["tiny-klein"], flux2_sources["tiny-klein-base"]
    assert klein.family is FLUX2 and klein.components == ("text_encoder", "transformer", "vae_decoder", "vae_encoder")
    assert klein.is_distilled and not klein.uses_true_cfg and klein.default_steps == 4
    assert not base.is_distilled and base.uses_true_cfg and base.default_steps == 50
    assert klein.text_encoder_layers == (1, 2, 3)
    index = json.loads((klein.root / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is True
    (tokenizer,) = klein.tokenizers
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_tiny_flux2_dev_is_a_flux2_dev_folder(flux2_sources, tmp_path):
    import shutil

    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    from fluxexport.families.flux2.runtime import conversations, system_message, tokenize_chat
    from fluxexport.models.source import load_folder
    from fluxexport.models.tiny import TINY_MARKER

    dev = flux2_sources["tiny-flux2-dev"]
    assert dev.family is FLUX2 and dev.pipeline_class == "Flux2Pipeline"
    assert dev.guidance_embeds and not dev.uses_true_cfg and dev.default_steps == 50 and dev.default_guidance == 4.0
    assert dev.text_encoder["architectures"] == ["Mistral3ForConditionalGeneration"]
    assert system_message(dev) == SYSTEM_MESSAGE and system_message(flux2_sources["tiny-klein"]) is None
    (tokenizer,) = dev.tokenizers
    text = tokenizer.apply_chat_template(conversations(["a [IMG]cat"], SYSTEM_MESSAGE)[0], tokenize=False)
    assert text == f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]a cat[/INST]"
    feeds, warnings = tokenize_chat(tokenizer, ["a cat", "a dog " * 20], 64, SYSTEM_MESSAGE)
    assert feeds["input_ids"].shape == (2, 64) and feeds["input_ids"][0, 0] == tokenizer.bos_token_id
    assert warnings == ["text encoder prompt was truncated to 64 tokens (chat template included)"]
    # the published model reads Mistral's hidden states 10, 20 and 30; the tiny one its marker's
    assert dev.text_encoder_layers == (1, 2, 3)
    shutil.copytree(dev.root, tmp_path / "dev")
    (tmp_path / "dev" / TINY_MARKER).unlink()
    assert load_folder(tmp_path / "dev").text_encoder_layers == (10, 20, 30)


def test_a_processor_folder_lends_its_chat_template(flux2_sources, tmp_path):
    """FLUX.2 [dev]'s tokenizer folder is a PixtralProcessor's: the template may sit in its processor files."""
    import shutil

    from fluxexport.models.source import load_folder

    folder = tmp_path / "dev"
    shutil.copytree(flux2_sources["tiny-flux2-dev"].root, folder)
    template = (folder / "tokenizer" / "chat_template.jinja").read_text()
    (folder / "tokenizer" / "chat_template.jinja").unlink()
    (folder / "tokenizer" / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert load_folder(folder).tokenizers[0].chat_template == template
    (folder / "tokenizer" / "chat_template.json").unlink()
    with pytest.raises(FluxExportError) as error:
        _ = load_folder(folder).tokenizers
    assert str(error.value) == (
        f"{folder / 'tokenizer'} has no chat template (FLUX.2 reads prompts through one): re-download the model's "
        "tokenizer"
    )


def test_incomplete_flux2_folder_names_its_missing_parts(flux2_sources, tmp_path):
    import shutil

    from fluxexport.models.source import load_folder

    folder = tmp_path / "klein"
    shutil.copytree(flux2_sources["tiny-klein"].root, folder)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(FluxExportError) as error:
        load_folder(folder)
    assert str(error.value) == f"FLUX.2 model folder {folder} is incomplete: missing tokenizer"


@pytest.mark.parametrize(("tokens", "steps"), [(256, 4), (1024, 50), (4096, 28), (5000, 4)])
def test_empirical_mu_equals_diffusers(tokens, steps):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    assert empirical_mu(tokens, steps) == compute_empirical_mu(tokens, steps)


def test_flux2_specs_read_widths_from_the_configs(flux2_sources):
    specs = component_specs(flux2_sources["tiny-klein"])
    # the four, then the transformer in parts (what --cache first-block and magcache run)
    assert tuple(specs) == ("text_encoder", "transformer", "vae_decoder", "vae_encoder", *TRANSFORMER_PARTS)
    transformer = specs["transformer"]
    assert [tensor.name for tensor in transformer.inputs] == [
        "hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids"
    ]  # fmt: skip
    assert transformer.input("encoder_hidden_states").dims == ("B", "L", 96)  # 3 stacked layers × 32
    assert transformer.input("img_ids").dims == ("N", 4)
    assert specs["vae_decoder"].inputs[0].dims == ("B", 128, "h", "w")


# (prompts, height, width, images per prompt, seed, steps): batch 1 and 2, odd and non-square sizes
CASES = [
    (["a cat on the moon"], 256, 192, 1, 3, 4),
    (["an astronaut riding a horse", "a red fox in the snow"], 144, 272, 1, 0, 2),
    (["a castle"], 320, 176, 2, 7, 3),
]


@pytest.mark.parametrize("variant", ["tiny-klein", "tiny-klein-base", "tiny-flux2-dev"])
@pytest.mark.parametrize(("prompts", "height", "width", "per_prompt", "seed", "steps"), CASES)
def test_pytorch_runtime_equals_diffusers_flux2_pipelines(
    variant, prompts, height, width, per_prompt, seed, steps, flux2_sources, flux2_pipelines
):
    source = flux2_sources[variant]
    request = GenerationRequest(
        prompts, height=height, width=width, num_inference_steps=steps, seed=seed, num_images_per_prompt=per_prompt,
        guidance_scale=4.0,
    )  # fmt: skip
    ours = generate(_torch(source), source, request).images
    theirs = diffusers_flux2(
        flux2_pipelines[variant], prompts, seed, height=height, width=width, num_inference_steps=steps,
        num_images_per_prompt=per_prompt, guidance_scale=4.0,
    )  # fmt: skip
    assert ours.shape == theirs.shape == (len(prompts) * per_prompt, height, width, 3)
    assert np.array_equal(ours, theirs)  # bit-exact on CPU fp32


@pytest.mark.parametrize("variant", ["tiny-klein", "tiny-flux2-dev"])
def test_reference_images_equal_diffusers(variant, flux2_sources, flux2_pipelines, reference_image):
    """One reference (its size becomes the output's), then two at an explicit size (times 10 and 20)."""
    source = flux2_sources[variant]
    second = reference_image.rotate(90, expand=True).resize((90, 130))
    for references, size in (([reference_image], {}), ([reference_image, second], {"height": 128, "width": 160})):
        request = GenerationRequest("a cat", image=references, seed=1, num_inference_steps=3, **size)
        ours = generate(_torch(source), source, request).images
        theirs = diffusers_flux2(flux2_pipelines[variant], "a cat", 1, image=references, num_inference_steps=3,
                                 **size)  # fmt: skip
        assert ours.shape == theirs.shape
        assert np.array_equal(ours, theirs)
    assert ours.shape == (1, 128, 160, 3)


def test_flux2_requests_are_refused_in_one_line(flux2_sources, reference_image):
    from fluxexport.cli import command_line_terms
    from fluxexport.runtime.request import resolve_request

    klein, base = flux2_sources["tiny-klein"], flux2_sources["tiny-klein-base"]
    cases = [
        (klein, GenerationRequest("x", prompt_2="y"), "tiny-klein is FLUX.2, which has one text encoder: drop --prompt-2"),
        (klein, GenerationRequest("x", negative_prompt="blurry"),
         "tiny-klein runs without true CFG (a distilled or guidance-embedded model): drop --negative-prompt"),
        (base, GenerationRequest(["x", "y"], negative_prompt=["a", "b", "c"]),
         "got 2 prompts but 3 negative prompts: give one, or one per prompt"),
        (klein, GenerationRequest("x", image=reference_image.resize((300, 40))),
         "reference image 1 is 300×40: both sides must be at least 64 px (--image)"),
        (klein, GenerationRequest("x", image=reference_image.resize((600, 70))),
         "reference image 1 is 600×70: its aspect ratio must be at most 8:1 (--image)"),
    ]  # fmt: skip
    for source, request, message in cases:
        with pytest.raises(FluxExportError) as error:
            resolve_request(source, request)
        assert error.value.render(command_line_terms()) == message  # as the CLI words it


def test_negative_prompt_drives_true_cfg(flux2_sources):
    """The base model's negative prompt is the unconditional branch: "" is diffusers' default, another changes
    the image; with guidance ≤ 1 there is no second branch and the negative prompt does nothing."""
    source = flux2_sources["tiny-klein-base"]
    backend = _torch(source)

    def image(negative, guidance=4.0):
        request = GenerationRequest("a cat", negative_prompt=negative, num_inference_steps=2, height=64, width=64,
                                    guidance_scale=guidance)  # fmt: skip
        return generate(backend, source, request).images

    assert np.array_equal(image(None), image(""))
    assert not np.array_equal(image(None), image("a dog"))
    assert np.array_equal(image("", guidance=1.0), image("a dog", guidance=1.0))


_BACKENDS: dict = {}


def _torch(source):
    from fluxexport.pytorch.backend import TorchBackend

    return _BACKENDS.setdefault(source.name, TorchBackend(source, device="cpu"))


# --- exported graphs --------------------------------------------------------------------------------------------


def test_export_writes_the_four_flux2_graphs_and_they_pass_check(flux2_sources, flux2_export):
    from fluxexport.artifacts.folders import open_export
    from fluxexport.export.check import check_folder

    folder = open_export(flux2_export)
    assert set(folder.components) == {"text_encoder", "transformer", "vae_decoder", "vae_encoder"}
    reports = check_folder(flux2_export)
    assert reports and all(report.ok for report in reports), [report.problems for report in reports]
    import onnx

    graph = onnx.load(str(flux2_export / "text_encoder.onnx"), load_external_data=False).graph
    attention_layers = sum(node.op_type == "Softmax" for node in graph.node)
    # hidden state 3 is the output of the third of the LM's five layers: the two after it are not in the graph
    assert attention_layers == max(flux2_sources["tiny-klein"].text_encoder_layers) == 3


def test_graphs_equal_pytorch_on_real_prompts_with_padding(flux2_sources, flux2_export):
    """The text encoder on chat-templated prompts padded to different lengths (the mask is real), the VAE
    graphs with the batch-norm statistics of the checkpoint (not the defaults)."""
    from fluxexport.families.flux2.runtime import tokenize_chat
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    source = flux2_sources["tiny-klein"]
    ort, reference = OnnxRuntimeBackend(source, flux2_export), _torch(source)
    feeds, _ = tokenize_chat(source.tokenizers[0], ["a cat on the moon", "a dog"], 40)
    assert feeds["attention_mask"].sum(dim=1).tolist()[0] > feeds["attention_mask"].sum(dim=1).tolist()[1]
    generator = torch.Generator().manual_seed(0)
    cases = {
        "text_encoder": feeds,
        "vae_decoder": {"latent": torch.randn(2, 128, 5, 3, generator=generator)},
        "vae_encoder": {"images": torch.rand(1, 3, 96, 144, generator=generator) * 2 - 1},
    }
    for name, component_feeds in cases.items():
        ours, theirs = ort.component(name)(component_feeds), reference.component(name)(component_feeds)
        for key, value in theirs.items():
            assert ((ours[key] - value).norm() / value.norm()).item() < 1e-5, (name, key)


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"prompt": ["a cat on the moon", "a dog"], "height": 320, "width": 192, "seed": 3},  # sizes not exported
        {"prompt": "a cat", "num_inference_steps": 3, "seed": 1, "use_reference": True},
    ],
)
def test_onnx_runtime_images_match_pytorch(request_kwargs, flux2_sources, flux2_export, reference_image):
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    source = flux2_sources["tiny-klein"]
    if request_kwargs.pop("use_reference", False):
        request_kwargs["image"] = reference_image
    request = GenerationRequest(**request_kwargs)
    ours = generate(OnnxRuntimeBackend(source, flux2_export), source, request).images
    theirs = generate(_torch(source), source, request).images
    assert psnr(ours, theirs) >= 40


def test_flux2_dev_graphs_equal_pytorch(flux2_sources, flux2_dev_export):
    """FLUX.2 [dev]: the Mistral3 text encoder graph holds only the text layers it reads (no LM head, vision tower
    or projector) and equals PyTorch on system-message prompts padded to different lengths; the transformer graph
    takes the guidance; images at a size not used at export are ≥ 40 dB from PyTorch."""
    import onnx

    from fluxexport.export.check import check_folder
    from fluxexport.families.flux2.runtime import system_message, tokenize_chat
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    source = flux2_sources["tiny-flux2-dev"]
    reports = check_folder(flux2_dev_export)
    assert len(reports) == 4 and all(report.ok for report in reports), [report.problems for report in reports]
    graph = onnx.load(str(flux2_dev_export / "text_encoder.onnx"), load_external_data=False).graph
    assert sum(node.op_type == "Softmax" for node in graph.node) == 3
    assert not [i.name for i in graph.initializer if any(part in i.name for part in ("lm_head", "vision", "projector"))]
    transformer = onnx.load(str(flux2_dev_export / "transformer.onnx"), load_external_data=False).graph
    assert "guidance" in [tensor.name for tensor in transformer.input]

    ort, reference = OnnxRuntimeBackend(source, flux2_dev_export), _torch(source)
    feeds, _ = tokenize_chat(source.tokenizers[0], ["a cat on the moon at night", "a dog"], 320, system_message(source))
    lengths = feeds["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] > lengths[1]
    generator = torch.Generator().manual_seed(0)
    embeddings = reference.component("text_encoder")(feeds)["text_embeddings"]
    cases = {
        "text_encoder": feeds,
        "transformer": {
            "hidden_states": torch.randn(2, 35, 128, generator=generator), "encoder_hidden_states": embeddings,
            "timestep": torch.tensor([0.7, 0.7]), "img_ids": torch.rand(35, 4, generator=generator) * 8,
            "txt_ids": torch.rand(320, 4, generator=generator), "guidance": torch.tensor([4.0, 4.0]),
        },
    }  # fmt: skip
    for name, component_feeds in cases.items():
        ours, theirs = ort.component(name)(component_feeds), reference.component(name)(component_feeds)
        for key, value in theirs.items():
            assert ((ours[key] - value).norm() / value.norm()).item() < 1e-5, (name, key)
    request = GenerationRequest(["a cat on the moon", "a dog"], height=320, width=192, seed=3, num_inference_steps=3)
    assert psnr(generate(ort, source, request).images, generate(reference, source, request).images) >= 40


def test_tensorrt_engines_equal_onnx_runtime(flux2_sources, flux2_export, tmp_path, reference_image):
    """Engines built by `build`'s own code (profiles from the FLUX.2 specs, two resolution buckets) over the
    stand-in TensorRT give ONNX Runtime's images, with and without a reference image."""
    from helpers import assert_engines_equal_onnx_runtime, build_folder

    source = flux2_sources["tiny-klein"]
    engines = build_folder(source, flux2_export, tmp_path / "engines", resolution_buckets=2)
    assert {path.name.split("_fp32")[0] for path in engines.glob("*.plan")} == set(source.components)
    requests = [
        GenerationRequest("a cat", height=128, width=192, num_inference_steps=2),
        GenerationRequest("a cat", image=reference_image, height=256, width=256, num_inference_steps=2),
    ]
    assert_engines_equal_onnx_runtime(source, engines, flux2_export, requests)


# --- LoRAs -------------------------------------------------------------------------------------------------------


def _flux2_lora(path, source, alpha: float | None = None):
    """A random PEFT-named LoRA (rank 4) on every Linear of tiny-klein's blocks; with `alpha`, saved with the PEFT
    metadata diffusers writes (`lora_alpha`), so that its scale is alpha / rank."""
    from safetensors.torch import load_file, save_file

    from fluxexport.models.loaders import load_transformer
    from fluxexport.models.tiny import write_random_lora

    write_random_lora(path, load_transformer(source), rank=4, relative=0.3)
    if alpha is not None:
        state = load_file(str(path))
        targets = sorted({key.removeprefix("transformer.").split(".lora_")[0] for key in state})
        config = {"transformer.r": 4, "transformer.lora_alpha": alpha, "transformer.target_modules": targets}
        save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})  # as diffusers saves it
    return path


@pytest.mark.parametrize("variant", ["tiny-klein", "tiny-flux2-dev"])
def test_loras_merge_as_diffusers_fuse_lora(variant, flux2_sources, tmp_path):
    """PEFT-format LoRAs, with and without the metadata's alpha (scale alpha/rank), at a user scale: our PyTorch
    image equals diffusers' Flux2KleinPipeline / Flux2Pipeline after load_lora_weights + fuse_lora, bit for bit."""
    from diffusers import DiffusionPipeline

    from fluxexport.models.lora import parse_lora

    source = flux2_sources[variant]
    for alpha, scale in ((None, 0.8), (2.0, 1.0)):
        path = _flux2_lora(tmp_path / f"lora_{alpha}.safetensors", source, alpha)
        pipeline = DiffusionPipeline.from_pretrained(source.root)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.load_lora_weights(str(path))
        pipeline.fuse_lora(lora_scale=scale)
        pipeline.unload_lora_weights()
        theirs = diffusers_flux2(pipeline, "a cat", 2, height=128, width=128, num_inference_steps=2)
        merged = source.with_loras([parse_lora(f"{path}:{scale}")])
        from fluxexport.pytorch.backend import TorchBackend

        request = GenerationRequest("a cat", height=128, width=128, num_inference_steps=2, seed=2)
        ours = generate(TorchBackend(merged, device="cpu"), merged, request).images
        assert np.array_equal(ours, theirs), alpha
        assert not np.array_equal(ours, generate(_torch(source), source, request).images)


def test_a_flux2_lora_on_a_flux1_model_is_refused(flux2_sources, sources, tmp_path):
    from fluxexport.models.lora import parse_lora

    path = _flux2_lora(tmp_path / "klein.safetensors", flux2_sources["tiny-klein"])
    with pytest.raises(FluxExportError, match=r"^a LoRA adapts transformer layer .*: it was made for another model$"):
        sources["tiny-dev"].with_loras([parse_lora(str(path))]).lora_set.check(
            "transformer", {name: p.shape for name, p in _tiny_dev_transformer(sources).named_parameters()}
        )


def _tiny_dev_transformer(sources):
    from fluxexport.models.loaders import load_transformer

    return load_transformer(sources["tiny-dev"])


def test_loras_swap_into_the_flux2_graphs_in_onnxruntime(flux2_sources, flux2_export, tmp_path):
    """A FLUX.2 LoRA on the base graphs (initializers replaced when the session is created) gives the image of
    PyTorch with the LoRA merged."""
    from fluxexport.models.lora import parse_lora
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.pytorch.backend import TorchBackend

    source = flux2_sources["tiny-klein"]
    path = _flux2_lora(tmp_path / "klein.safetensors", source, alpha=8.0)
    merged = source.with_loras([parse_lora(f"{path}:0.7")])
    request = GenerationRequest("a cat", height=128, width=192, num_inference_steps=2, seed=4)
    with OnnxRuntimeBackend(merged, flux2_export) as backend:
        assert backend.swapped is not None and set(backend.swapped.layers) == {"transformer"}
        swapped = generate(backend, merged, request).images
    reference = generate(TorchBackend(merged, device="cpu"), merged, request).images
    base = generate(_torch(source), source, request).images
    # ONNX Runtime against PyTorch on the same weights (~85 dB), far closer than to the image without the LoRA
    assert psnr(swapped, reference) >= 70 > psnr(swapped, base) + 10
