"""Load a checkpoint's components as PyTorch modules (diffusers / transformers), in eval mode and a dtype."""

from __future__ import annotations

import torch

from fluxexport.models.single_file import load_bfl_transformer
from fluxexport.models.source import ModelSource

# module → the checkpoint subfolder its config and weights live in
SUBFOLDERS = {"clip": "text_encoder", "t5": "text_encoder_2", "transformer": "transformer", "vae": "vae"}


def load_transformer(source: ModelSource, dtype: torch.dtype = torch.float32):
    """The FluxTransformer2DModel: from the folder, or converted from a BFL single-file checkpoint."""
    from diffusers import FluxTransformer2DModel

    if source.transformer_file is None:
        model = FluxTransformer2DModel.from_pretrained(
            source.root, subfolder=SUBFOLDERS["transformer"], torch_dtype=dtype
        )
    else:
        model = load_bfl_transformer(source.transformer_file, source.root, dtype)
    return with_loras(source, "transformer", model).eval()


def with_loras(source: ModelSource, module: str, model):
    """`model` with the source's LoRAs merged into its weights (in place), checked against it first."""
    if source.lora_set is not None:
        source.lora_set.merge_into(module, model)
    return model


def load_clip(source: ModelSource, dtype: torch.dtype = torch.float32):
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(source.root, subfolder=SUBFOLDERS["clip"], dtype=dtype)
    return with_loras(source, "clip", model).eval()


def load_t5(source: ModelSource, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """T5 encoder; export passes attn_implementation="eager" (sdpa does not trace under dynamo)."""
    from transformers import T5EncoderModel

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return T5EncoderModel.from_pretrained(source.root, subfolder=SUBFOLDERS["t5"], dtype=dtype, **kwargs).eval()


def load_vae(source: ModelSource, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(source.root, subfolder=SUBFOLDERS["vae"], torch_dtype=dtype).eval()


# The module each component runs: both VAE components share one AutoencoderKL.
MODULE_OF = {"clip": "clip", "t5": "t5", "transformer": "transformer", "vae_decoder": "vae", "vae_encoder": "vae"}


def load_module(source: ModelSource, module: str, dtype: torch.dtype = torch.float32, for_export: bool = False):
    """One of "clip", "t5", "transformer", "vae"; `for_export` picks T5's traceable (eager) attention."""
    if module == "t5":
        return load_t5(source, dtype, attn_implementation="eager" if for_export else None)
    loaders = {"clip": load_clip, "transformer": load_transformer, "vae": load_vae}
    return loaders[module](source, dtype)
