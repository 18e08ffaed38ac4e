"""FLUX.1's adapters: each takes and returns exactly its spec's tensors (`families/flux1/specs.py`).

- CLIP: its last hidden state and pooled output; T5: its last hidden state;
- transformer: `FluxTransformer2DModel` on 3-axis ids (float32 RoPE for export), whole or in the three parts the
  step caches run (head, tail, out: see `TransformerHeadAdapter`);
- VAE decoder / encoder: `AutoencoderKL`'s decode and its posterior's mode (what Kontext encodes its reference
  with) and standard deviation (what Fill and Canny/Depth sample with); the runtime scales and shifts the latent.
"""

from __future__ import annotations

import torch
from torch import nn

from fluxexport.adapters.parts import TransformerOutAdapter
from fluxexport.adapters.rope import use_float32_rope
from fluxexport.errors import FluxExportError
from fluxexport.specs import KNOWN_COMPONENTS


class ClipAdapter(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids.to(torch.int64), output_hidden_states=False)
        return out.last_hidden_state, out.pooler_output


class T5Adapter(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids.to(torch.int64))[0]


class TransformerAdapter(nn.Module):
    def __init__(self, model: nn.Module, guidance: bool, float32_rope: bool = True):
        super().__init__()
        self.model = use_float32_rope(model) if float32_rope else model
        self.guidance = guidance

    def forward(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None
    ):
        dtype = hidden_states.dtype
        return self.model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids.to(dtype),
            txt_ids=txt_ids.to(dtype),
            guidance=guidance if self.guidance else None,
            return_dict=False,
        )[0]


class TransformerHeadAdapter(TransformerAdapter):
    """The transformer's embedders and first double block, as diffusers' forward runs them: the first block's
    image residual (what First Block Cache compares), its image and text outputs, the time embedding, the
    image stream that entered the first block (what MagCache subtracts) and the first block's modulated image
    input (`norm1` of that stream with the time embedding: what TeaCache compares)."""

    def forward(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None
    ):
        model, dtype = self.model, hidden_states.dtype
        hidden = model.x_embedder(hidden_states)
        timestep = timestep.to(hidden.dtype) * 1000
        if self.guidance:
            temb = model.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled_projections)
        else:
            temb = model.time_text_embed(timestep, pooled_projections)
        text = model.context_embedder(encoder_hidden_states)
        rope = model.pos_embed(torch.cat((txt_ids.to(dtype), img_ids.to(dtype)), dim=0))
        first = model.transformer_blocks[0]
        modulated = first.norm1(hidden, emb=temb)[0]
        text, image = first(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
        return image - hidden, image, text, temb, hidden, modulated


class TransformerTailAdapter(nn.Module):
    """Every block after the first (the other double blocks, then the single ones): the image stream after them."""

    def __init__(self, model: nn.Module, float32_rope: bool = True):
        super().__init__()
        self.model = use_float32_rope(model) if float32_rope else model

    def forward(self, image_hidden, text_hidden, temb, img_ids, txt_ids):
        model, dtype = self.model, image_hidden.dtype
        rope = model.pos_embed(torch.cat((txt_ids.to(dtype), img_ids.to(dtype)), dim=0))
        image, text = image_hidden, text_hidden
        for block in [*model.transformer_blocks[1:], *model.single_transformer_blocks]:
            text, image = block(hidden_states=image, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
        return image


class VaeDecoderAdapter(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoderAdapter(nn.Module):
    """Returns the posterior's mean (what FluxKontextPipeline uses: sample_mode="argmax") and its standard
    deviation (FluxFillPipeline and FluxControlPipeline sample it: mean + std · noise)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        posterior = self.vae.encode(images).latent_dist
        return posterior.mode(), posterior.std


def wrap(name: str, module: nn.Module, guidance: bool, float32_rope: bool, text_layers: tuple[int, ...]) -> nn.Module:
    """The adapter of component `name` around its loaded module (the AutoencoderKL for both VAE components);
    `text_layers` is unused (FLUX.1 reads its encoders' last states)."""
    if name == "transformer":
        return TransformerAdapter(module, guidance, float32_rope).eval()
    if name == "transformer_head":
        return TransformerHeadAdapter(module, guidance, float32_rope).eval()
    if name == "transformer_tail":
        return TransformerTailAdapter(module, float32_rope).eval()
    if name == "transformer_out":
        return TransformerOutAdapter(module).eval()
    adapters = {
        "clip": ClipAdapter,
        "t5": T5Adapter,
        "vae_decoder": VaeDecoderAdapter,
        "vae_encoder": VaeEncoderAdapter,
    }
    if name not in adapters:
        raise FluxExportError(f"unknown component {name!r}: choose one of {', '.join(KNOWN_COMPONENTS)}")
    return adapters[name](module).eval()
