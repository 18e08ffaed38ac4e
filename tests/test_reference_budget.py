"""FLUX.2's reference budget: how many reference images the engines serve beside the target, the pixels of each and
their largest aspect ratio, set at export and build apart from the target's size, carried in the bounds into the
transformer's token axis and the VAE encoder's sides, and a request past it refused in one line before any work."""

import re

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import H100, assert_engines_equal_onnx_runtime, standin_tensorrt
from PIL import Image

from fluxexport.cli import main
from fluxexport.errors import FluxExportError
from fluxexport.families.flux2.runtime import reference_size
from fluxexport.families.flux2.specs import check_references_served
from fluxexport.models.source import ModelSource
from fluxexport.specs import REFERENCE_OPTIONS, ExportBounds, component_specs
from fluxexport.tensorrt.builder import build_bounds
from fluxexport.tensorrt.profiles import build_profiles, profile_bounds, select_profile

MP = 1024 * 1024


def klein_source(tmp_path) -> ModelSource:
    """FLUX.2 [klein] 4B's published config shape (5 + 20 blocks, 24 heads × 128, Qwen3 2560 wide), without
    weights: the specs read only widths."""
    configs = {
        "model_index": {
            "_class_name": "Flux2KleinPipeline", "is_distilled": True,
            "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
            "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        },
        "transformer": {
            "_class_name": "Flux2Transformer2DModel", "in_channels": 128, "num_layers": 5, "num_single_layers": 20,
            "num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 7680, "guidance_embeds": False,
        },
        "vae": {"_class_name": "AutoencoderKLFlux2", "block_out_channels": [128, 256, 512, 512], "latent_channels": 32},
        "text_encoder": {"model_type": "qwen3", "hidden_size": 2560, "num_hidden_layers": 36, "vocab_size": 151936},
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler"},
    }  # fmt: skip
    return ModelSource("klein-4b", tmp_path, configs=configs)


def encoded(width: int, height: int) -> tuple[int, int]:
    """(width, height) the runtime encodes a width×height reference at (diffusers' 1 MP scaling, floored to 16)."""
    return reference_size(Image.new("RGB", (width, height)))


def transformer_shapes(source, bounds, tokens: int) -> dict[str, tuple[int, ...]]:
    """The transformer's input shapes for one image of `tokens` tokens (target and references) and full text."""
    spec = component_specs(source, bounds)["transformer"]
    return {tensor.name: spec.shape(tensor, {"B": 1, "N": tokens, "L": 512}) for tensor in spec.inputs}


def served_by_profiles(source, bounds, buckets: int, target: tuple[int, int], references) -> None:
    """Select the profiles a request needs (raises outside them): the VAE encoder's per reference, the
    transformer's for the target's and the references' tokens."""
    profiled = profile_bounds(bounds, buckets)
    encoder, transformer = (build_profiles(source, name, profiled) for name in ("vae_encoder", "transformer"))
    for width, height in references:
        select_profile(encoder, {"images": (1, 3, height, width)}, "vae_encoder")
    tokens = (target[0] // 16) * (target[1] // 16) + sum((w // 16) * (h // 16) for w, h in references)
    select_profile(transformer, transformer_shapes(source, bounds, tokens), "transformer")


@pytest.mark.parametrize("buckets", [1, 3])
@pytest.mark.parametrize("size", [(2048, 1024), (1024, 2048), (1448, 724), (1365, 768), (1024, 1024), (4000, 3000)])
def test_default_profiles_serve_one_megapixel_reference_up_to_two_to_one(tmp_path, size, buckets):
    """Real klein widths, the default bounds: a 1 MP reference of aspect up to 2:1 (either way) beside a 1024²
    target fits every profile it needs, and the request check agrees."""
    source = klein_source(tmp_path)
    bounds = ExportBounds.for_model(source)
    reference = encoded(*size)
    assert reference[0] * reference[1] <= MP
    served_by_profiles(source, bounds, buckets, (1024, 1024), [reference])
    check_references_served(source, bounds, 1024, 1024, [reference])


def test_default_axes_follow_the_budget(tmp_path):
    specs = component_specs(klein_source(tmp_path))
    tokens, encoder = specs["transformer"].axes["N"], specs["vae_encoder"].axes
    assert (tokens.min, tokens.max) == (256, 85 * 85 + 64 * 64)  # 1360² target + one 1 MP reference
    assert (encoder["H"].min, encoder["H"].max) == (64, 1440)  # √(2 MP) = 1448, floored to 16
    assert encoder["W"] == encoder["H"]
    two = component_specs(klein_source(tmp_path), ExportBounds.for_model(klein_source(tmp_path), max_references=2))
    assert two["transformer"].axes["N"].max == 85 * 85 + 2 * 64 * 64
    wide = ExportBounds.for_model(klein_source(tmp_path), max_reference_aspect=3, max_reference_area=512 * 512)
    wide_specs = component_specs(klein_source(tmp_path), wide)
    assert wide_specs["vae_encoder"].axes["H"].max == 1360  # √(3 · 512²) = 886 < the largest target side
    assert wide_specs["transformer"].axes["N"].max == 85 * 85 + 32 * 32


TWO_REFERENCES = (
    "2 reference images beside a 1024×1024 target need 12288 transformer tokens, past the 11321 the engines were "
    "built for (1 reference of up to 1048576 px at up to 2:1 beside targets up to 1360 px): rebuild them with "
    "--max-references 2"
)


def test_two_megapixel_references_need_max_references_2(tmp_path):
    source = klein_source(tmp_path)
    references = [encoded(1024, 1024), encoded(3000, 3000)]  # the second scaled to 1 MP
    default = ExportBounds.for_model(source)
    with pytest.raises(FluxExportError) as refused:
        check_references_served(source, default, 1024, 1024, references)
    assert str(refused.value) == TWO_REFERENCES
    with pytest.raises(FluxExportError, match="outside the engine's profiles"):  # the profiles agree
        served_by_profiles(source, default, 1, (1024, 1024), references)
    # build --max-references 2 over a folder without an export: the model's bounds with the override
    two = build_bounds(source, tmp_path / "no-export", max_references=2)
    assert (two.max_references, two.max_reference_area, two.max_reference_aspect) == (2, MP, 2.0)
    check_references_served(source, two, 1024, 1024, references)
    served_by_profiles(source, two, 2, (1024, 1024), references)


@pytest.mark.parametrize(
    ("bounds", "target", "references", "message"),
    [
        ({"max_references": 1, "max_reference_area": 512 * 512}, (1360, 1360), [(1024, 1024)],
         "1 reference image beside a 1360×1360 target need 11321 transformer tokens, past the 8249 the engines were "
         "built for (1 reference of up to 262144 px at up to 2:1 beside targets up to 1360 px): rebuild them with "
         "--max-reference-area 1048576"),
        ({}, encoded(3000, 1000), [encoded(3000, 1000)],
         "reference image 1 is encoded at 1760×576: its 1760 px side is past the 1440 px the engines were built for "
         "(1 reference of up to 1048576 px at up to 2:1 beside targets up to 1360 px): rebuild them with "
         "--max-reference-aspect 2.96"),
    ],
)  # fmt: skip
def test_refusals_name_the_option_that_serves_them(tmp_path, bounds, target, references, message):
    """Past the token budget: the option that adds the tokens; past the encoder's side: the aspect that reaches
    it. The named option, applied, serves the request."""
    source = klein_source(tmp_path)
    bounds = ExportBounds.for_model(source, **bounds)
    with pytest.raises(FluxExportError) as refused:
        check_references_served(source, bounds, *target, references)
    assert str(refused.value) == message
    option, value = re.search(r"--(max-reference-\w+) (\S+)$", message).groups()
    fixed = ExportBounds.for_model(source, **(vars(bounds) | {option.replace("-", "_"): float(value)}))
    check_references_served(source, fixed, *target, references)
    served_by_profiles(source, fixed, 1, target, references)


def test_the_budget_is_what_the_profiles_hold(tmp_path):
    """The check refuses what the profiles cannot serve, not more: tokens the target leaves unused serve a larger
    reference, and the target's sides serve a reference past the budget's aspect."""
    source = klein_source(tmp_path)
    small = ExportBounds.for_model(source, max_reference_area=512 * 512)
    for target, references in (((1024, 1024), [(1024, 1024)]), ((512, 512), [(1024, 128), (128, 1024)])):
        check_references_served(source, small, *target, references)
        served_by_profiles(source, small, 1, target, references)


def test_flux1_refuses_the_reference_options(tmp_path):
    from helpers import flux1_source

    with pytest.raises(FluxExportError) as refused:
        ExportBounds.for_model(flux1_source(tmp_path, kontext=True), max_references=2)
    assert str(refused.value) == (
        "--max-references sizes FLUX.2's reference images; flux1 is FLUX.1 (Kontext's reference bounds follow its "
        "preferred sizes): drop it"
    )


def test_engines_recorded_before_the_budget_serve_what_they_were_built_for(tmp_path):
    """A manifest without the budget: engines were built for one 1 MP reference at 1:1 (1024 px sides), an
    export takes today's defaults."""
    source = klein_source(tmp_path)
    recorded = {key: value for key, value in vars(ExportBounds.for_model(source)).items() if "reference" not in key}
    legacy = component_specs(source, ExportBounds.from_json(recorded, built=True))
    assert legacy["vae_encoder"].axes["H"].max == 1360 and legacy["transformer"].axes["N"].max == 11321
    small = ExportBounds.from_json(recorded | {"max_resolution": 768}, built=True)
    assert component_specs(source, small)["vae_encoder"].axes["H"].max == 1024  # what such engines were built with
    assert ExportBounds.from_json(recorded) == ExportBounds.for_model(source)


# --- tiny-klein through the CLI: build with a budget over the stand-in TensorRT, run within and past it ----------


def _write_images(folder, sizes) -> list[str]:
    paths = []
    for index, (width, height) in enumerate(sizes):
        y, x = np.mgrid[0:height, 0:width]
        image = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
        path = folder / f"reference-{index}-{width}x{height}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


def _run(engines, backend, images, size=128) -> list[str]:
    arguments = ["run", "--model", "tiny-klein", "--prompt", "a cat", "--steps", "1", "--backend", backend,
                 "--engines", str(engines), "--height", str(size), "--width", str(size)]  # fmt: skip
    for image in images:
        arguments += ["--image", image]
    return arguments


def test_build_serves_the_reference_budget_and_run_refuses_past_it(
    flux2_sources, flux2_export, reference_image, tmp_path, monkeypatch
):
    """`build --max-references 2 --max-reference-area 16384` (128² px references at up to 2:1 beside targets up
    to 128 px): the engines' profiles hold the budget, two 128² references and one at 176×80 run and equal ONNX
    Runtime's images; a third reference, or one 4:1, is refused in one line naming the option, before TensorRT is
    asked for anything."""
    from standin_tensorrt import HostDevice

    from fluxexport.artifacts.folders import open_engines
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.runtime.pipeline import GenerationRequest, generate
    from fluxexport.tensorrt.backend import TensorRTBackend

    source = flux2_sources["tiny-klein"]
    engines = tmp_path / "engines"
    monkeypatch.setattr("fluxexport.tensorrt.builder.current_gpu", lambda: H100)  # no GPU here to ask
    with standin_tensorrt():
        built = CliRunner().invoke(main, [
            "build", "--model", "tiny-klein", "--onnx", str(flux2_export), "--out", str(engines), "--precision", "fp32",
            "--no-prepare", "--batch", "1:1:1", "--min-resolution", "64", "--opt-resolution", "128",
            "--max-resolution", "128", "--text-len", "1:64:64", "--optimization-level", "0",
            "--max-references", "2", "--max-reference-area", "16384",
        ])  # fmt: skip
    assert built.exit_code == 0, built.output
    folder = open_engines(engines)
    assert {key: folder.bounds[key] for key in ("max_references", "max_reference_area", "max_reference_aspect")} == {
        "max_references": 2, "max_reference_area": 16384, "max_reference_aspect": 2.0}  # fmt: skip
    (transformer,) = folder.components["transformer"].profiles
    assert transformer["hidden_states"][2][1] == 8 * 8 + 2 * 8 * 8  # a 128² target and two 128² references
    (encoder,) = folder.components["vae_encoder"].profiles
    assert encoder["images"][0][2:] == [64, 64] and encoder["images"][2][2:] == [176, 176]  # √(2 · 128²) → 176

    images = _write_images(tmp_path, [(128, 128), (128, 128), (128, 128), (256, 64)])
    three = CliRunner().invoke(main, _run(engines, "tensorrt", images[:3]))
    assert three.exit_code == 1
    assert three.output == (
        "Error: 3 reference images beside a 128×128 target need 256 transformer tokens, past the 192 the engines "
        "were built for (2 references of up to 16384 px at up to 2:1 beside targets up to 128 px): rebuild them "
        "with --max-references 3\n"
    )
    wide = CliRunner().invoke(main, _run(engines, "tensorrt", images[3:]))
    assert wide.exit_code == 1
    assert wide.output == (
        "Error: reference image 1 is encoded at 256×64: its 256 px side is past the 176 px the engines were built "
        "for (2 references of up to 16384 px at up to 2:1 beside targets up to 128 px): rebuild them with "
        "--max-reference-aspect 4\n"
    )
    # the ONNX folder's manifest bounds: tiny-klein's defaults (one 1 MP reference beside up to 1024 px)
    onnx = CliRunner().invoke(main, _run(flux2_export, "onnxruntime", _write_images(tmp_path, [(1024, 1024)] * 2)))
    assert onnx.exit_code == 1
    assert onnx.output == (
        "Error: 2 reference images beside a 128×128 target need 8256 transformer tokens, past the 8192 the export was "
        "made for (1 reference of up to 1048576 px at up to 2:1 beside targets up to 1024 px): export again with "
        "--max-references 2\n"
    )

    # within the budget: the engines run it, as ONNX Runtime does
    within = [
        GenerationRequest("a cat", image=[Image.open(path) for path in images[:2]], height=128, width=128,
                          num_inference_steps=1, max_sequence_length=64),
        GenerationRequest("a cat", image=reference_image.resize((176, 80)), height=128, width=128,
                          num_inference_steps=1, max_sequence_length=64),
    ]  # fmt: skip
    assert_engines_equal_onnx_runtime(source, engines, flux2_export, within)

    # the library's generate() refuses past the budget too, in `run`'s line, before any component is asked for
    double = [reference_image.resize((1024, 1024))] * 2
    with standin_tensorrt() as trt:
        for backend, references, output in (
            (TensorRTBackend(source, engines, device=HostDevice(trt)), images[:3], three.output),
            (TensorRTBackend(source, engines, device=HostDevice(trt)), images[3:], wide.output),
            (OnnxRuntimeBackend(source, flux2_export), double, onnx.output),
        ):
            asked = _watch_components(backend)
            opened = [Image.open(image) if isinstance(image, str) else image for image in references]
            request = GenerationRequest("a cat", image=opened, height=128, width=128, num_inference_steps=1)
            with pytest.raises(FluxExportError) as refused:
                generate(backend, source, request)
            assert f"Error: {refused.value}\n" == output and asked == []


def _watch_components(backend) -> list[str]:
    """The names `backend.component` is asked for from now on (it still loads them)."""
    asked, component = [], backend.component

    def watched(name: str):
        asked.append(name)
        return component(name)

    backend.component = watched
    return asked


def test_exports_recorded_before_the_budget_take_a_matching_export(flux2_sources, flux2_export, tmp_path):
    """A folder exported before the budget was recorded (our manifest without its three keys, as that version
    wrote it) holds graphs of today's default budget: an export with the same bounds may add to it, one with
    another budget is refused in one line naming it, nothing written; quantize exports for the default budget."""
    import hashlib
    import shutil

    from fluxexport.artifacts.folders import open_export
    from fluxexport.export.target_folder import REPLACE_HINT, prepare_export_folder, prepare_quantize_folder

    source, folder = flux2_sources["tiny-klein"], tmp_path / "onnx"
    shutil.copytree(flux2_export, folder)
    record = open_export(folder)
    record.bounds = {key: value for key, value in record.bounds.items() if key not in REFERENCE_OPTIONS}
    record.write()
    assert "max_references" not in open_export(folder).bounds
    prepare_export_folder(folder, source, "fp32", ExportBounds.for_model(source))  # no conflict: the same bounds
    assert prepare_quantize_folder(folder, source) == ExportBounds.for_model(source)

    def hashes():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}

    before = hashes()
    for key, value, held in (("max_references", "2", "1"), ("max_reference_aspect", "3", "2")):
        refused = CliRunner().invoke(main, ["export", "--model", "tiny-klein", "--components", "vae_decoder",
                                            REFERENCE_OPTIONS[key], value, "--out", str(folder)])  # fmt: skip
        assert refused.exit_code == 1
        conflict = f"holds graphs exported for {key} {held}, not {value}"
        assert refused.output == f"Error: {folder} {conflict}: {REPLACE_HINT}\n"
    assert hashes() == before
