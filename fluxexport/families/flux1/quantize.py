"""FLUX.1's quantization policy: which of the transformer's modules keep the base dtype under FP8."""

from __future__ import annotations

# Layers NVIDIA's and black-forest-labs' FP8 recipes keep in high precision: embedders, conditioning, output
# (every Linear inside the double and single blocks is quantized, nothing outside).
KEEP_HIGH_PRECISION = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")
