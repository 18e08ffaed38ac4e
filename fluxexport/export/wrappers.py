"""nn.Modules whose forward takes and returns exactly the spec's tensors, in the spec's order.

The only change to the models' math: RoPE frequencies in float32 (diffusers uses float64 on CPU, which
would put DOUBLE tensors in the graph; TensorRT has none).
"""

from __future__ import annotations

import torch
from torch import nn

from fluxexport.specs import ComponentSpec


class Float32RotaryEmbedding(nn.Module):
    """FluxPosEmbed with float32 frequencies: same cos/sin layout, no float64 anywhere."""

    def __init__(self, theta: int, axes_dim: list[int]):
        super().__init__()
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        positions = ids.float()
        cos, sin = zip(
            *(
                get_1d_rotary_pos_embed(
                    dim,
                    positions[:, axis],
                    theta=self.theta,
                    repeat_interleave_real=True,
                    use_real=True,
                    freqs_dtype=torch.float32,
                )  # fmt: skip
                for axis, dim in enumerate(self.axes_dim)
            ),
            strict=True,
        )
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def use_float32_rope(transformer: nn.Module) -> nn.Module:
    """Swap the transformer's RoPE module for the float32 one (in place; returns the transformer)."""
    transformer.pos_embed = Float32RotaryEmbedding(transformer.pos_embed.theta, transformer.pos_embed.axes_dim)
    return transformer


class ClipWrapper(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids.to(torch.int64), output_hidden_states=False)
        return out.last_hidden_state, out.pooler_output


class T5Wrapper(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids.to(torch.int64))[0]


class TransformerWrapper(nn.Module):
    def __init__(self, model: nn.Module, guidance: bool):
        super().__init__()
        self.model = use_float32_rope(model)
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


class VaeDecoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoderWrapper(nn.Module):
    """Returns the posterior mean (what FluxKontextPipeline uses: sample_mode="argmax")."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        return self.vae.encode(images).latent_dist.mode()


def build_wrapper(spec: ComponentSpec, source, dtype: torch.dtype) -> nn.Module:
    """Load the component's weights and wrap them for export, in eval mode and `dtype`."""
    from fluxexport.backends import torch_backend as loaders

    if spec.name == "clip":
        module = ClipWrapper(loaders.load_clip(source, dtype))
    elif spec.name == "t5":
        module = T5Wrapper(loaders.load_t5(source, dtype, attn_implementation="eager"))
    elif spec.name == "transformer":
        module = TransformerWrapper(loaders.load_transformer(source, dtype), source.guidance_embeds)
    elif spec.name == "vae_decoder":
        module = VaeDecoderWrapper(loaders.load_vae(source, dtype))
    else:
        module = VaeEncoderWrapper(loaders.load_vae(source, dtype))
    return module.eval()
