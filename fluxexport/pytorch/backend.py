"""PyTorch reference backend: the checkpoint's modules behind the same adapters the exporter traces."""

from __future__ import annotations

import torch

from fluxexport.adapters import adapter_for, named_outputs
from fluxexport.dtypes import ELEMENT_TORCH, element_type, torch_dtype
from fluxexport.errors import FluxExportError
from fluxexport.models.loaders import MODULE_OF, load_module
from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Component, Feeds, LoadedComponents, refuse_unknown_feeds
from fluxexport.specs import KNOWN_COMPONENTS, component_specs


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchBackend(LoadedComponents):
    """Components as eager PyTorch modules on CPU or CUDA, in fp32, bf16 or fp16.

    RoPE stays diffusers' own (float64 on CPU), so that images match diffusers bit for bit. With
    `stream_blocks`, the transformer's, T5's and CLIP's blocks and FLUX.2's text encoder's decoder layers are
    read from the checkpoint one at a time as they run, and what the adapters never run (the LM head, a VLM's
    vision tower, layers past the deepest read) is never read (`pytorch/block_streaming.py`): slow, but the model
    never has to fit in memory."""

    name = "torch"

    def __init__(
        self, source: ModelSource, dtype: str = "fp32", device: str | None = None, stream_blocks: bool = False
    ):
        super().__init__()
        self.source = source
        self.stream_blocks = stream_blocks
        self.precision, self.dtype = dtype, torch_dtype(dtype)
        self.device = torch.device(device or default_device())
        self.specs = component_specs(source)
        self._modules: dict[str, torch.nn.Module] = {}

    def module(self, name: str) -> torch.nn.Module:
        """The loaded nn.Module behind a component ("vae" serves both VAE components), in eval mode."""
        if name in self._modules:
            return self._modules[name]
        if self.stream_blocks:
            from fluxexport.pytorch.block_streaming import streamed_module

            self._modules[name] = streamed_module(self.source, name, self.dtype, self.device)
        else:
            self._modules[name] = load_module(self.source, name, self.dtype).to(self.device)
        return self._modules[name]

    def close(self) -> None:
        super().close()
        self._modules.clear()

    def release(self, *components: str) -> None:
        """Drop `components` and their modules (the text encoders once prompts are encoded); they load
        again if asked for."""
        for name in components:
            self._components.pop(name, None)
            self._modules.pop(MODULE_OF[name], None)

    def _input(self, tensor: torch.Tensor, spec_dtype: str) -> torch.Tensor:
        """A feed in the dtype the adapter takes: the compute dtype, float32, or int32 ids."""
        return tensor.to(self.device, ELEMENT_TORCH[element_type(spec_dtype, self.precision)])

    def _load(self, name: str) -> Component:
        if name not in KNOWN_COMPONENTS:
            raise FluxExportError(f"unknown component {name!r}: choose one of {', '.join(KNOWN_COMPONENTS)}")
        spec = self.specs[name]
        adapter = adapter_for(self.source, name, self.module(MODULE_OF[name]), float32_rope=False)

        @torch.inference_mode()
        def run(feeds: Feeds) -> Feeds:
            refuse_unknown_feeds(name, feeds, [tensor.name for tensor in spec.inputs])
            args = [self._input(feeds[tensor.name], tensor.dtype) for tensor in spec.inputs if tensor.name in feeds]
            # outputs stay on the backend's device, as float32 (the runtime's state dtype)
            return {key: value.detach().to(torch.float32) for key, value in named_outputs(spec, adapter(*args)).items()}

        return run
