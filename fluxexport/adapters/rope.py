"""RoPE for export: diffusers' rotary embedding with float32 frequencies (TensorRT has no DOUBLE)."""

from __future__ import annotations

import torch
from torch import nn


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
