"""Holding one block at a time: streamed modules compute what the loaded ones do, sequential calibration gives
the whole-model scales, and the FP8 graph is exported without the model (the in-memory export's graph)."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_same_graph
from safetensors.torch import load_file, save_file

from fluxexport.adapters import wrap_component
from fluxexport.cli import main
from fluxexport.export.onnx_export import export_component
from fluxexport.models.loaders import load_module
from fluxexport.models.source import load_folder, resolve_model
from fluxexport.models.tiny import write_bfl_single_file
from fluxexport.pytorch.backend import TorchBackend
from fluxexport.pytorch.block_streaming import streamed_module
from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings, fake_quantize
from fluxexport.quantize.fp8 import TRANSLATIONS
from fluxexport.quantize.qdq_export import (
    calibrate_transformer,
    export_quantized,
    read_calibration,
    store_weights_in_fp8,
)
from fluxexport.specs import component_specs, sample_inputs

SETTINGS = CalibrationSettings(CALIBRATION_PROMPTS[:3], steps=2, height=128, width=160)


def outputs(adapter, feeds):
    with torch.no_grad():
        result = adapter(*feeds.values())
    return result if isinstance(result, tuple) else (result,)


def max_relative(a: dict[str, float], b: dict[str, float]) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[name] - b[name]) / abs(b[name]) for name in a)


@pytest.fixture(scope="module")
def bf16_checkpoint(sources, tmp_path_factory):
    """tiny-dev with its transformer, T5 and CLIP stored in bf16, as published checkpoints are."""
    folder = tmp_path_factory.mktemp("bf16") / "tiny-dev-bf16"
    shutil.copytree(sources["tiny-dev"].root, folder)
    for part in ("transformer", "text_encoder", "text_encoder_2"):
        for weights in (folder / part).glob("*.safetensors"):
            state = load_file(str(weights))
            save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}, str(weights))
    return load_folder(folder)


@pytest.mark.parametrize("variant", ["tiny-dev", "tiny-schnell", "bf16-stored"])
@pytest.mark.parametrize("component", ["transformer", "t5", "clip"])
def test_streamed_modules_compute_what_loaded_ones_do(variant, component, sources, bf16_checkpoint):
    """Also from a bf16 checkpoint run in float32: the streamed module holds bf16 and upcasts per module,
    the loaded one converted everything at load; the numbers are the same."""
    source = bf16_checkpoint if variant == "bf16-stored" else sources[variant]
    module = {"transformer": "transformer", "t5": "t5", "clip": "clip"}[component]
    loaded = wrap_component(component, load_module(source, module), source.guidance_embeds, float32_rope=False)
    inner = streamed_module(source, module, torch.float32)
    streamed = wrap_component(component, inner, source.guidance_embeds, float32_rope=False)
    spec = component_specs(source)[component]
    for index, sizes in enumerate(({"B": 1, "N": 16, "L": 7}, {"B": 3, "N": 40, "L": 13})):
        feeds = sample_inputs(spec, sizes, seed=index)
        for ours, theirs in zip(outputs(streamed, feeds), outputs(loaded, feeds), strict=True):
            # a batch runs through a FLUX block one sample at a time: float32 noise, not a difference
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if variant == "bf16-stored":  # held as stored: half the memory of float32
        assert {p.dtype for p in inner.parameters() if p.device.type != "meta"} == {torch.bfloat16}
    blocks = [name for name, p in inner.named_parameters() if p.device.type == "meta"]
    assert blocks, "the blocks hold no weights between runs"
    assert all(".block." in name or "blocks." in name or ".layers." in name for name in blocks)


def test_a_bfl_single_file_and_a_prefixed_clip_stream(sources, tmp_path):
    """Black-forest-labs' fused tensors split on the fly; a published CLIP's `text_model.` keys are found."""
    single = write_bfl_single_file(sources["tiny-dev"].root, tmp_path / "flux1-tiny.safetensors")
    bfl = resolve_model(str(single), base="tiny-dev")
    spec = component_specs(bfl)["transformer"]
    feeds = sample_inputs(spec, {"B": 2, "N": 24, "L": 5}, seed=3)
    loaded = wrap_component("transformer", load_module(bfl, "transformer"), True, float32_rope=False)
    streamed = wrap_component("transformer", streamed_module(bfl, "transformer", torch.float32), True, False)
    torch.testing.assert_close(outputs(streamed, feeds), outputs(loaded, feeds), rtol=1e-5, atol=1e-5)

    folder = tmp_path / "prefixed"
    shutil.copytree(sources["tiny-dev"].root, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    save_file({f"text_model.{key}": value for key, value in load_file(str(weights)).items()}, str(weights))
    prefixed = load_folder(folder)
    spec = component_specs(prefixed)["clip"]
    feeds = sample_inputs(spec, {"B": 2}, seed=4)
    reference = wrap_component("clip", load_module(sources["tiny-dev"], "clip"), True)
    streamed = wrap_component("clip", streamed_module(prefixed, "clip", torch.float32), True)
    torch.testing.assert_close(outputs(streamed, feeds), outputs(reference, feeds), rtol=0, atol=0)


@pytest.fixture(scope="module")
def calibrations(sources):
    """Per variant: (whole-model calibration, sequential calibration, the sequential progress calls)."""
    result = {}
    for variant in ("tiny-dev", "tiny-schnell"):
        progress: list[tuple[int, int]] = []
        whole = calibrate_transformer(sources[variant], SETTINGS, "cpu")
        sequential = calibrate_transformer(
            sources[variant], SETTINGS, "cpu", sequential=True,
            on_progress=lambda done, total, calls=progress: calls.append((done, total)),
        )  # fmt: skip
        result[variant] = whole, sequential, progress
    return result


@pytest.mark.parametrize("variant", ["tiny-dev", "tiny-schnell"])
def test_sequential_calibration_gives_the_whole_model_scales(variant, sources, calibrations):
    whole, sequential, progress = calibrations[variant]
    assert max_relative(sequential.input_amax, whole.input_amax) <= 1e-6
    assert sequential.weight_amax == whole.weight_amax  # read from the same checkpoint, in float32
    transformer = load_module(sources[variant], "transformer")
    for name, amax in whole.weight_amax.items():
        assert amax == transformer.get_submodule(name).weight.abs().max().item()
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert progress == [(done, SETTINGS.steps * blocks) for done in range(1, SETTINGS.steps * blocks + 1)]


def test_sequential_calibration_holds_no_block_between_runs(sources):
    with TorchBackend(sources["tiny-dev"], "fp32", "cpu", stream_blocks=True) as backend:
        transformer = backend.module("transformer")
        spec = backend.specs["transformer"]
        backend.component("transformer")(sample_inputs(spec, {"B": 2, "N": 16, "L": 5}))
        loaded = {name for name, p in transformer.named_parameters() if p.device.type != "meta"}
    assert loaded and not any(name.startswith(("transformer_blocks", "single_transformer_blocks")) for name in loaded)


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype", ["fp32", "bf16"])
def test_streamed_fp8_export_equals_the_in_memory_one(base_dtype, sources, calibrations, tmp_path):
    """Traced on fake weights, weights quantized as they stream: the graph of the in-memory FP8 export, with
    bit-identical FP8 weights and scales (weight amax from the calibration record, cast to the base dtype)."""
    source = sources["tiny-dev"]
    calibration = calibrations["tiny-dev"][1]
    calibration_path = tmp_path / "calibration.json"
    entry = export_quantized(source, tmp_path / "streamed", calibration, calibration_path, base_dtype, 20)
    spec = component_specs(source)["transformer"]
    reference = export_component(
        source, spec, tmp_path / "memory", base_dtype, 20, translations=TRANSLATIONS, streaming=False,
        prepare=lambda transformer: fake_quantize(transformer, calibration.input_amax),
        graph_pass=store_weights_in_fp8,
    )  # fmt: skip
    assert_same_graph(tmp_path / "streamed" / entry.file, reference.path)
    assert entry.extra["weight_bytes"] == reference.weight_bytes


def test_an_old_calibration_without_weight_amax_reads_the_weights(sources, fp8_exports, tmp_path):
    """Records written before weight amax was kept still work: the export reads each weight's amax."""
    source = sources["tiny-dev"]
    record = json.loads((fp8_exports["tiny-dev"] / "calibration.json").read_text())
    del record["weight_amax"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(record))
    calibration, _ = read_calibration(old, source)
    assert calibration.weight_amax == {}
    entry = export_quantized(source, tmp_path / "out", calibration, old, "fp32", 20)
    assert_same_graph(tmp_path / "out" / entry.file, fp8_exports["tiny-dev"] / "transformer.fp8.onnx")


@pytest.mark.slow
def test_quantize_sequential_cli_and_its_refusal(sources, tmp_path):
    runner = CliRunner()
    args = ["quantize", "--model", "tiny-schnell", "--dtype", "fp32", "--calib-size", "1", "--calib-steps", "1",
            "--calib-resolution", "128"]  # fmt: skip
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "a"), "--sequential"])
    assert result.exit_code == 0, result.output
    assert "calibration saved to" in result.output and "reuse it with --calibration" in result.output
    saved = tmp_path / "a" / "calibration.json"
    refused = runner.invoke(main, ["quantize", "--model", "tiny-schnell", "--calibration", str(saved), "--sequential"])
    assert refused.exit_code != 0
    assert (
        "--calibration reuses saved scales, so --sequential/--whole-model would be ignored: drop one of them"
        in refused.output
    )


def test_calibration_holds_one_block_at_a_time_when_the_model_does_not_fit(sources, monkeypatch):
    import fluxexport.quantize.qdq_export as qdq_export

    source = sources["tiny-dev"]
    needed = qdq_export.float32_bytes(source)
    parameters = sum(
        p.numel() for module in ("transformer", "t5", "clip") for p in load_module(source, module).parameters()
    )
    assert needed == 4 * parameters
    monkeypatch.setattr(qdq_export, "available_bytes", lambda device: needed)  # 100% > 80% headroom
    assert qdq_export.choose_sequential(source) == (
        True, f"calibrating one block at a time: the float32 model needs {needed / 1e9:.1f} GB, "
        f"{needed / 1e9:.1f} GB are free",
    )  # fmt: skip
    monkeypatch.setattr(qdq_export, "available_bytes", lambda device: 2 * needed)
    assert qdq_export.choose_sequential(source)[0] is False
