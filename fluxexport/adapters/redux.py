"""FLUX.1 Redux's adapters (`specs/redux.py`): SigLIP's last hidden state, and the Redux embedder's projection."""

from __future__ import annotations

import torch
from torch import nn

from fluxexport.errors import FluxExportError
from fluxexport.models.redux import REDUX_COMPONENTS, ReduxSource


class ImageEncoderAdapter(nn.Module):
    """SiglipVisionModel → its last hidden state (what FluxPriorReduxPipeline.encode_image keeps)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state


class ImageEmbedderAdapter(nn.Module):
    """ReduxImageEncoder → its image_embeds."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model(image_hidden_states).image_embeds


def load_redux_adapter(
    redux: ReduxSource, name: str, dtype: torch.dtype = torch.float32, for_export: bool = False
) -> nn.Module:
    """Component `name` of the Redux folder, loaded by its library class behind its adapter, in eval mode: with
    the attention diffusers loads it with (sdpa), or for export eager attention (what dynamo traces as it runs)."""
    if name not in REDUX_COMPONENTS:
        raise FluxExportError(f"unknown Redux component {name!r}: choose one of {', '.join(REDUX_COMPONENTS)}")
    library_class = redux.module_class(name)
    folder = redux.root / name
    if name == "image_encoder":
        attention = {"attn_implementation": "eager"} if for_export else {}
        model = library_class.from_pretrained(folder, torch_dtype=dtype, **attention)
        return ImageEncoderAdapter(model).eval()
    return ImageEmbedderAdapter(library_class.from_pretrained(folder, torch_dtype=dtype)).eval()
