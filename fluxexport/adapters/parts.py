"""What the transformer's parts of both families share: the output layers, the same modules in FLUX.1 and FLUX.2."""

from __future__ import annotations

from torch import nn


class TransformerOutAdapter(nn.Module):
    """The output layers: the adaptive norm on `temb`, the projection to the packed latent."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image_hidden, temb):
        return self.model.proj_out(self.model.norm_out(image_hidden, temb))
