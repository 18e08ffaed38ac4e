"""Load a checkpoint's components as PyTorch modules (diffusers / transformers), in eval mode and a dtype."""

from __future__ import annotations

import torch

from fluxexport.errors import FluxExportError
from fluxexport.models.checkpoint import folder_locations
from fluxexport.models.single_file import load_bfl_transformer
from fluxexport.models.source import ModelSource


def from_folder(source: ModelSource, module: str, library_class, **kwargs):
    """`library_class.from_pretrained` on the module's subfolder, with a broken weights file refused in one line
    naming it (as `export` does) instead of the library's traceback."""
    from safetensors import SafetensorError

    subfolder = source.subfolders[module]
    folder = source.root / subfolder
    folder_locations(folder)  # every file's header: a truncated or foreign file is named here, before loading
    try:
        return library_class.from_pretrained(source.root, subfolder=subfolder, **kwargs)
    except (SafetensorError, OSError) as error:  # what headers cannot show (diffusers wraps its errors in OSError)
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise FluxExportError(f"cannot load the {module} weights in {folder}: {first}") from None


def load_transformer(source: ModelSource, dtype: torch.dtype = torch.float32):
    """The FluxTransformer2DModel (Flux2Transformer2DModel for FLUX.2): from the folder, or converted from a BFL
    single-file checkpoint of the same family (`models.source.load_folder` refused one of the other)."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    if source.transformer_file is None:
        library_class = Flux2Transformer2DModel if source.is_flux2 else FluxTransformer2DModel
        model = from_folder(source, "transformer", library_class, torch_dtype=dtype)
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

    model = from_folder(source, "clip", CLIPTextModel, dtype=dtype)
    return with_loras(source, "clip", model).eval()


def load_t5(source: ModelSource, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """T5 encoder; export passes attn_implementation="eager" (sdpa does not trace under dynamo)."""
    from transformers import T5EncoderModel

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return from_folder(source, "t5", T5EncoderModel, dtype=dtype, **kwargs).eval()


def load_vae(source: ModelSource, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    library_class = AutoencoderKLFlux2 if source.is_flux2 else AutoencoderKL
    return from_folder(source, "vae", library_class, torch_dtype=dtype).eval()


def load_text_encoder(source: ModelSource, dtype: torch.dtype = torch.float32, for_export: bool = False):
    """FLUX.2's text encoder, by the class diffusers loads it with (model_index.json's, else the pipeline's:
    Qwen3ForCausalLM, Mistral3ForConditionalGeneration); export takes eager attention (its masks trace under
    dynamo)."""
    library_class = source.component_class("text_encoder")
    kwargs = {"attn_implementation": "eager"} if for_export else {}
    model = from_folder(source, "text_encoder", library_class, dtype=dtype, **kwargs)
    return with_loras(source, "text_encoder", model).eval()


# The module each component runs: both VAE components share one AutoencoderKL.
MODULE_OF = {"clip": "clip", "t5": "t5", "transformer": "transformer", "vae_decoder": "vae", "vae_encoder": "vae",
             "transformer_head": "transformer", "transformer_tail": "transformer", "transformer_out": "transformer",
             "text_encoder": "text_encoder"}  # fmt: skip


def load_module(source: ModelSource, module: str, dtype: torch.dtype = torch.float32, for_export: bool = False):
    """One of "clip", "t5", "transformer", "vae"; `for_export` picks T5's traceable (eager) attention."""
    if module == "t5":
        return load_t5(source, dtype, attn_implementation="eager" if for_export else None)
    if module == "text_encoder":
        return load_text_encoder(source, dtype, for_export)
    loaders = {"clip": load_clip, "transformer": load_transformer, "vae": load_vae}
    return loaders[module](source, dtype)
