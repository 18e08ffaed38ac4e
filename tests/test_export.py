"""Exported graphs: contract, no DOUBLE, TensorRT lint, manifest, external data, atomic writes, dtype policy."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import manifest_json

from fluxexport.artifacts.files import file_sha256
from fluxexport.dtypes import component_precision
from fluxexport.errors import FluxExportError
from fluxexport.export.check import check_folder
from fluxexport.export.onnx_export import export_component, export_model
from fluxexport.specs import COMPONENTS, component_specs, sample_inputs

ELEM = {"compute": onnx.TensorProto.FLOAT, "float32": onnx.TensorProto.FLOAT, "int32": onnx.TensorProto.INT32}


def graph_dims(value):
    return tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)


@pytest.mark.parametrize("variant", ["tiny-schnell", "tiny-dev", "tiny-kontext"])
def test_graphs_carry_the_spec_contract(variant, sources, exports):
    specs = component_specs(sources[variant])
    for name, spec in ((name, specs[name]) for name in COMPONENTS):  # the exported five
        model = onnx.load(str(exports[variant] / f"{name}.onnx"), load_external_data=False)
        for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
            assert [v.name for v in values] == [t.name for t in tensors], name
            for value, tensor in zip(values, tensors, strict=True):
                assert value.type.tensor_type.elem_type == ELEM[tensor.dtype], (name, tensor.name)
                assert graph_dims(value) == tensor.dims, (name, tensor.name)


def _double_tensors(path):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    found = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.DOUBLE]
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if value.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE:
            found.append(value.name)
    for node in model.graph.node:
        found += [node.name for a in node.attribute if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == 11]
        found += [node.name for a in node.attribute if node.op_type == "Cast" and a.name == "to" and a.i == 11]
    return found


def test_no_graph_holds_a_double(exports, bf16_export):
    for folder in [*exports.values(), bf16_export]:
        for path in sorted(folder.glob("*.onnx")):
            assert _double_tensors(path) == [], path


def test_every_export_passes_the_tensorrt_check(exports, bf16_export):
    for folder in [*exports.values(), bf16_export]:
        reports = check_folder(folder)
        assert [r.path.name for r in reports] == sorted(f"{name}.onnx" for name in COMPONENTS)
        assert all(r.ok for r in reports), [(r.path.name, r.problems) for r in reports if not r.ok]
        assert all(r.opset == 20 for r in reports)


def test_bf16_graphs(bf16_export):
    manifest = manifest_json(bf16_export)
    assert manifest["dtype"] == "bf16"
    assert {c["dtype"] for c in manifest["components"].values()} == {"bf16"}
    decoder = onnx.shape_inference.infer_shapes(onnx.load(str(bf16_export / "vae_decoder.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in [*decoder.graph.value_info, *decoder.graph.input]}
    resizes = [node for node in decoder.graph.node if node.op_type == "Resize"]
    assert resizes and all(types[node.input[0]] == onnx.TensorProto.FLOAT for node in resizes)
    assert "3 BF16 Resize nodes wrapped in fp32 casts" in manifest["components"]["vae_decoder"]["notes"]
    transformer = onnx.load(str(bf16_export / "transformer.onnx"))
    inputs = {v.name: v.type.tensor_type.elem_type for v in transformer.graph.input}
    assert inputs["hidden_states"] == onnx.TensorProto.BFLOAT16
    assert inputs["img_ids"] == inputs["guidance"] == onnx.TensorProto.FLOAT


def test_manifest_describes_the_files(sources, exports):
    folder = exports["tiny-kontext"]
    manifest = manifest_json(folder)
    assert manifest["model"] == {
        "name": "tiny-kontext",
        "pipeline_class": "FluxKontextPipeline",
        "fingerprint": sources["tiny-kontext"].fingerprint(),
        "guidance_embeds": True,
        "loras": [],  # none merged
    }
    assert set(manifest["components"]) == set(COMPONENTS)
    # where each streamed initializer's values come from (what a LoRA swap replaces): checkpoint tensors,
    # the Linear weights transposed as the graph holds them
    from fluxexport.models.checkpoint import CheckpointTensors

    weights = manifest["components"]["transformer"]["weights"]
    tensors = CheckpointTensors(sources["tiny-kontext"], "transformer")
    assert weights and all(origin["tensor"] in tensors for origin in weights.values())
    queries = [origin["perm"] for origin in weights.values() if origin["tensor"].endswith("attn.to_q.weight")]
    assert queries and all(perm == [1, 0] for perm in queries)
    assert {"torch", "diffusers", "transformers", "onnx", "onnxscript"} <= set(manifest["versions"])
    transformer = manifest["components"]["transformer"]
    assert transformer["opset"] == 20 and transformer["dtype"] == "fp32" and transformer["external_data"] is None
    assert transformer["sha256"] == {"transformer.onnx": file_sha256(folder / "transformer.onnx")}
    assert transformer["axes"]["N"]["max"] >= 4116 and transformer["inputs"][0]["dims"] == ["B", "N", 64]
    assert manifest["bounds"]["max_batch"] == 4


def test_external_data_loads_and_matches_inline(sources, exports, tmp_path):
    spec = component_specs(sources["tiny-dev"])["clip"]
    exported = export_component(sources["tiny-dev"], spec, tmp_path, external_data=True)
    assert exported.external_data == "clip.onnx_data"
    graph = onnx.load(str(tmp_path / "clip.onnx"), load_external_data=False)
    large = [t for t in graph.graph.initializer if np.prod(t.dims) * 4 > 1024]
    assert large and all(t.data_location == onnx.TensorProto.EXTERNAL for t in large)
    assert (tmp_path / "clip.onnx").stat().st_size * 4 < (tmp_path / "clip.onnx_data").stat().st_size
    feeds = {k: v.numpy() for k, v in sample_inputs(spec, {"B": 3}).items()}
    external = onnxruntime.InferenceSession(str(tmp_path / "clip.onnx")).run(None, feeds)
    inline = onnxruntime.InferenceSession(str(exports["tiny-dev"] / "clip.onnx")).run(None, feeds)
    for a, b in zip(external, inline, strict=True):
        np.testing.assert_array_equal(a, b)
    assert check_folder(tmp_path)[0].ok


@pytest.mark.slow
def test_weights_go_beside_the_graph_past_the_threshold(sources, tmp_path, monkeypatch):
    from fluxexport.export import onnx_export

    spec = component_specs(sources["tiny-dev"])["clip"]  # ~180 kB of weights: inline at the real threshold
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 64 * 2**10)
    exported = export_component(sources["tiny-dev"], spec, tmp_path / "default")  # no external_data: the default
    assert exported.weight_bytes > 64 * 2**10 and exported.external_data == "clip.onnx_data"
    assert (tmp_path / "default" / "clip.onnx_data").stat().st_size > 0.9 * exported.weight_bytes
    assert check_folder(tmp_path / "default")[0].ok
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 64 * 2**10)  # forced inline past protobuf's limit
    with pytest.raises(FluxExportError, match=r"^clip: 0\.00 GB of weights cannot be inline in one ONNX protobuf"):
        export_component(sources["tiny-dev"], spec, tmp_path / "inline", external_data=False)
    assert not (tmp_path / "inline").exists()


def test_interrupted_export_leaves_the_previous_graph(sources, exports, tmp_path, monkeypatch):
    import onnx_ir

    spec = component_specs(sources["tiny-dev"])["clip"]
    export_component(sources["tiny-dev"], spec, tmp_path)
    before = file_sha256(tmp_path / "clip.onnx")

    def crash(model, path, **kwargs):
        path.write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_ir, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        export_component(sources["tiny-dev"], spec, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.onnx"]
    assert file_sha256(tmp_path / "clip.onnx") == before


def test_dtype_policy():
    assert component_precision("transformer", "fp16") == ("fp16", None)
    assert component_precision("vae_decoder", "fp16")[0] == "fp32"
    assert "never exported in fp16" in component_precision("vae_encoder", "fp16")[1]
    assert component_precision("t5", "fp16") == ("bf16", "T5 overflows in fp16 (inf, then zeros); kept bf16")
    assert component_precision("vae_decoder", "bf16") == ("bf16", None)


@pytest.mark.slow
def test_fp16_transformer_runs_in_onnxruntime(sources, tmp_path):
    source = sources["tiny-schnell"]
    spec = component_specs(source)["transformer"]
    export_model(source, tmp_path, ["transformer"], dtype="fp16")
    assert manifest_json(tmp_path)["components"]["transformer"]["dtype"] == "fp16"
    feeds = sample_inputs(spec, {"B": 3, "N": 40, "L": 9})
    session = onnxruntime.InferenceSession(str(tmp_path / "transformer.onnx"))
    arrays = {
        k: v.numpy().astype(np.float16 if spec.input(k).dtype == "compute" else np.float32) for k, v in feeds.items()
    }
    got = torch.from_numpy(session.run(None, arrays)[0].astype(np.float32))
    from fluxexport.pytorch.backend import TorchBackend

    expected = TorchBackend(source, device="cpu").component("transformer")(feeds)["latent"]
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"components": ["unet"]},
            "unknown component 'unet': choose from clip, t5, transformer, vae_decoder, vae_encoder",
        ),
        ({"opset": 17}, "opset 17 is outside 18..23 (--opset)"),
        ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ],
)
def test_bad_export_arguments(sources, tmp_path, kwargs, message):
    with pytest.raises(FluxExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_model(sources["tiny-dev"], tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_export_prints_progress_table_and_check(tmp_path, sources):
    from click.testing import CliRunner

    from fluxexport.cli import main

    result = CliRunner().invoke(
        main, ["export", "--model", "tiny-dev", "--components", "clip,t5", "--dtype", "fp16", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "note: t5: T5 overflows in fp16 (inf, then zeros); kept bf16" in result.output
    assert "TensorRT 10.1 compatibility" in result.output
    assert json.loads((tmp_path / "manifest.json").read_text())["components"]["t5"]["dtype"] == "bf16"
