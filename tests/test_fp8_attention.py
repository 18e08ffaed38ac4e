"""`quantize --fp8-attention`: the attention matmuls in FP8 where TensorRT's fused FP8 attention takes them, close to
PyTorch at shapes the export never saw, and images close to the bf16 model's."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import cli_refusal, manifest_json

from fluxexport.compare import psnr
from fluxexport.dtypes import E4M3_MAX
from fluxexport.errors import FluxExportError
from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings
from fluxexport.quantize.placement import qdq_problems
from fluxexport.quantize.qdq_export import fake_quantized_transformer, quantize_transformer, read_calibration
from fluxexport.specs import component_specs, sample_inputs

SETTINGS = CalibrationSettings(CALIBRATION_PROMPTS[:2], steps=2, height=128, width=128)
UNSEEN_SHAPES = [{"B": 1, "N": 16, "L": 40}, {"B": 3, "N": 64, "L": 7}]  # exported at B=2, N=24, L=13
ATTENTIONS = ["single_transformer_blocks.0.attn", "transformer_blocks.0.attn"]


def rel_l2(a, b):
    return ((a - b).double().norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def attention_fp8(sources, exports, tmp_path_factory):
    """tiny-dev's fp32 graphs plus `transformer.fp8.onnx` with FP8 attention (fp32 base), 2 prompts × 2 steps."""
    folder = tmp_path_factory.mktemp("fp8-attention") / "tiny-dev"
    shutil.copytree(exports["tiny-dev"], folder)
    quantize_transformer(sources["tiny-dev"], folder, SETTINGS, base_dtype="fp32", fp8_attention=True)
    return folder


def test_attention_qdq_sits_on_the_bmm_inputs(attention_fp8):
    model = onnx.load(str(attention_fp8 / "transformer.fp8.onnx"))
    assert qdq_problems(model) == []
    producer = {output: node for node in model.graph.node for output in node.output}
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    softmax_qs, bmm1, bmm2 = [], [], []
    for softmax in (node for node in model.graph.node if node.op_type == "Softmax"):
        (quantize,) = consumers[softmax.output[0]]
        softmax_qs.append(quantize.op_type == "QuantizeLinear")
        dequantize = consumers[quantize.output[0]][0]
        (matmul,) = consumers[dequantize.output[0]]  # BMM2: P·V, both operands dequantized
        bmm2.append([producer[name].op_type for name in matmul.input] == ["DequantizeLinear"] * 2)
        scale = producer.get(quantize.input[1])
        step = constants.get(
            quantize.input[1], None if scale is None else onnx.numpy_helper.to_array(scale.attribute[0].t)
        )
        assert step is not None and np.isclose(float(step), 1 / E4M3_MAX)
        first = producer[softmax.input[0]]  # BMM1: the scaled query times the transposed key, both dequantized
        bmm1.append(
            first.op_type == "MatMul" and [producer[n].op_type for n in first.input] == ["DequantizeLinear"] * 2
        )
        quantized = [producer[producer[n].input[0]].input[0] for n in first.input]
        assert [producer[name].op_type for name in quantized] == ["Mul", "Transpose"]
    assert softmax_qs == bmm1 == bmm2 == [True] * len(ATTENTIONS)
    record = manifest_json(attention_fp8)["fp8"]["transformer"]
    assert record["quantization"]["attention"] == {"modules": ATTENTIONS, "tensors": ["q", "k", "v", "softmax"]}
    assert record["notes"][0].startswith("FP8 E4M3 per-tensor Q/DQ on 20 block Linear layers and 2 attentions")


def test_attention_scales_are_calibrated(sources, attention_fp8):
    calibration, record = read_calibration(attention_fp8 / "calibration.json", sources["tiny-dev"])
    assert sorted(record["attention_amax"]) == sorted(f"{a}.{t}" for a in ATTENTIONS for t in "qkv")
    assert all(0 < value < 1e3 for value in calibration.attention_amax.values())


def test_fp8_attention_graph_is_close_to_pytorch_at_unseen_shapes(sources, attention_fp8, torch_backends):
    source = sources["tiny-dev"]
    calibration, _ = read_calibration(attention_fp8 / "calibration.json", source)
    spec = component_specs(source)["transformer"]
    session = onnxruntime.InferenceSession(str(attention_fp8 / "transformer.fp8.onnx"))
    fake = fake_quantized_transformer(source, calibration.input_amax, attention_amax=calibration.attention_amax)
    fp32 = torch_backends["tiny-dev"].component("transformer")
    for index, sizes in enumerate(UNSEEN_SHAPES):
        feeds = sample_inputs(spec, sizes, seed=10 + index)
        ours = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feeds.items()})[0])
        with torch.no_grad():
            assert rel_l2(ours, fake(*feeds.values())) <= 1e-3, sizes  # the graph computes its reference
        assert 1e-5 < rel_l2(ours, fp32(feeds)["latent"]) <= 6e-2, sizes


def test_fp8_attention_images_are_close_to_bf16(sources, attention_fp8):
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.runtime.pipeline import GenerationRequest, generate

    source = sources["tiny-dev"]
    request = GenerationRequest(["a cat on the moon"], height=128, width=192, seed=3)  # a size and seed unseen
    ours = generate(OnnxRuntimeBackend(source, attention_fp8, fp8=True), source, request).images
    with TorchBackend(source, "bf16", "cpu") as bf16:
        theirs = generate(bf16, source, request).images
    assert not np.array_equal(ours, theirs)
    assert psnr(ours, theirs) >= 30  # measured 47.6 dB (bf16 itself is 47.8 dB from fp32; FP8 attention 59.7)


def test_a_calibration_without_attention_is_refused(sources, fp8_exports, tmp_path):
    saved = fp8_exports["tiny-dev"] / "calibration.json"
    assert json.loads(saved.read_text())["attention_amax"] == {}
    with pytest.raises(FluxExportError) as error:
        quantize_transformer(
            sources["tiny-dev"], tmp_path, base_dtype="fp32", calibration_file=saved, fp8_attention=True
        )
    assert str(error.value) == (
        f"{saved} has no attention scales: calibrate again with --fp8-attention (drop --calibration)"
    )


def test_quantize_refuses_fp8_attention_with_nvfp4_before_any_work(tmp_path):
    """The CLI: one line, exit status 1, no folder written, before the model is read."""
    refused = cli_refusal("quantize", "--model", "tiny-dev", "--precision", "nvfp4", "--fp8-attention", "--out",
                          tmp_path / "out")  # fmt: skip
    assert refused == "Error: --fp8-attention is FP8's: NVFP4 quantizes the block Linears only (drop one of them)"
    assert not (tmp_path / "out").exists()


def test_quantize_refuses_fp8_attention_from_scales_without_attention(fp8_exports, tmp_path):
    """The CLI, with a saved calibration made without --fp8-attention: one line, exit status 1, nothing written."""
    saved = fp8_exports["tiny-dev"] / "calibration.json"
    refused = cli_refusal("quantize", "--model", "tiny-dev", "--fp8-attention", "--calibration", saved, "--out",
                          tmp_path / "out")  # fmt: skip
    assert refused == (
        f"Error: {saved} has no attention scales: calibrate again with --fp8-attention (drop --calibration)"
    )
    assert not (tmp_path / "out").exists()


def test_build_precision_fp8_builds_it_and_the_manifest_says_what_is_fp8(sources, attention_fp8, tmp_path):
    from helpers import build_folder

    engines = build_folder(
        sources["tiny-dev"], attention_fp8, tmp_path / "trt", precision="fp8", components=["transformer"]
    )
    record = manifest_json(engines)["components"]["transformer"]
    assert record["onnx"].endswith("transformer.fp8.onnx") and record["precision"] == "fp8"
    assert record["quantization"]["attention"]["modules"] == ATTENTIONS
    assert record["quantization"]["layers"] == 20


@pytest.mark.parametrize("variant", ["tiny-dev", "tiny-klein"])
def test_sequential_calibration_gives_the_whole_model_attention_scales(variant):
    from fluxexport.models.source import resolve_model
    from fluxexport.quantize.qdq_export import calibrate_transformer

    source = resolve_model(variant)
    whole = calibrate_transformer(source, SETTINGS, "cpu", attention=True)
    sequential = calibrate_transformer(source, SETTINGS, "cpu", sequential=True, attention=True)
    assert sorted(whole.attention_amax) == sorted(f"{a}.{t}" for a in ATTENTIONS for t in "qkv")
    assert sequential.attention_amax.keys() == whole.attention_amax.keys()
    assert all(
        abs(sequential.attention_amax[name] - value) <= 1e-5 * value for name, value in whole.attention_amax.items()
    )
