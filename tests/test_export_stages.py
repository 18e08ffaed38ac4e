"""Export in stages: the graph passes and the write stage, each alone, on small graphs built here and on the
session's traced graphs (never traced again); the one staging helper, shared by the export, `optimize` and the
float32 copy of a bf16 graph."""

import os
import shutil
import stat

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from fluxexport.artifacts.files import file_sha256
from fluxexport.atomic import staged_files
from fluxexport.errors import FluxExportError
from fluxexport.export import graph as passes
from fluxexport.export.onnx_export import (
    EXTERNAL_DATA_THRESHOLD,
    PROTOBUF_LIMIT,
    WritePolicy,
    weight_bytes_of,
    write_graph,
)
from fluxexport.specs import Axis, ComponentSpec, TensorSpec

WIDTH = 64
WEIGHT_BYTES = (WIDTH * WIDTH + WIDTH) * 4  # the small graph's MatMul weight and Add bias, float32


def everything(folder):
    """Every name under `folder`, hidden ones (staging folders, temp files) included."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def small_model(seed: int = 0, op: str = "MatMul") -> ir.Model:
    """y = x·W + b with x [s0, 64] (torch's kind of axis name): 16.6 kB of float32 weights."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node(op, ["x", "W"], ["h"], name="matmul"),
            helper.make_node("Add", ["h", "b"], ["y"], name="add"),
        ],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s0", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s0", WIDTH])],
        [weight, bias],
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["s0", WIDTH])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    return ir.serde.deserialize_model(model)


def small_spec(dtype: str = "compute") -> ComponentSpec:
    return ComponentSpec(
        "small", (TensorSpec("x", dtype, ("B", WIDTH)),), (TensorSpec("y", "compute", ("B", WIDTH)),),
        {"B": Axis(1, 2, 4)}, {"B": 2},
    )  # fmt: skip


def run(path, rows: int = 3) -> np.ndarray:
    x = np.arange(rows * WIDTH, dtype=np.float32).reshape(rows, WIDTH) / 100
    return onnxruntime.InferenceSession(str(path)).run(None, {"x": x})[0]


# --- the write policy -------------------------------------------------------------------------------------------


def test_write_policy_places_the_weights_at_the_threshold():
    policy = WritePolicy("clip", threshold=1000)
    assert (policy.data_file_for(1000), policy.data_file_for(1001)) == (None, "clip.onnx_data")
    assert WritePolicy("clip", external_data=True).data_file_for(0) == "clip.onnx_data"  # --external-data
    assert WritePolicy("clip", external_data=False).data_file_for(2**30) is None  # --inline-weights
    assert WritePolicy("clip").threshold == EXTERNAL_DATA_THRESHOLD == 32 * 2**20
    assert WritePolicy("transformer.fp8").graph_file == "transformer.fp8.onnx"
    assert WritePolicy("transformer").data_file_for(PROTOBUF_LIMIT + 1) == "transformer.onnx_data"
    with pytest.raises(FluxExportError) as error:
        WritePolicy("transformer", external_data=False).data_file_for(PROTOBUF_LIMIT + 1)
    assert str(error.value) == (
        "transformer: 2.13 GB of weights cannot be inline in one ONNX protobuf (2 GB at most): drop --inline-weights"
    )


def test_write_inline_and_external_at_the_threshold(tmp_path):
    model = small_model()
    assert weight_bytes_of(model) == WEIGHT_BYTES
    inline = write_graph(model, tmp_path / "inline", WritePolicy("small", threshold=WEIGHT_BYTES))
    external = write_graph(model, tmp_path / "external", WritePolicy("small", threshold=WEIGHT_BYTES - 1))
    assert (inline.external_data, external.external_data) == (None, "small.onnx_data")
    assert (inline.weight_bytes, inline.nodes) == (WEIGHT_BYTES, 2)
    assert everything(tmp_path / "inline") == ["small.onnx"]
    assert everything(tmp_path / "external") == ["small.onnx", "small.onnx_data"]
    assert (tmp_path / "external" / "small.onnx_data").stat().st_size == WIDTH * WIDTH * 4  # the bias (256 B) stays
    assert (tmp_path / "inline" / "small.onnx").stat().st_size > WEIGHT_BYTES
    assert (tmp_path / "external" / "small.onnx").stat().st_size < 1000  # the graph alone
    np.testing.assert_array_equal(run(inline.path), run(external.path))


def test_the_stem_names_both_files_and_other_graphs_stay(tmp_path):
    write_graph(small_model(1), tmp_path, WritePolicy("small"))
    written = write_graph(small_model(2), tmp_path, WritePolicy("small.fp8", external_data=True))
    assert written.path == tmp_path / "small.fp8.onnx" and written.external_data == "small.fp8.onnx_data"
    assert everything(tmp_path) == ["small.fp8.onnx", "small.fp8.onnx_data", "small.onnx"]
    assert not np.array_equal(run(tmp_path / "small.onnx"), run(written.path))


def test_written_files_get_the_default_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        write_graph(small_model(), tmp_path / "out", WritePolicy("small", external_data=True))
    finally:
        os.umask(mask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "out").iterdir()}
    assert modes == {"small.onnx": 0o644, "small.onnx_data": 0o644}


def test_an_inline_rewrite_removes_the_earlier_data_file(tmp_path):
    write_graph(small_model(1), tmp_path, WritePolicy("small", external_data=True))
    write_graph(small_model(2), tmp_path, WritePolicy("small", external_data=False))
    assert everything(tmp_path) == ["small.onnx"]
    np.testing.assert_array_equal(run(tmp_path / "small.onnx"), run(_written(small_model(2), tmp_path / "ref")))


def _written(model, folder):
    return write_graph(model, folder, WritePolicy("small")).path


# --- a write that fails leaves the folder as it was ---------------------------------------------------------------


@pytest.fixture
def earlier(tmp_path):
    """A folder holding an earlier external-data export of the small graph, with its digests."""
    folder = tmp_path / "out"
    write_graph(small_model(1), folder, WritePolicy("small", external_data=True))
    return folder, {name: file_sha256(folder / name) for name in ("small.onnx", "small.onnx_data")}


def test_a_write_interrupted_halfway_through_the_weights_changes_nothing(earlier):
    folder, digests = earlier
    calls = []

    def interrupt(written, total):  # the progress callback hears the first tensor written, then the user presses ^C
        calls.append(written)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_graph(small_model(2), folder, WritePolicy("small", external_data=True), on_bytes=interrupt)
    assert calls and 0 < calls[0] < WEIGHT_BYTES
    assert everything(folder) == ["small.onnx", "small.onnx_data"]
    assert {name: file_sha256(folder / name) for name in digests} == digests


def test_a_graph_the_checker_refuses_is_never_swapped_in(earlier):
    folder, digests = earlier
    with pytest.raises(onnx.checker.ValidationError, match="NotAnOp"):
        write_graph(small_model(2, op="NotAnOp"), folder, WritePolicy("small", external_data=True))
    assert everything(folder) == ["small.onnx", "small.onnx_data"]
    assert {name: file_sha256(folder / name) for name in digests} == digests


def test_a_swap_that_fails_after_the_data_file_puts_the_old_one_back(earlier):
    folder, digests = earlier
    (folder / "small.onnx").unlink()
    (folder / "small.onnx").mkdir()  # a folder where the graph goes: renaming the new graph onto it fails
    (folder / "small.onnx" / "keep").write_text("x")
    with pytest.raises(OSError):
        write_graph(small_model(2), folder, WritePolicy("small", external_data=True))
    assert everything(folder) == ["small.onnx", "small.onnx/keep", "small.onnx_data"]
    assert file_sha256(folder / "small.onnx_data") == digests["small.onnx_data"]  # the new data file was undone


def test_a_full_disk_is_refused_before_anything_is_written(earlier, monkeypatch):
    folder, digests = earlier
    usage = shutil.disk_usage(folder)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=WEIGHT_BYTES))  # < needed + 5%
    with pytest.raises(FluxExportError) as error:
        write_graph(small_model(2), folder, WritePolicy("small", external_data=True))
    assert str(error.value) == (
        f"not enough disk space in {folder}: the graph needs 0.00 GB, 0.00 GB are free: free some space or export "
        "to another --out"
    )
    assert everything(folder) == ["small.onnx", "small.onnx_data"]
    assert {name: file_sha256(folder / name) for name in digests} == digests


def test_inline_weights_past_the_protobuf_limit_are_refused_before_the_folder_exists(tmp_path, monkeypatch):
    from fluxexport.export import onnx_export

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", WEIGHT_BYTES - 1)
    with pytest.raises(FluxExportError, match=r"^small: 0\.00 GB of weights cannot be inline in one ONNX protobuf"):
        write_graph(small_model(), tmp_path / "out", WritePolicy("small", external_data=False))
    assert not (tmp_path / "out").exists()


# --- the staging helper ------------------------------------------------------------------------------------------


def test_staged_files_moves_the_last_file_last_and_removes_stale_ones(tmp_path, monkeypatch):
    (tmp_path / "g.onnx_data").write_text("old data")
    (tmp_path / "other.onnx").write_text("another graph")
    moved = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(os.path.basename(b)), replace(a, b)))
    with staged_files(tmp_path, "g", last="g.onnx", stale=["g.onnx_data", "absent"]) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".staging-g-")
        for name in ("g.onnx", "a.bin", "z.bin"):
            (staging / name).write_text(name)
    assert moved[:3] == ["a.bin", "z.bin", "g.onnx"]  # then the stale data file is moved aside and dropped
    assert everything(tmp_path) == ["a.bin", "g.onnx", "other.onnx", "z.bin"]


def test_staged_files_leaves_nothing_when_the_block_fails(tmp_path):
    (tmp_path / "g.onnx").write_text("old")
    with pytest.raises(RuntimeError, match="half"), staged_files(tmp_path, "g", last="g.onnx") as staging:
        (staging / "g.onnx").write_text("new")
        raise RuntimeError("half")
    assert everything(tmp_path) == ["g.onnx"] and (tmp_path / "g.onnx").read_text() == "old"


@pytest.mark.parametrize("hard_links", [True, False])
def test_staged_files_undoes_its_moves_and_removals_when_one_fails(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # a file system without them (some network and FUSE mounts): old files are moved aside

        def no_links(*_):
            raise OSError(95, "Operation not supported")

        monkeypatch.setattr(os, "link", no_links)
    for name, text in (("a.bin", "old a"), ("g.data", "old data")):
        (tmp_path / name).write_text(text)
    (tmp_path / "g.onnx").mkdir()  # the last move fails: a folder is in the way
    with pytest.raises(OSError), staged_files(tmp_path, "g", last="g.onnx", stale=["g.data"]) as staging:
        for name in ("a.bin", "b.bin", "g.onnx"):
            (staging / name).write_text(f"new {name}")
    assert everything(tmp_path) == ["a.bin", "g.data", "g.onnx"]
    assert (tmp_path / "a.bin").read_text() == "old a" and (tmp_path / "g.data").read_text() == "old data"


# --- graph passes, each on a small graph -----------------------------------------------------------------------------


def test_drop_provenance_clears_what_torch_attaches_to_nodes():
    model = small_model()
    node = next(iter(model.graph))
    node.metadata_props["pkg.torch.onnx.stack_trace"] = "File x.py, line 1"
    node.doc_string = "fx node"
    node.outputs[0].metadata_props["pkg.torch.onnx.fx_node"] = "%h"
    assert passes.drop_provenance(model, small_spec(), "fp32") is None
    assert (dict(node.metadata_props), node.doc_string, dict(node.outputs[0].metadata_props)) == ({}, None, {})


def test_spec_axis_names_rename_io_and_inner_axes():
    model = small_model()
    passes.spec_axis_names(model, small_spec(), "fp32")
    assert str(model.graph.inputs[0].shape) == str(model.graph.outputs[0].shape) == "[B,64]"
    assert str(next(iter(model.graph)).outputs[0].shape) == "[B,64]"  # h: torch's s0 renamed too
    renamed = ComponentSpec("small", (TensorSpec("latent", "compute", ("B", WIDTH)),), small_spec().outputs, {}, {})
    with pytest.raises(FluxExportError) as error:
        passes.spec_axis_names(small_model(), renamed, "fp32")
    assert str(error.value) == "small: exported 'x' where the spec says 'latent'"


def test_spec_io_dtypes_refuse_another_element_type():
    passes.spec_io_dtypes(small_model(), small_spec(), "fp32")
    with pytest.raises(FluxExportError) as error:
        passes.spec_io_dtypes(small_model(), small_spec(), "bf16")
    assert str(error.value) == "small.x is FLOAT, the spec says BFLOAT16"
    with pytest.raises(FluxExportError, match=r"^small\.x is FLOAT, the spec says INT32$"):
        passes.spec_io_dtypes(small_model(), small_spec("int32"), "fp32")


def test_no_doubles_names_the_float64_tensors():
    passes.no_doubles(small_model(), small_spec(), "fp32")
    model = small_model()
    model.graph.initializers["W"].const_value = ir.tensor(np.zeros((WIDTH, WIDTH), np.float64), name="W")
    model.graph.initializers["W"].dtype = ir.DataType.DOUBLE
    with pytest.raises(FluxExportError) as error:
        passes.no_doubles(model, small_spec(), "fp32")
    assert str(error.value) == "small: the graph holds float64 tensors (W); TensorRT has no DOUBLE"


def _bf16_resize_model() -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="nearest")],
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 2, 8, 8])],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def test_bf16_resize_in_fp32_wraps_each_bf16_resize_in_casts():
    model = _bf16_resize_model()
    assert passes.bf16_resize_in_fp32(model, small_spec(), "fp32") is None  # only bf16 graphs
    assert [node.op_type for node in model.graph] == ["Resize"]
    assert passes.bf16_resize_in_fp32(model, small_spec(), "bf16") == "1 BF16 Resize nodes wrapped in fp32 casts"
    nodes = list(model.graph)
    assert [node.op_type for node in nodes] == ["Cast", "Resize", "Cast"]
    assert [node.attributes["to"].value for node in (nodes[0], nodes[2])] == [TensorProto.FLOAT, TensorProto.BFLOAT16]
    assert nodes[1].inputs[0].dtype == ir.DataType.FLOAT and nodes[1].outputs[0].dtype == ir.DataType.FLOAT
    assert model.graph.outputs[0] is nodes[2].outputs[0] and model.graph.outputs[0].name == "y"
    assert passes.bf16_resize_in_fp32(model, small_spec(), "bf16") is None  # nothing left to wrap
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_run_passes_in_the_declared_order_and_collect_their_notes():
    declared = (passes.drop_provenance, passes.spec_axis_names, passes.spec_io_dtypes, passes.no_doubles,
                passes.bf16_resize_in_fp32)  # fmt: skip
    assert declared == passes.EXPORT_PASSES
    seen = []

    def last(model, spec, compute):
        seen.append(str(model.graph.inputs[0].shape))  # runs after the spec's axis names are in
        return "last pass ran"

    model = small_model()
    assert passes.run_passes(model, small_spec(), "fp32", (*passes.EXPORT_PASSES, last)) == ("last pass ran",)
    assert seen == ["[B,64]"]


# --- the session's traced graphs through the write stage, and optimize's staging ----------------------------------


def test_the_session_graph_written_by_each_policy_runs_the_same(exports, sources, tmp_path):
    from fluxexport.specs import component_specs, sample_inputs

    traced = exports["tiny-dev"] / "clip.onnx"  # written by the session's export: inline
    model = ir.load(traced)
    size = weight_bytes_of(model)
    inline = write_graph(model, tmp_path / "a", WritePolicy("clip", threshold=size))
    external = write_graph(model, tmp_path / "b", WritePolicy("clip.copy", threshold=size - 1))
    assert (inline.external_data, external.external_data) == (None, "clip.copy.onnx_data")
    assert everything(tmp_path / "b") == ["clip.copy.onnx", "clip.copy.onnx_data"]
    feeds = {k: v.numpy() for k, v in sample_inputs(component_specs(sources["tiny-dev"])["clip"], {"B": 3}).items()}
    expected = onnxruntime.InferenceSession(str(traced)).run(None, feeds)
    for path in (inline.path, external.path):
        for got, want in zip(onnxruntime.InferenceSession(str(path)).run(None, feeds), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_optimize_stages_through_the_same_helper(sources, exports, tmp_path, monkeypatch):
    from fluxexport.onnxruntime import optimize

    folder = tmp_path / "tiny-dev"
    shutil.copytree(exports["tiny-dev"], folder)
    calls = []

    def spy(*args, **kwargs):
        calls.append((args[1:], kwargs))
        return staged_files(*args, **kwargs)

    monkeypatch.setattr(optimize, "staged_files", spy)
    mask = os.umask(0o022)
    try:
        optimize.optimize_graphs(sources["tiny-dev"], folder, components=["clip"])
    finally:
        os.umask(mask)
    assert calls == [(("clip",), {"last": "clip.onnx", "stale": []})]
    assert everything(folder / "ort") == ["clip.onnx"]
    assert stat.S_IMODE((folder / "ort" / "clip.onnx").stat().st_mode) == 0o644
    digests = {name: file_sha256(folder / name) for name in ("ort/clip.onnx", "manifest.json")}

    monkeypatch.setattr(optimize, "PARITY", -1.0)  # any difference now fails the parity check, after the write
    with pytest.raises(FluxExportError, match=r"^ONNX Runtime's optimizer changed clip's outputs \(rel-L2 "):
        optimize.optimize_graphs(sources["tiny-dev"], folder, components=["clip"])
    assert calls[1] == (("clip",), {"last": "clip.onnx", "stale": ["clip.onnx"]})
    assert everything(folder / "ort") == ["clip.onnx"]
    assert {name: file_sha256(folder / name) for name in digests} == digests


def test_the_float32_copy_of_a_bf16_graph_is_staged_the_same_way(tmp_path):
    """`write_upcast` (how ONNX Runtime runs bf16 graphs on CPU) goes through `staged_files` too: its graph file
    moves in last, and a copy that fails leaves nothing behind."""
    from fluxexport.onnxruntime.upcast import write_upcast

    rng = np.random.default_rng(0)
    weight = helper.make_tensor("W", TensorProto.BFLOAT16, [WIDTH, WIDTH], rng.standard_normal(WIDTH * WIDTH))
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16), helper.make_node("MatMul", ["xb", "W"], ["h"]),
         helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)],
        "bf16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", WIDTH])], [weight],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(tmp_path / "g.onnx"))
    (tmp_path / "blocked" / "g.onnx_data").mkdir(parents=True)  # a folder where the copy's weights go
    with pytest.raises(OSError):
        write_upcast(tmp_path / "g.onnx", tmp_path / "blocked")
    assert everything(tmp_path / "blocked") == ["g.onnx_data"]  # no graph, no staging folder
    copy = write_upcast(tmp_path / "g.onnx", tmp_path / "up")
    assert everything(tmp_path / "up") == ["g.onnx", "g.onnx_data"]
    assert run(copy).shape == (3, WIDTH)
