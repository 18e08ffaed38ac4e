"""`export --native-attention`: ONNX's own Attention / RMSNormalization (opset 23) in the graph, ONNX Runtime as the
oracle against the default (decomposed) export, `check` and `build` knowing which TensorRT parses them."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import cli_refusal

from fluxexport.artifacts.folders import open_export
from fluxexport.errors import FluxExportError
from fluxexport.export.check import check_graph, tensorrt_support
from fluxexport.export.native_ops import decompose_rms_normalization
from fluxexport.specs import component_specs, sample_inputs, validation_sizes
from fluxexport.tensorrt.environment import native_op_refusal

VARIANT = "tiny-dev"  # 1 double + 1 single block: 2 attentions, 4 + 2 q/k RMS norms


@pytest.fixture(scope="module")
def native_export(sources, tmp_path_factory) -> Path:
    """tiny-dev's transformer exported with --native-attention (opset 23), the one native export of the suite."""
    from fluxexport.export.onnx_export import export_model

    folder = tmp_path_factory.mktemp("onnx-native")
    export_model(sources[VARIANT], folder, ["transformer"], opset=23, native_attention=True)
    return folder


def op_counts(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(path, load_external_data=False).graph.node)


def snr_db(actual: np.ndarray, expected: np.ndarray) -> float:
    noise = float(np.sum((actual.astype(np.float64) - expected) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(expected.astype(np.float64) ** 2)) / noise)


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_native_attention.py")  # its one export made once (conftest.xdist_group)
def test_native_graph_holds_attention_and_rms_norms_where_the_default_decomposes_them(native_export, exports):
    native, default = op_counts(native_export / "transformer.onnx"), op_counts(exports[VARIANT] / "transformer.onnx")
    assert (native["Attention"], native["RMSNormalization"]) == (2, 6)
    assert native["Softmax"] == native["ReduceMean"] == 0
    assert default["Attention"] == default["RMSNormalization"] == 0
    assert (default["Softmax"], default["ReduceMean"]) == (2, 6)
    record = open_export(native_export).components["transformer"]
    assert record.opset == 23
    assert record.extra["native_ops"] == {"Attention": 2, "RMSNormalization": 6}
    assert "native ONNX ops Attention ×2, RMSNormalization ×6: TensorRT ≥ 10.15 parses them" in record.notes


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_native_attention.py")  # its one export made once (conftest.xdist_group)
def test_onnxruntime_runs_the_native_graph_as_the_default_export_at_unseen_shapes(native_export, exports, sources):
    spec = component_specs(sources[VARIANT])["transformer"]
    native = ort.InferenceSession(str(native_export / "transformer.onnx"), providers=["CPUExecutionProvider"])
    default = ort.InferenceSession(str(exports[VARIANT] / "transformer.onnx"), providers=["CPUExecutionProvider"])
    sizes = [sizes for sizes, _ in validation_sizes(spec)]
    assert any(s != spec.export_sizes for s in sizes)
    for axis_sizes in sizes:
        feeds = {name: value.numpy() for name, value in sample_inputs(spec, axis_sizes, seed=3).items()}
        ours, theirs = native.run(None, feeds)[0], default.run(None, feeds)[0]
        assert ours.shape == theirs.shape
        assert snr_db(ours, theirs) >= 50, axis_sizes


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_native_attention.py")  # its one export made once (conftest.xdist_group)
def test_validate_compares_the_native_graph_with_pytorch(native_export, sources, torch_backends):
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.validate.graphs import compare_component

    spec = component_specs(sources[VARIANT])["transformer"]
    graphs = OnnxRuntimeBackend(sources[VARIANT], native_export).component("transformer")
    results = compare_component(spec, graphs, torch_backends[VARIANT].component("transformer"), 1e-5)
    assert len(results) == 3
    assert all(r.passed for r in results), [(r.sizes, r.rel_l2) for r in results]


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_native_attention.py")  # its one export made once (conftest.xdist_group)
def test_check_names_the_tensorrt_that_parses_native_ops(native_export):
    record = open_export(native_export).components["transformer"]
    path = native_export / "transformer.onnx"
    assert check_graph(path, record).problems == [
        "opset 23 is outside TensorRT 10.1's 9..20",
        "Attention ×2, RMSNormalization ×6: opset 23's own ops, parsed by TensorRT ≥ 10.15, not by 10.1: check "
        "with --tensorrt 10.15",
    ]
    for version in ("10.15", "11.5.0"):
        report = check_graph(path, record, version)
        assert report.ok, report.problems
        assert report.tensorrt == version


def test_check_refuses_a_tensorrt_that_parses_only_part_of_them():
    with pytest.raises(FluxExportError) as refused:
        tensorrt_support("10.14")
    assert str(refused.value) == (
        "no operator list for TensorRT 10.14: this fluxexport knows 10.1, and 10.15 or newer for graphs with opset "
        "23's Attention / RMSNormalization / RotaryEmbedding"
    )


@pytest.mark.slow
@pytest.mark.xdist_group("tests/test_native_attention.py")  # its one export made once (conftest.xdist_group)
def test_build_refuses_native_graphs_below_tensorrt_10_15(native_export, exports):
    native = {"transformer": open_export(native_export).components["transformer"]}
    assert native_op_refusal(native, (10, 14, 1, 48), "10.14.1.48") == (
        "transformer's graph holds ONNX Attention / RMSNormalization (opset 23's own ops), which TensorRT "
        "10.14.1.48's ONNX parser does not take (needs 10.15 or newer): build with TensorRT 10.15+ or export again "
        "without --native-attention at the default opset"
    )
    assert native_op_refusal(native, (10, 15, 1, 29), "10.15.1.29") is None
    assert native_op_refusal(open_export(exports[VARIANT]).components, (10, 1, 0), "10.1.0") is None


def test_native_attention_below_opset_23_is_refused_before_any_work(tmp_path):
    assert cli_refusal("export", "--model", VARIANT, "--native-attention", "--opset", "22", "--out", tmp_path) == (
        "Error: --native-attention needs opset 23 or newer (ONNX's Attention and RMSNormalization), --opset is 22: "
        "drop --opset or pass --opset 23"
    )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16])
def test_rms_normalization_decomposes_to_the_same_numbers(dtype):
    """The portable export's undoing of onnxscript's RMSNormalization fusion computes what the op computes."""
    h = onnx.helper
    node = h.make_node("RMSNormalization", ["x", "scale"], ["y"], axis=-1, epsilon=1e-6, name="norm")
    graph = h.make_graph(
        [node], "rms", [h.make_tensor_value_info("x", dtype, ["B", "S", 8]), h.make_tensor_value_info("scale", dtype, [8])],
        [h.make_tensor_value_info("y", dtype, ["B", "S", 8])],
    )  # fmt: skip
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 23)])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=(2, 5, 8)), "scale": rng.normal(size=8)}
    feeds = {name: value.astype(onnx.helper.tensor_dtype_to_np_dtype(dtype)) for name, value in feeds.items()}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    decomposed = ir.from_proto(model)
    assert decompose_rms_normalization(decomposed) == 1
    assert "RMSNormalization" not in {n.op_type for n in decomposed.graph}
    proto = ir.to_proto(decomposed)
    onnx.checker.check_model(proto, full_check=True)
    actual = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    tolerance = 1e-6 if dtype == onnx.TensorProto.FLOAT else 2e-3
    np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32), rtol=tolerance, atol=tolerance)
