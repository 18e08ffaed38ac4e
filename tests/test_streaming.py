"""Streaming export: the graph traced on fake weights, weights read tensor by tensor from the checkpoint, is the
in-memory export's graph: same nodes, same names, bit-identical initializers, for every source format."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import assert_same_graph, truncated_clip_checkpoint
from safetensors.torch import load_file, save_file

from fluxexport.errors import FluxExportError
from fluxexport.export.onnx_export import export_component
from fluxexport.models.checkpoint import CheckpointTensors
from fluxexport.models.source import load_folder, resolve_model
from fluxexport.models.tiny import write_bfl_single_file
from fluxexport.specs import COMPONENTS, component_specs


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPONENTS)
def test_streamed_graphs_equal_in_memory_exports(name, sources, exports, tmp_path):
    variant = "tiny-kontext" if name == "vae_encoder" else "tiny-dev"
    source = sources[variant]
    streamed = exports[variant] / f"{name}.onnx"  # the session's exports stream, as `fluxexport export` does
    reference = export_component(source, component_specs(source)[name], tmp_path, "fp32", streaming=False)
    # the VAE encoder's trace numbers its internal values one apart (an intermediate node the optimizer drops
    # is traced with fake weights only); nodes, order and weights are the same
    assert_same_graph(streamed, reference.path, same_names=name != "vae_encoder")


@pytest.mark.slow
def test_streamed_bf16_with_external_data_equals_in_memory(sources, tmp_path):
    written = []
    spec = component_specs(sources["tiny-dev"])["transformer"]
    streamed = export_component(sources["tiny-dev"], spec, tmp_path / "streamed", "bf16", external_data=True,
                                on_bytes=lambda done, total: written.append((done, total)))  # fmt: skip
    reference = export_component(sources["tiny-dev"], spec, tmp_path / "memory", "bf16", external_data=True,
                                 streaming=False)  # fmt: skip
    assert streamed.external_data == "transformer.onnx_data"
    assert_same_graph(streamed.path, reference.path)
    assert written[-1] == (streamed.weight_bytes, streamed.weight_bytes)
    assert [done for done, _ in written] == sorted(done for done, _ in written)  # the bar only moves forward
    # all but the tiniest tensors (ir.save keeps those inline) went to the data file
    assert (tmp_path / "streamed" / "transformer.onnx_data").stat().st_size > 0.9 * streamed.weight_bytes


def shard(folder, subfolder, count):
    """Rewrite a part's single safetensors file as `count` shards with an index json, as the hub publishes."""
    part = folder / subfolder
    (single,) = part.glob("*.safetensors")
    state = load_file(str(single))
    stem = single.name.removesuffix(".safetensors")
    keys = sorted(state)
    weight_map = {}
    for index in range(count):
        name = f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"
        chunk = {key: state[key] for key in keys[index::count]}
        save_file(chunk, str(part / name))
        weight_map |= dict.fromkeys(chunk, name)
    single.unlink()
    (part / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.slow
def test_sharded_folders_and_bfl_single_files_stream(sources, exports, tmp_path):
    """A sharded folder and a BFL single file stream into the graph the plain folder gives (the session's export,
    itself equal to the in-memory export: test_streamed_graphs_equal_in_memory_exports)."""
    folder = tmp_path / "sharded"
    shutil.copytree(sources["tiny-dev"].root, folder)
    shard(folder, "transformer", 3)
    shard(folder, "text_encoder_2", 2)
    sharded = load_folder(folder)
    for name in ("transformer", "t5"):
        streamed = export_component(sharded, component_specs(sharded)[name], tmp_path / "sharded-onnx", "fp32")
        assert_same_graph(streamed.path, exports["tiny-dev"] / f"{name}.onnx")

    single = write_bfl_single_file(sources["tiny-dev"].root, tmp_path / "flux1-tiny.safetensors")
    bfl = resolve_model(str(single), base="tiny-dev")
    streamed = export_component(bfl, component_specs(bfl)["transformer"], tmp_path / "bfl", "fp32")
    assert_same_graph(streamed.path, exports["tiny-dev"] / "transformer.onnx")


def test_bfl_fused_tensors_are_read_row_by_row(sources, tmp_path):
    """The split tensors are the rows of the fused ones, read by slice, equal to the folder's."""
    single = write_bfl_single_file(sources["tiny-dev"].root, tmp_path / "flux1-tiny.safetensors")
    bfl = CheckpointTensors(resolve_model(str(single), base="tiny-dev"), "transformer")
    folder = CheckpointTensors(sources["tiny-dev"], "transformer")
    assert set(bfl.locations) == set(folder.locations)
    for name in ("transformer_blocks.0.attn.to_k.weight", "single_transformer_blocks.0.proj_mlp.bias",
                 "norm_out.linear.weight"):  # fmt: skip
        assert torch.equal(bfl.load(name), folder.load(name))
    assert bfl.locations["transformer_blocks.0.attn.to_k.weight"].rows is not None
    assert bfl.load("x_embedder.weight", torch.bfloat16).dtype == torch.bfloat16


def test_a_checkpoint_missing_a_tensor_is_refused_before_writing(sources, tmp_path):
    source, dropped = truncated_clip_checkpoint(sources["tiny-schnell"], tmp_path / "truncated")
    with pytest.raises(FluxExportError) as error:
        export_component(source, component_specs(source)["clip"], tmp_path / "out", "fp32")
    assert str(error.value) == (
        f"the clip checkpoint has no tensor {dropped!r}: it does not fit its config (truncated download, or "
        "another model's weights)"
    )
    assert not (tmp_path / "out" / "clip.onnx").exists()


@pytest.mark.slow
def test_not_enough_disk_space_is_refused_naming_both_sizes(sources, tmp_path, monkeypatch):
    import fluxexport.export.onnx_export as onnx_export

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(onnx_export.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    spec = component_specs(sources["tiny-dev"])["clip"]
    with pytest.raises(
        FluxExportError, match=r"^not enough disk space in .*: the graph needs 0\.\d+ GB, 0\.00 GB are free"
    ):
        export_component(sources["tiny-dev"], spec, tmp_path / "out", "fp32")
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_streamed_graph_runs_in_onnx_runtime_like_pytorch(sources, tmp_path):
    """Beyond equality with the in-memory graph: the streamed graph itself matches the PyTorch reference."""
    from fluxexport.onnxruntime.backend import create_session
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.specs import sample_inputs

    source = sources["tiny-dev"]
    spec = component_specs(source)["t5"]
    exported = export_component(source, spec, tmp_path, "fp32")
    session = create_session(exported.path)
    reference = TorchBackend(source, device="cpu").component("t5")
    for sizes in ({"B": 1, "L": 7}, {"B": 3, "L": 40}):
        feeds = sample_inputs(spec, sizes, seed=1)
        (ours,) = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        theirs = reference(feeds)["text_embeddings"]
        assert np.linalg.norm(ours - theirs.numpy()) / np.linalg.norm(theirs.numpy()) < 1e-5
