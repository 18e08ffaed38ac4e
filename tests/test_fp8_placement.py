"""Our FP8 placement next to NVIDIA ModelOpt's FLUX recipe, quantizer by quantizer, and the Q/DQ graph's placement
against TensorRT's explicit-quantization fusion rules."""

import math

import onnx
import pytest

from fluxexport.pytorch.backend import TorchBackend
from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings, calibrate
from fluxexport.quantize.placement import Placement, modelopt_calibrated, our_placement, placement_table, qdq_problems

SETTINGS = CalibrationSettings(CALIBRATION_PROMPTS[:2], steps=2, height=128, width=128)


@pytest.fixture(scope="module")
def tiny_sources(cache_root):
    from fluxexport.models.source import resolve_model

    return {name: resolve_model(name) for name in ("tiny-dev", "tiny-klein")}


@pytest.mark.parametrize("variant", ["tiny-dev", "tiny-klein"])
def test_our_placement_and_scales_are_modelopts(variant, tiny_sources):
    pytest.importorskip("modelopt.torch.quantization", reason="needs nvidia-modelopt (pip install -e '.[modelopt]')")
    source = tiny_sources[variant]
    theirs, their_amax = modelopt_calibrated(source, SETTINGS, attention=True)
    with TorchBackend(source, "fp32", "cpu") as backend:
        ours = our_placement(backend.module("transformer"), attention=True)
        calibration = calibrate(backend, source, SETTINGS, attention=True)
        modules = dict(backend.module("transformer").named_modules())
    extra = {name: theirs[name] for name in set(theirs) - set(ours)}
    # the one difference: ModelOpt's "*input_quantizer" also enables the input quantizers it puts on the blocks'
    # normalizations, whose Q/DQ feeds no GEMM (TensorRT fuses Q/DQ into GEMM inputs); Linears and attention agree
    assert extra and all("Norm" in type(modules[name]).__name__ for name in extra), placement_table(ours, theirs)
    assert set(extra.values()) == {Placement(input=True)}
    assert {name: theirs[name] for name in ours} == ours
    assert sum(found.attention for found in ours.values()) == 2  # one double and one single block
    assert all(found in (Placement(True, True), Placement(attention=True)) for found in ours.values())
    # max calibration on the same trajectories: ModelOpt's amax are ours, Linear inputs and q, k, v alike
    our_amax = calibration.input_amax | calibration.attention_amax
    assert set(our_amax) == set(their_amax) - set(extra)
    assert all(math.isclose(our_amax[name], their_amax[name], rel_tol=1e-6) for name in our_amax)


def test_the_fp8_graph_keeps_tensorrts_fusion_rules(fp8_exports):
    model = onnx.load(str(fp8_exports["tiny-dev"] / "transformer.fp8.onnx"))
    assert qdq_problems(model) == []
    weights = [node for node in model.graph.node if node.op_type == "DequantizeLinear"
               and node.input[0].endswith(".weight.fp8")]  # fmt: skip
    assert weights  # stored pre-quantized


def test_the_fusion_rules_catch_a_misplaced_qdq():
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="gemm"),
        helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"], name="q_after_gemm"),
        helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["yd"], name="dq_into_add"),
        helper.make_node("Add", ["yd", "b"], ["out"], name="bias"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0] * 4), helper.make_tensor("s", TensorProto.FLOAT, [], [1.0]),
         helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0]), helper.make_tensor("b", TensorProto.FLOAT, [2], [0.0] * 2)],
    )  # fmt: skip
    assert qdq_problems(helper.make_model(graph)) == [
        "q_after_gemm: quantizes the output of MatMul gemm",
        "dq_into_add: feeds Add bias, not a GEMM input",
    ]
