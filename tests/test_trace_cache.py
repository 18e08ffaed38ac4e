"""`FLUXEXPORT_TRACE_CACHE`: a trace is reused only where it is the same trace, and what is written is the same.

The suite itself runs with the cache on (conftest's `trace_cache`), so that each tiny graph is traced once per
session; these tests point it at a folder of their own.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import truncated_clip_checkpoint
from safetensors.torch import load_file, save_file

from fluxexport.errors import FluxExportError
from fluxexport.export import trace_cache
from fluxexport.export.onnx_export import export_component
from fluxexport.export.trace import DEFAULT_OPSET, TraceOptions
from fluxexport.models.source import load_folder
from fluxexport.specs import component_specs, sample_inputs


@pytest.fixture
def traces(tmp_path, monkeypatch):
    """A cache folder of this test's own, and the list of the dynamo traces that really ran."""
    folder = tmp_path / "trace-cache"
    monkeypatch.setenv(trace_cache.ENVIRONMENT_VARIABLE, str(folder))
    ran: list[str] = []
    real = torch.onnx.export

    def counted(module, *args, **kwargs):
        ran.append(type(module).__name__)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counted)
    return folder, ran


def _bytes(exported) -> bytes:
    return exported.path.read_bytes()


@pytest.mark.slow  # it exports (tests/conftest.py: the quick loop runs no export)
@pytest.mark.parametrize("name", ["clip", "t5"])
def test_a_cached_trace_writes_the_same_bytes_as_a_fresh_one(sources, tmp_path, monkeypatch, traces, name):
    folder, ran = traces
    source = sources["tiny-dev"]
    spec = component_specs(source)[name]
    monkeypatch.delenv(trace_cache.ENVIRONMENT_VARIABLE)
    fresh = export_component(source, spec, tmp_path / "fresh", "fp32")  # no cache
    monkeypatch.setenv(trace_cache.ENVIRONMENT_VARIABLE, str(folder))
    first = export_component(source, spec, tmp_path / "first", "fp32")  # traced, kept
    second = export_component(source, spec, tmp_path / "second", "fp32")  # read from the cache
    assert len(ran) == 2  # the fresh export and the first cached one; the second did not trace
    assert _bytes(first) == _bytes(fresh) and _bytes(second) == _bytes(fresh)
    assert second.weights == fresh.weights and second.nodes == fresh.nodes
    assert len(list(folder.glob("*.onnx"))) == 1


def _finetuned(source, folder):
    """A copy of `source` whose CLIP weights differ (a fine-tune of the same architecture)."""
    shutil.copytree(source.root, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    save_file({name: tensor * 1.5 if tensor.is_floating_point() else tensor
               for name, tensor in load_file(str(weights)).items()}, str(weights))  # fmt: skip
    return load_folder(folder)


@pytest.mark.slow  # it exports (tests/conftest.py: the quick loop runs no export)
def test_one_architecture_is_traced_once_whatever_the_checkpoint(sources, tmp_path, monkeypatch, traces):
    """A fine-tune of tiny-dev's CLIP, in another folder: one trace for both, each graph with its own
    checkpoint's weights, the same bytes as a fresh export of each."""
    folder, ran = traces
    dev, tuned = sources["tiny-dev"], _finetuned(sources["tiny-dev"], tmp_path / "tuned")
    spec = component_specs(dev)["clip"]
    ours = export_component(dev, spec, tmp_path / "dev")
    theirs = export_component(tuned, component_specs(tuned)["clip"], tmp_path / "tuned-onnx")
    assert len(ran) == 1
    assert _bytes(ours) != _bytes(theirs)  # the weights differ
    monkeypatch.delenv(trace_cache.ENVIRONMENT_VARIABLE)
    assert _bytes(theirs) == _bytes(export_component(tuned, component_specs(tuned)["clip"], tmp_path / "fresh"))


def _clip_key(source, dtype=torch.float32, opset=DEFAULT_OPSET, sizes=None):
    from fluxexport.adapters import adapter_for
    from fluxexport.export.streaming import empty_module

    spec = component_specs(source)["clip"]
    adapter = adapter_for(source, "clip", empty_module(source, "clip", dtype))
    feeds = sample_inputs(spec, sizes or spec.export_sizes, dtype)
    options = TraceOptions(opset)
    return trace_cache.trace_key(adapter, feeds, spec, options.opset, options.translations, options.native_ops, False)


def test_the_key_follows_what_the_trace_depends_on(sources, tmp_path):
    source = sources["tiny-dev"]
    key = _clip_key(source)
    assert key == _clip_key(source)
    assert key == _clip_key(sources["tiny-schnell"])  # same config, other weights and folder
    assert key != _clip_key(source, torch.bfloat16)
    assert key != _clip_key(source, opset=18)
    assert key != _clip_key(source, sizes={"B": 3})
    changed = tmp_path / "changed"
    shutil.copytree(source.root, changed)
    config = changed / "text_encoder" / "config.json"
    config.write_text(config.read_text().replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": 1e-06'))
    assert '"layer_norm_eps": 1e-06' in config.read_text()
    assert _clip_key(load_folder(changed)) != key  # a setting that is no shape changes the key


def test_real_tensors_are_keyed_by_value_and_too_many_are_not_cached(monkeypatch):
    module = torch.nn.Linear(4, 4)
    feeds = {"x": torch.zeros(1, 4)}
    key = trace_cache.trace_key(module, feeds, "settings")
    with torch.no_grad():
        module.weight[0, 0] += 1
    assert trace_cache.trace_key(module, feeds, "settings") != key
    monkeypatch.setattr(trace_cache, "MAX_REAL_BYTES", 64)
    assert trace_cache.trace_key(module, feeds, "settings") is None


@pytest.mark.slow  # it exports (tests/conftest.py: the quick loop runs no export)
def test_a_missing_tensor_is_refused_from_a_cached_trace_too(sources, tmp_path, traces):
    folder, ran = traces
    source = sources["tiny-schnell"]
    export_component(source, component_specs(source)["clip"], tmp_path / "whole", "fp32")
    broken, dropped = truncated_clip_checkpoint(source, tmp_path / "truncated")
    with pytest.raises(FluxExportError) as error:
        export_component(broken, component_specs(broken)["clip"], tmp_path / "out", "fp32")
    assert len(ran) == 1  # the broken checkpoint's export read the cached trace
    assert str(error.value) == (
        f"the clip checkpoint has no tensor {dropped!r}: it does not fit its config (truncated download, or "
        "another model's weights)"
    )
    assert not (tmp_path / "out" / "clip.onnx").exists()


def test_without_the_variable_nothing_is_kept_and_a_failed_trace_is_never_kept(sources, tmp_path, monkeypatch):
    monkeypatch.delenv(trace_cache.ENVIRONMENT_VARIABLE, raising=False)
    assert trace_cache.cache_folder() is None
    folder = tmp_path / "cache"
    monkeypatch.setenv(trace_cache.ENVIRONMENT_VARIABLE, str(folder))

    def fails():
        raise RuntimeError("the exporter failed")

    with pytest.raises(RuntimeError, match="the exporter failed"):
        trace_cache.cached_trace("0" * 64, fails)
    assert not list(folder.glob("*.onnx")) and not list(folder.glob("*.json"))


def test_a_cache_folder_that_cannot_be_written_is_refused_naming_the_variable(sources, tmp_path, monkeypatch):
    taken = tmp_path / "a-file"
    taken.write_text("")
    monkeypatch.setenv(trace_cache.ENVIRONMENT_VARIABLE, str(taken))
    with pytest.raises(FluxExportError) as error:
        trace_cache.cached_trace("0" * 64, lambda: pytest.fail("traced before the folder was checked"))
    assert str(error.value) == (
        f"FLUXEXPORT_TRACE_CACHE={taken} is not a folder fluxexport can write (File exists): point it at one, "
        "or unset it"
    )
