"""`fluxexport check` passes exported graphs and fails, readably, on what TensorRT cannot build."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fluxexport.cli import main
from fluxexport.export.check import check_folder, check_graph, tensorrt_support


def save_graph(path, nodes, inputs, outputs, opset=20, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, str(path))
    return path


def float_input(name, elem=TensorProto.FLOAT, dims=("B", 4)):
    return helper.make_tensor_value_info(name, elem, list(dims))


def test_operator_list_is_data_with_a_source():
    support = tensorrt_support()
    assert support["tensorrt"] == "10.1" and "onnx-tensorrt" in support["source"]
    assert (support["opset_min"], support["opset_max"]) == (9, 20)
    assert {"MatMul", "Softmax", "LayerNormalization", "Gelu", "Resize", "QuantizeLinear"} <= set(support["supported"])
    assert "Unique" in support["unsupported"]


def test_unsupported_op_fails_with_its_name(tmp_path):
    path = save_graph(
        tmp_path / "unique.onnx",
        [helper.make_node("Unique", ["x"], ["y"], name="u")],
        [float_input("x")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["K"])],
    )
    report = check_graph(path)
    assert not report.ok
    assert report.problems == ["Unique ×1 is not supported by TensorRT 10.1's ONNX parser"]


def test_double_fails(tmp_path):
    path = save_graph(
        tmp_path / "double.onnx",
        [
            helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE),
            helper.make_node("Cast", ["d"], ["y"], to=TensorProto.FLOAT),
        ],
        [float_input("x")],
        [float_input("y")],
    )
    report = check_graph(path)
    assert report.problems == [
        "Cast(DOUBLE) ×1 is not supported by TensorRT 10.1's ONNX parser",  # the op's type list has no DOUBLE
        "DOUBLE tensors (TensorRT has none): d",
    ]


def test_custom_domain_opset_and_unknown_rank_fail(tmp_path):
    node = helper.make_node("TRT_FP8QuantizeLinear", ["x"], ["y"], domain="trt")
    graph = helper.make_graph(
        [node], "g", [float_input("x")], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("trt", 1)])
    onnx.save(model, str(tmp_path / "custom.onnx"))
    problems = check_graph(tmp_path / "custom.onnx").problems
    assert "opset 23 is outside TensorRT 10.1's 9..20" in problems
    assert "trt::TRT_FP8QuantizeLinear ×1 is not supported by TensorRT 10.1's ONNX parser" in problems
    assert "tensors of unknown rank: y" in problems


def test_contract_mismatch_is_reported(tmp_path, exports):
    folder = tmp_path / "swapped"
    shutil.copytree(exports["tiny-dev"], folder)
    shutil.copy(folder / "t5.onnx", folder / "clip.onnx")  # a graph that is not what the manifest promises
    reports = {r.path.name: r for r in check_folder(folder)}
    assert not reports["clip.onnx"].ok
    assert "inputs are ['input_ids'], the spec says ['input_ids']" not in reports["clip.onnx"].problems
    assert any("outputs are ['text_embeddings']" in p for p in reports["clip.onnx"].problems)
    assert all(r.ok for name, r in reports.items() if name != "clip.onnx")


def test_cli_check(tmp_path, exports):
    runner = CliRunner()
    good = runner.invoke(main, ["check", str(exports["tiny-schnell"])])
    assert good.exit_code == 0, good.output
    assert "transformer.onnx" in good.output and "FAIL" not in good.output
    save_graph(tmp_path / "bad.onnx", [helper.make_node("Unique", ["x"], ["y"])], [float_input("x")],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["K"])])  # fmt: skip
    bad = runner.invoke(main, ["check", str(tmp_path)])
    assert bad.exit_code == 1
    assert "Unique ×1 is not supported" in bad.output
    assert (
        bad.output.strip().splitlines()[-1]
        == f"Error: graphs in {tmp_path} fail the TensorRT check (see the table above)"
    )
    empty = runner.invoke(main, ["check", str(tmp_path / "none")])
    assert empty.exit_code == 1 and "is not a folder of exported graphs" in empty.output


def test_check_never_opens_external_data(tmp_path, exports):
    folder = tmp_path / "external"
    shutil.copytree(exports["tiny-dev"], folder)
    model = onnx.load(str(folder / "transformer.onnx"))
    onnx.save_model(model, str(folder / "transformer.onnx"), save_as_external_data=True,
                    location="transformer.onnx_data", size_threshold=1024)  # fmt: skip
    before = {r.path.name: (r.ok, r.nodes, r.ops, r.problems) for r in check_folder(folder)}
    (folder / "transformer.onnx_data").unlink()  # a check that read the weights could not pass now
    after = {r.path.name: (r.ok, r.nodes, r.ops, r.problems) for r in check_folder(folder)}
    assert after == before and after["transformer.onnx"][0]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak RSS from /proc")
def test_check_never_reads_inline_weights(tmp_path):
    weight = numpy_helper.from_array(np.ones((4096, 8192), np.float32), "w")  # 128 MiB, inline
    save_graph(tmp_path / "big.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"])], [float_input("x", dims=("B", 4096))],
               [float_input("y", dims=("B", 8192))], initializers=[weight])  # fmt: skip
    del weight
    script = """
import sys
from pathlib import Path
import onnx.shape_inference
from fluxexport.export.check import check_graph, tensorrt_support
tensorrt_support()
def peak():  # this process's peak RSS so far, bytes
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
before = peak()
report = check_graph(Path(sys.argv[1]))
print(report.ok, report.nodes, peak() - before)
"""
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.onnx")], capture_output=True, text=True)
    ok, nodes, growth = run.stdout.split()
    assert (ok, nodes) == ("True", "1"), run.stderr
    assert int(growth) < 32 * 2**20  # reading the weights alone would add 128 MiB (onnx.load + shape inference: ~5×)


def test_unreadable_file(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01not protobuf")
    report = check_graph(tmp_path / "junk.onnx")
    assert not report.ok and report.problems[0].startswith("cannot be read as ONNX")


@pytest.mark.parametrize("version", ["8.6"])
def test_unknown_tensorrt_version(version):
    from fluxexport.errors import FluxExportError

    with pytest.raises(FluxExportError, match="no operator list for TensorRT 8.6: this fluxexport knows 10.1"):
        tensorrt_support(version)
