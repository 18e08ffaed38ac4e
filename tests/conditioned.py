"""What tests/test_fill.py and tests/test_control.py share (they had it twice: duplicates D3, D7): a FLUX.1 variant
that takes an image condition (Fill's image and mask, Canny/Depth's control image) as four module fixtures declared
by one call, `variant_fixtures`, and a request's one-line refusal as `run` words it."""

from __future__ import annotations

import pytest

from fluxexport.cli import command_line_terms
from fluxexport.errors import RequestError
from fluxexport.runtime.pipeline import GenerationRequest, resolve_request


def variant_fixtures(variant: str, pipeline_class: str, prefix: str, pipeline_name: str) -> tuple:
    """Module fixtures for `variant` (a tiny model): `{prefix}` its checkpoint, `{pipeline_name}` diffusers'
    `pipeline_class` loaded from it (the oracle), `{prefix}_torch` our PyTorch backend on CPU, and `{prefix}_export`
    its components in fp32 ONNX, made once per session (`helpers.once_per_session`). Assign the four to module
    names in that order: pytest finds fixtures among a module's names."""

    @pytest.fixture(scope="module", name=prefix)
    def source(cache_root):
        from fluxexport.models.source import resolve_model

        return resolve_model(variant)

    @pytest.fixture(scope="module", name=pipeline_name)
    def pipeline(request):
        import diffusers

        loaded = getattr(diffusers, pipeline_class).from_pretrained(request.getfixturevalue(prefix).root)
        loaded.set_progress_bar_config(disable=True)
        return loaded

    @pytest.fixture(scope="module", name=f"{prefix}_torch")
    def torch_backend(request):
        from fluxexport.pytorch.backend import TorchBackend

        return TorchBackend(request.getfixturevalue(prefix), device="cpu")

    @pytest.fixture(scope="module", name=f"{prefix}_export")
    def export(request, tmp_path_factory):
        """The variant's five components in fp32 ONNX (its file's one export)."""
        from helpers import once_per_session

        from fluxexport.export.onnx_export import export_model

        source = request.getfixturevalue(prefix)
        return once_per_session(tmp_path_factory, f"onnx-{variant}", lambda folder: export_model(source, folder))

    return source, pipeline, torch_backend, export


def refusal_of(source, prompt: str, **kwargs) -> str:
    """The one line `run` answers a request of `prompt` and `kwargs` (GenerationRequest's fields) with."""
    with pytest.raises(RequestError) as error:
        resolve_request(source, GenerationRequest(prompt, **kwargs))
    return error.value.render(command_line_terms("run"))
