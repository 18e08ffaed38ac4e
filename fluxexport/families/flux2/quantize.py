"""FLUX.2's quantization policy: which of the transformer's modules keep the base dtype under FP8."""

from __future__ import annotations

# FLUX.1's rule (every Linear inside the double and single blocks is quantized, nothing outside): FLUX.2's blocks
# hold attention, SwiGLU feed-forwards and the single blocks' fused projections; its modulation moved out of the
# blocks into three shared Linears of the time embedding (conditioning, one row per sample and step, steering every
# block), which stay with the embedders and the output.
KEEP_HIGH_PRECISION = (
    "x_embedder", "context_embedder", "time_guidance_embed", "double_stream_modulation_img",
    "double_stream_modulation_txt", "single_stream_modulation", "norm_out", "proj_out",
)  # fmt: skip
