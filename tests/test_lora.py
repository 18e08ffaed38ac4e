"""LoRAs in the three published formats, merged as diffusers' fuse_lora merges them, wherever weights are read."""

import numpy as np
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from helpers import RANK, diffusers_images, manifest_json, write_kohya, write_peft, write_xlabs
from safetensors.torch import load_file, save_file

from fluxexport.cli import main
from fluxexport.compare import psnr
from fluxexport.errors import FluxExportError
from fluxexport.export.onnx_export import export_component
from fluxexport.models.loaders import load_clip, load_transformer
from fluxexport.models.lora import parse_lora
from fluxexport.pytorch.backend import TorchBackend
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.specs import component_specs, sample_inputs

REQUEST = GenerationRequest("a red fox", height=128, width=128, num_inference_steps=2, seed=3)


WRITERS = {"peft": write_peft, "kohya": write_kohya, "xlabs": write_xlabs}


@pytest.fixture(scope="module")
def lora_files(sources, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    transformer, clip = load_transformer(sources["tiny-dev"]), load_clip(sources["tiny-dev"])
    return {kind: write(folder / f"{kind}.safetensors", transformer, clip) for kind, write in WRITERS.items()}


def diffusers_fused(source, files_and_scales):
    """diffusers' FluxPipeline with each LoRA loaded and fused at its scale, in turn."""
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(source.root, dtype=torch.float32)
    for path, scale in files_and_scales:
        pipeline.load_lora_weights(str(path))
        pipeline.fuse_lora(lora_scale=scale)
        pipeline.unload_lora_weights()  # the fused weights stay
    return diffusers_images(pipeline, REQUEST.prompt, REQUEST.height, REQUEST.width, 2, REQUEST.seed)


def ours(source, *loras):
    merged = source.with_loras([parse_lora(value) for value in loras])
    with TorchBackend(merged, "fp32", "cpu") as backend:
        return generate(backend, merged, REQUEST).images


@pytest.fixture(scope="module")
def base_images(sources):
    return ours(sources["tiny-dev"])


@pytest.mark.parametrize("kind", list(WRITERS))
def test_each_format_merges_as_diffusers_fuse_lora(kind, sources, lora_files, base_images):
    images = ours(sources["tiny-dev"], f"{lora_files[kind]}:0.7")
    reference = diffusers_fused(sources["tiny-dev"], [(lora_files[kind], 0.7)])
    assert psnr(images, reference) >= 50
    assert psnr(images, base_images) < 45  # the LoRA changes the image


def test_two_loras_at_once_and_scale_zero(sources, lora_files, base_images):
    both = ours(sources["tiny-dev"], f"{lora_files['peft']}:0.5", f"{lora_files['kohya']}:0.8")
    reference = diffusers_fused(sources["tiny-dev"], [(lora_files["peft"], 0.5), (lora_files["kohya"], 0.8)])
    assert psnr(both, reference) >= 50
    assert np.array_equal(ours(sources["tiny-dev"], f"{lora_files['xlabs']}:0"), base_images)


@pytest.mark.slow
def test_merged_weights_stream_into_the_export_as_they_load(sources, lora_files, tmp_path):
    """The streamed export (weights merged tensor by tensor as read) equals the in-memory export of the
    merged model bit for bit, runs like the merged PyTorch model, and the manifest records the LoRA."""
    from helpers import assert_same_graph

    from fluxexport.export.onnx_export import export_model

    merged = sources["tiny-dev"].with_loras([parse_lora(f"{lora_files['kohya']}:0.8")])
    spec = component_specs(merged)["transformer"]
    export_model(merged, tmp_path / "streamed", ["transformer"])
    memory = export_component(merged, spec, tmp_path / "memory", streaming=False)
    assert_same_graph(tmp_path / "streamed" / "transformer.onnx", memory.path)
    session = onnxruntime.InferenceSession(str(tmp_path / "streamed" / "transformer.onnx"))
    feeds = sample_inputs(spec, {"B": 2, "N": 24, "L": 7}, seed=1)
    (latent,) = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    with TorchBackend(merged, "fp32", "cpu") as backend:
        expected = backend.component("transformer")(feeds)["latent"].numpy()
    assert np.linalg.norm(latent - expected) / np.linalg.norm(expected) < 1e-5
    model = manifest_json(tmp_path / "streamed")["model"]
    assert model["loras"] == [{"file": "kohya.safetensors", "sha256": parse_lora(str(lora_files["kohya"])).sha256,
                               "scale": 0.8}]  # fmt: skip
    assert model["fingerprint"] != sources["tiny-dev"].fingerprint()  # a merged model is another model


def test_cli_run_and_export_take_loras(sources, lora_files, base_images, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, [
        "run", "--model", "tiny-dev", "--prompt", "a red fox", "--height", "128", "--width", "128", "--steps", "2",
        "--seed", "3", "--lora", f"{lora_files['xlabs']}:0.7", "--output", str(tmp_path / "fox.png"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    from PIL import Image

    image = np.asarray(Image.open(tmp_path / "fox.png"))
    assert np.array_equal(image, ours(sources["tiny-dev"], f"{lora_files['xlabs']}:0.7")[0])


def test_bad_loras_are_refused_in_one_line(sources, lora_files, tmp_path):
    weights = next((sources["tiny-dev"].root / "transformer").glob("*.safetensors"))
    with pytest.raises(FluxExportError, match=r"is not a LoRA: no lora_A/lora_down weights \(first key: "):
        sources["tiny-dev"].with_loras([parse_lora(str(weights))]).lora_set  # noqa: B018
    with pytest.raises(FluxExportError, match=r"^--lora x\.pt: only \.safetensors LoRA files are read"):
        parse_lora("x.pt")
    with pytest.raises(FluxExportError, match=r"does not exist$"):
        parse_lora(str(tmp_path / "missing.safetensors:0.5"))

    state = load_file(str(lora_files["peft"]))
    deeper = {key.replace("transformer.transformer_blocks.0.", "transformer.transformer_blocks.7."): v
              for key, v in state.items()}  # fmt: skip
    save_file(deeper, str(tmp_path / "other-model.safetensors"))
    result = CliRunner().invoke(main, ["export", "--model", "tiny-dev", "--components", "transformer", "--out",
                                       str(tmp_path / "out"), "--lora", str(tmp_path / "other-model.safetensors")])  # fmt: skip
    assert result.exit_code == 1
    assert "a LoRA adapts transformer layer 'transformer_blocks.7.attn." in result.output
    assert "which this model does not have as a Linear: it was made for another model" in result.output
    assert not (tmp_path / "out" / "transformer.onnx").exists()

    key = next(k for k in state if k.endswith("to_q.lora_B.weight") and k.startswith("transformer.transformer_blocks"))
    wrong = dict(state, **{key: torch.zeros(state[key].shape[0] + 1, RANK)})
    save_file(wrong, str(tmp_path / "wrong-shape.safetensors"))
    with pytest.raises(FluxExportError, match=r"a LoRA's transformer layer 'transformer_blocks\.0\.attn\.to_q' is "):
        load_transformer(sources["tiny-dev"].with_loras([parse_lora(str(tmp_path / "wrong-shape.safetensors"))]))


def test_kohya_clip_layers_merge_by_kohyas_definition(sources, tmp_path):
    """CLIP LoRAs (kohya's lora_te1_): W + scale · alpha/rank · up·down, computed here from the raw file.
    (diffusers 0.42 cannot be the reference: with transformers 5's CLIPTextModel, which has no `text_model`
    level, its load_lora_weights finds no CLIP layer and leaves the text encoder unchanged.)"""
    source = sources["tiny-dev"]
    path = write_kohya(tmp_path / "te.safetensors", load_transformer(source), load_clip(source), with_clip=True)
    raw = load_file(str(path))
    merged = dict(load_clip(source.with_loras([parse_lora(f"{path}:0.7")])).named_parameters())
    base = dict(load_clip(source).named_parameters())
    checked = 0
    for name in base:
        key = "lora_te1_text_model_" + name.removesuffix(".weight").replace(".", "_")
        if name.endswith(".weight") and f"{key}.lora_down.weight" in raw:
            up, down = raw[f"{key}.lora_up.weight"], raw[f"{key}.lora_down.weight"]
            expected = base[name] + 0.7 * (raw[f"{key}.alpha"] / RANK) * (up @ down)
            torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
            checked += 1
        else:
            assert torch.equal(merged[name], base[name]), name
    assert checked == 4  # q, k, v and out projections of the first layer


def test_loras_swap_into_an_unmerged_graph_in_onnxruntime(sources, exports, lora_files, tmp_path):
    """Base graphs run with --lora: the touched initializers are replaced when the session is created, and a
    long-lived backend swaps LoRAs by recreating only the sessions they touch."""
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    base = sources["tiny-dev"]
    loras = [f"{lora_files['kohya']}:0.8", f"{lora_files['peft']}:0.5"]
    merged = base.with_loras([parse_lora(value) for value in loras])
    with OnnxRuntimeBackend(merged, exports["tiny-dev"]) as backend:
        assert backend.swapped is not None
        swapped = generate(backend, merged, REQUEST).images
        assert psnr(swapped, ours(base, *loras)) >= 50
        clip = backend.component("clip")
        backend.set_loras([parse_lora(f"{lora_files['xlabs']}:0.7")])  # transformer-only LoRAs now
        assert backend.component("clip") is clip  # untouched by either set: kept
        again = generate(backend, merged, REQUEST).images
        assert psnr(again, ours(base, f"{lora_files['xlabs']}:0.7")) >= 50
        backend.set_loras([])
        assert psnr(generate(backend, merged, REQUEST).images, ours(base)) >= 50
    result = CliRunner().invoke(main, [
        "run", "--model", "tiny-dev", "--backend", "onnxruntime", "--engines", str(exports["tiny-dev"]),
        "--prompt", "a red fox", "--height", "128", "--width", "128", "--steps", "2", "--seed", "3",
        "--lora", loras[0], "--lora", loras[1], "--output", str(tmp_path / "fox.png"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "fox.png")), swapped[0])


def test_loras_swap_into_an_fp8_graph_with_its_scales(sources, fp8_exports, lora_files):
    """FP8 weights are merged, then quantized with the graph's own scales (what `refit` does to FP8 engines):
    the graph computes the fake-quantized merged model on the base model's weight scales; scale 0 is the base."""
    import json

    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.quantize.qdq_export import fake_quantized_transformer

    base, folder = sources["tiny-dev"], fp8_exports["tiny-dev"]
    calibration = json.loads((folder / "calibration.json").read_text())
    spec = component_specs(base)["transformer"]
    shapes = [{"B": 1, "N": 16, "L": 5}, {"B": 2, "N": 40, "L": 7}]
    with OnnxRuntimeBackend(base, folder) as plain:
        expected_base = [plain.component("transformer")(sample_inputs(spec, s, seed=i)) for i, s in enumerate(shapes)]
    for value in (f"{lora_files['peft']}:0", f"{lora_files['peft']}:0.8", f"{lora_files['kohya']}:0.5"):
        merged = base.with_loras([parse_lora(value)])
        reference = fake_quantized_transformer(
            merged, calibration["input_amax"], weight_amax=calibration["weight_amax"]
        )
        with OnnxRuntimeBackend(merged, folder) as backend:
            assert backend.entries["transformer"].dtype == "fp8"
            transformer = backend.component("transformer")
            for index, sizes in enumerate(shapes):
                feeds = sample_inputs(spec, sizes, seed=index)
                ours = transformer(feeds)["latent"]
                if value.endswith(":0"):
                    assert torch.equal(ours, expected_base[index]["latent"])
                with torch.no_grad():
                    fake = reference(*feeds.values())
                assert ((ours - fake).norm() / fake.norm()).item() <= 1e-3, (value, sizes)
