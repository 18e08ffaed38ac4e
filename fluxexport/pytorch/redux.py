"""The FLUX.1 Redux prior's components as eager PyTorch modules (the reference its exported graphs match)."""

from __future__ import annotations

import torch

from fluxexport.adapters import named_outputs
from fluxexport.adapters.redux import load_redux_adapter
from fluxexport.dtypes import torch_dtype
from fluxexport.models.redux import ReduxSource
from fluxexport.pytorch.backend import default_device
from fluxexport.runtime.backend import Component, Feeds, LoadedComponents, refuse_unknown_feeds
from fluxexport.specs.redux import redux_specs


class TorchReduxBackend(LoadedComponents):
    """`image_encoder` and `image_embedder` of a Redux folder on CPU or CUDA; float32 tensors in and out."""

    name = "torch"

    def __init__(self, redux: ReduxSource, dtype: str = "fp32", device: str | None = None):
        super().__init__()
        self.redux = redux
        self.dtype = torch_dtype(dtype)
        self.device = torch.device(device or default_device())
        self.specs = redux_specs(redux)

    def _load(self, name: str) -> Component:
        adapter = load_redux_adapter(self.redux, name, self.dtype).to(self.device)
        spec = self.specs[name]

        @torch.inference_mode()
        def run(feeds: Feeds) -> Feeds:
            refuse_unknown_feeds(name, feeds, [tensor.name for tensor in spec.inputs])
            args = [feeds[tensor.name].to(self.device, self.dtype) for tensor in spec.inputs]
            return {key: value.to(torch.float32) for key, value in named_outputs(spec, adapter(*args)).items()}

        return run
