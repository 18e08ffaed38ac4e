"""Helpers the test modules share (not tests themselves): diffusers' reference images, FLUX.1-shaped sources."""

from __future__ import annotations

import numpy as np
import torch

from fluxexport.models.source import ModelSource


def diffusers_images(pipeline, prompt, height, width, steps, seed, num_images=1, **kwargs) -> np.ndarray:
    """uint8 [B,H,W,3] from a diffusers pipeline, rounded as its PIL output is."""
    from diffusers import FluxKontextPipeline

    if isinstance(pipeline, FluxKontextPipeline):
        kwargs.setdefault("max_area", height * width)  # keep the requested size, as our runtime does
    # our T5 length defaults are BFL's (256 schnell, 512 guidance-distilled); diffusers' is always 512
    kwargs.setdefault("max_sequence_length", 512 if pipeline.transformer.config.guidance_embeds else 256)
    images = pipeline(
        prompt=prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        num_images_per_prompt=num_images,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images
    return (images * 255).round().astype(np.uint8)


def flux1_source(tmp_path, kontext=False, guidance=True) -> ModelSource:
    """FLUX.1's real configs (widths, vocabularies), without weights: specs read nothing else."""
    configs = {
        "model_index": {"_class_name": "FluxKontextPipeline" if kontext else "FluxPipeline"},
        "transformer": {
            "in_channels": 64,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": guidance,
        },  # fmt: skip
        "vae": {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16},
        "text_encoder": {"hidden_size": 768, "max_position_embeddings": 77, "vocab_size": 49408},
        "text_encoder_2": {"d_model": 4096, "vocab_size": 32128},
        "scheduler": {},
    }
    return ModelSource("flux1", tmp_path, configs=configs)
