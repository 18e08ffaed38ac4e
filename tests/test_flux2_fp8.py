"""FP8 Q/DQ for FLUX.2 ([klein]; [dev] in the last test): calibration on our FLUX.2 runtime's trajectories (both
branches of true CFG), the block Linears quantized under FLUX.1's policy, a graph that passes the check, runs in
ONNX Runtime close to the float32 transformer and makes images close to PyTorch's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import manifest_json
from torch import nn

from fluxexport.artifacts.folders import open_export
from fluxexport.compare import psnr
from fluxexport.export.check import check_graph
from fluxexport.families.flux2.quantize import KEEP_HIGH_PRECISION as FLUX2_KEEP_HIGH_PRECISION
from fluxexport.models.loaders import load_transformer
from fluxexport.quantize.calibrate import (
    CALIBRATION_PROMPTS,
    CalibrationSettings,
    quantizable_linears,
)
from fluxexport.quantize.qdq_export import (
    calibrate_transformer,
    fake_quantized_transformer,
    quantize_transformer,
    read_calibration,
)
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.specs import component_specs, sample_inputs

SETTINGS = CalibrationSettings(CALIBRATION_PROMPTS[:2], steps=2, height=128, width=128)
UNSEEN_SHAPES = [{"B": 1, "N": 16, "L": 40}, {"B": 3, "N": 64, "L": 7}]  # exported at B=2, N=24, L=13


def rel_l2(a, b):
    return ((a - b).double().norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def klein_fp8(flux2_sources, flux2_export, tmp_path_factory):
    """tiny-klein's fp32 graphs plus `transformer.fp8.onnx` (fp32 base), calibrated on 2 prompts × 2 steps."""
    folder = tmp_path_factory.mktemp("fp8-klein") / "tiny-klein"
    shutil.copytree(flux2_export, folder)
    quantize_transformer(flux2_sources["tiny-klein"], folder, SETTINGS, base_dtype="fp32")
    return folder


@pytest.fixture(scope="module")
def klein_torch(flux2_sources):
    from fluxexport.pytorch.backend import TorchBackend

    return TorchBackend(flux2_sources["tiny-klein"], device="cpu")


def test_fp8_transformer_is_close_to_pytorch_at_unseen_shapes(flux2_sources, klein_fp8, klein_torch):
    source = flux2_sources["tiny-klein"]
    entry = manifest_json(klein_fp8)["fp8"]["transformer"]
    assert entry["dtype"] == "fp8" and entry["base_dtype"] == "fp32" and entry["opset"] >= 19
    report = check_graph(klein_fp8 / "transformer.fp8.onnx", open_export(klein_fp8).fp8["transformer"])
    assert report.ok, report.problems

    amax = json.loads((klein_fp8 / "calibration.json").read_text())["input_amax"]
    session = onnxruntime.InferenceSession(str(klein_fp8 / "transformer.fp8.onnx"))
    fake = fake_quantized_transformer(source, amax)
    fp32 = klein_torch.component("transformer")
    spec = component_specs(source)["transformer"]
    for seed, sizes in enumerate(UNSEEN_SHAPES):
        feeds = sample_inputs(spec, sizes, seed=seed)
        ours = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feeds.items()})[0])
        # measured 2.9e-4 and 3.9e-4: the blocks' FP8 error, the embedders and the output staying in fp32
        assert 1e-5 < rel_l2(ours, fp32(feeds)["latent"]) <= 6e-2, sizes
        with torch.no_grad():  # the graph computes its PyTorch reference (measured 1e-7; an E4M3 midpoint flip ~1e-4)
            assert rel_l2(ours, fake(*feeds.values())) <= 1e-3, sizes


def test_block_linears_are_quantized_as_in_flux1(flux2_sources, klein_fp8):
    """Every Linear inside the double and single blocks carries FP8 (attention, SwiGLU, the single blocks' fused
    projections); the embedders, the time embedding, the shared modulation and the output stay in fp32."""
    model = onnx.load(str(klein_fp8 / "transformer.fp8.onnx"))
    fp8_weights = {
        t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(t.dims) == 2
    }
    transformer = load_transformer(flux2_sources["tiny-klein"])
    linears = {name for name, module in transformer.named_modules() if isinstance(module, nn.Linear)}
    quantized = set(quantizable_linears(transformer))
    assert fp8_weights == {f"model.{name}.weight.fp8" for name in quantized}
    assert {name.split(".")[-1] for name in quantized} >= {
        "to_q", "to_k", "to_v", "add_q_proj", "to_add_out", "linear_in", "linear_out", "to_qkv_mlp_proj", "to_out"
    }  # fmt: skip
    kept = linears - quantized
    assert kept and all(name.startswith(FLUX2_KEEP_HIGH_PRECISION) for name in kept)
    assert any("modulation" in name for name in kept) and {"x_embedder", "context_embedder", "proj_out"} <= kept
    assert not any(node.domain not in ("", "ai.onnx") for node in model.graph.node)

    record = json.loads((klein_fp8 / "calibration.json").read_text())
    assert record["kept_high_precision"] == list(FLUX2_KEEP_HIGH_PRECISION)
    assert set(record["input_amax"]) == quantized
    assert record["transformer_calls"] == 2 * 2  # distilled: one transformer run per prompt and step
    note = manifest_json(klein_fp8)["fp8"]["transformer"]["notes"][0]
    assert note.startswith(f"FP8 E4M3 per-tensor Q/DQ on {len(quantized)} block Linear layers; kept in fp32: ")
    calibration, _ = read_calibration(klein_fp8 / "calibration.json", flux2_sources["tiny-klein"])
    assert calibration.transformer_calls == 4


def test_fp8_images_are_close_to_pytorch(flux2_sources, klein_fp8, klein_torch):
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    source = flux2_sources["tiny-klein"]
    backend = OnnxRuntimeBackend(source, klein_fp8, fp8=True)
    assert backend.entries["transformer"].file == "transformer.fp8.onnx"
    # a size and seeds neither export nor calibration used
    request = GenerationRequest(["a cat on the moon", "a dog"], height=192, width=320, seed=3)
    ours, theirs = generate(backend, source, request).images, generate(klein_torch, source, request).images
    assert not np.array_equal(ours, theirs)  # the FP8 graph ran
    assert psnr(ours, theirs) >= 55  # measured 66.4 dB (the fp32 graphs: 84.7 dB)


def test_calibration_visits_both_cfg_branches(flux2_sources):
    """tiny-klein-base runs true CFG: calibration observes the conditional and the unconditional transformer run of
    each step (8 single-sample runs for 2 prompts × 2 steps), whether the model is held whole or block by block."""
    source = flux2_sources["tiny-klein-base"]
    settings = CalibrationSettings(CALIBRATION_PROMPTS[:2], steps=2, height=64, width=64)
    whole = calibrate_transformer(source, settings, "cpu")
    assert whole.transformer_calls == 2 * 2 * 2
    progress: list[tuple[int, int]] = []
    sequential = calibrate_transformer(
        source, settings, "cpu", sequential=True, on_progress=lambda done, total: progress.append((done, total))
    )
    assert sequential.transformer_calls == whole.transformer_calls
    assert all(abs(sequential.input_amax[k] - v) <= 1e-6 * v for k, v in whole.input_amax.items())
    blocks = 2  # one double, one single block; each runs once per transformer run, both branches
    assert progress == [(done, 2 * 2 * blocks) for done in range(1, 2 * 2 * blocks + 1)]
    guidance_off = CalibrationSettings(settings.prompts, steps=2, height=64, width=64, guidance_scale=1.0)
    assert calibrate_transformer(source, guidance_off, "cpu").transformer_calls == 2 * 2  # no unconditional run


def test_components_without_fp8_graphs_are_refused_before_calibration(flux2_sources, tmp_path, monkeypatch):
    """The transformer and its parts have FP8 graphs (tests/test_flux2_cache.py quantizes FLUX.2's parts); any
    other component is refused before anything is calibrated."""
    import fluxexport.quantize.qdq_export as qdq_export
    from fluxexport.errors import FluxExportError

    monkeypatch.setattr(qdq_export, "calibrate", lambda *_args, **_kwargs: pytest.fail("calibration ran"))
    with pytest.raises(FluxExportError) as error:
        quantize_transformer(flux2_sources["tiny-klein"], tmp_path, components=["transformer", "text_encoder"])
    assert str(error.value) == (
        "quantize makes FP8 graphs of transformer, transformer_head, transformer_tail, transformer_out, not of "
        "text_encoder"
    )
    assert not (tmp_path / "calibration.json").exists()


def test_flux2_dev_fp8_transformer_is_close_to_pytorch(flux2_sources, flux2_dev_export, tmp_path):
    """FLUX.2 [dev] calibrated one block at a time (its Mistral3 text encoder streamed too): one transformer run per
    prompt and step (guidance-distilled, no CFG), the Q/DQ graph close to PyTorch fp32 at unseen shapes with the
    guidance input, and its images close to PyTorch's."""
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.pytorch.backend import TorchBackend

    source = flux2_sources["tiny-flux2-dev"]
    folder = tmp_path / "tiny-flux2-dev"
    shutil.copytree(flux2_dev_export, folder)
    quantize_transformer(source, folder, SETTINGS, base_dtype="fp32", sequential=True)
    assert json.loads((folder / "calibration.json").read_text())["transformer_calls"] == 2 * 2

    reference = TorchBackend(source, device="cpu")
    session = onnxruntime.InferenceSession(str(folder / "transformer.fp8.onnx"))
    spec = component_specs(source)["transformer"]
    assert "guidance" in [tensor.name for tensor in spec.inputs]
    for seed, sizes in enumerate(UNSEEN_SHAPES):
        feeds = sample_inputs(spec, sizes, seed=seed)
        ours = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feeds.items()})[0])
        assert 1e-5 < rel_l2(ours, reference.component("transformer")(feeds)["latent"]) <= 6e-2, sizes
    request = GenerationRequest(["a cat on the moon", "a dog"], height=192, width=320, seed=3)
    ours = generate(OnnxRuntimeBackend(source, folder, fp8=True), source, request).images
    assert psnr(ours, generate(reference, source, request).images) >= 55
