"""The Backend protocol: the same names in and out on every backend, refusals of unknown feeds, close()."""

import pytest
import torch

from fluxexport.errors import FluxExportError
from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
from fluxexport.pytorch.backend import TorchBackend
from fluxexport.specs import COMPONENTS, component_specs, sample_inputs


def test_both_backends_name_outputs_from_the_spec(sources, exports):
    source = sources["tiny-dev"]
    specs = component_specs(source)
    with TorchBackend(source, device="cpu") as reference, OnnxRuntimeBackend(source, exports["tiny-dev"]) as graphs:
        for name, spec in ((name, specs[name]) for name in COMPONENTS):  # the exported five
            feeds = sample_inputs(spec, spec.export_sizes)
            expected = {tensor.name: spec.shape(tensor, spec.export_sizes) for tensor in spec.outputs}
            for backend in (reference, graphs):
                outputs = backend.component(name)(feeds)
                assert {key: tuple(value.shape) for key, value in outputs.items()} == expected
                assert all(value.dtype == torch.float32 for value in outputs.values())


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_a_feed_the_component_does_not_take_is_refused(kind, sources, exports):
    source = sources["tiny-schnell"]  # no guidance input
    backend = (
        TorchBackend(source, device="cpu") if kind == "torch" else OnnxRuntimeBackend(source, exports["tiny-schnell"])
    )
    spec = component_specs(source)["transformer"]
    feeds = sample_inputs(spec, spec.export_sizes) | {"guidance": torch.ones(2)}
    with pytest.raises(FluxExportError) as error:
        backend.component("transformer")(feeds)
    assert str(error.value) == (
        "transformer has no input 'guidance': it takes hidden_states, encoder_hidden_states, pooled_projections, "
        "timestep, img_ids, txt_ids"
    )


def test_close_releases_what_was_loaded(sources, exports):
    source = sources["tiny-schnell"]
    with OnnxRuntimeBackend(source, exports["tiny-schnell"]) as graphs:
        first = graphs.component("clip")
        assert graphs.component("clip") is first  # loaded once
    assert graphs._components == {}
    assert graphs.component("clip") is not first  # loaded again after close

    backend = TorchBackend(source, device="cpu")
    backend.component("vae_decoder")
    backend.component("vae_encoder")
    assert list(backend._modules) == ["vae"]  # both VAE components share one module
    backend.close()
    assert backend._modules == {} and backend._components == {}
