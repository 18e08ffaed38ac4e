"""One adapter per component: an nn.Module whose forward takes and returns exactly the spec's tensors, in the
spec's order. The exporter traces them; the PyTorch backend runs them (outputs named by `spec.outputs`).

Each family's adapters are in its folder (`families/flux1/adapters.py`, `families/flux2/adapters.py`);
`wrap_component(…, family=…)` asks that family's `wrap`. The one switch: `float32_rope`. For export, RoPE
frequencies are computed in float32 (diffusers uses float64 on CPU, which would put DOUBLE tensors in the graph;
TensorRT has none); the PyTorch reference keeps diffusers' own RoPE, so that it matches diffusers bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from fluxexport.adapters.rope import Float32RotaryEmbedding, use_float32_rope
from fluxexport.families import FLUX1, family_named
from fluxexport.models.loaders import MODULE_OF, load_module
from fluxexport.models.source import ModelSource
from fluxexport.specs import ComponentSpec

__all__ = [
    "Float32RotaryEmbedding",
    "adapter_for",
    "build_adapter",
    "named_outputs",
    "use_float32_rope",
    "wrap_component",
]


def wrap_component(
    name: str,
    module: nn.Module,
    guidance: bool,
    float32_rope: bool = True,
    *,
    family: str = FLUX1.name,
    text_layers: tuple[int, ...] = (9, 18, 27),
) -> nn.Module:
    """The adapter of component `name` around its loaded module (the autoencoder for both VAE components), by the
    adapters of `family` (its name; `text_layers`: the LM layers FLUX.2's text encoder stacks)."""
    return family_named(family).part("adapters").wrap(name, module, guidance, float32_rope, text_layers)


def adapter_for(source: ModelSource, name: str, module: nn.Module, float32_rope: bool = True) -> nn.Module:
    """`wrap_component` for a checkpoint: its family's adapter, its guidance and text layers."""
    return wrap_component(name, module, source.guidance_embeds, float32_rope,
                          family=source.family.name, text_layers=source.text_encoder_layers)  # fmt: skip


def build_adapter(spec: ComponentSpec, source: ModelSource, dtype: torch.dtype, prepare=None) -> nn.Module:
    """Load the component's weights and wrap them for export (float32 RoPE, traceable T5 attention);
    `prepare` rewrites the loaded module first (the FP8 fake quantization)."""
    module = load_module(source, MODULE_OF[spec.name], dtype, for_export=True)
    return adapter_for(source, spec.name, prepare(module) if prepare else module)


def named_outputs(spec: ComponentSpec, result: torch.Tensor | tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """An adapter's positional result, named by the spec's outputs."""
    values = (result,) if isinstance(result, torch.Tensor) else tuple(result)
    return {tensor.name: value for tensor, value in zip(spec.outputs, values, strict=True)}
