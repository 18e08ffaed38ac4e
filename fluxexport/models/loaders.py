"""Load a checkpoint's components as PyTorch modules (diffusers / transformers), in eval mode and a dtype."""

from __future__ import annotations

import torch

from fluxexport.errors import FluxExportError
from fluxexport.families import FAMILIES
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
    """The family's transformer (FluxTransformer2DModel, Flux2Transformer2DModel): from the folder, or converted
    from a BFL single-file checkpoint of the same family (`models.source.load_folder` refused one of the other)."""
    if source.transformer_file is None:
        model = from_folder(source, "transformer", source.module_class("transformer"), torch_dtype=dtype)
    else:
        model = load_bfl_transformer(source.transformer_file, source.root, dtype)
    return with_loras(source, "transformer", model).eval()


def with_loras(source: ModelSource, module: str, model):
    """`model` with the source's LoRAs merged into its weights (in place), checked against it first."""
    if source.lora_set is not None:
        source.lora_set.merge_into(module, model)
    return model


def load_library_module(source: ModelSource, module: str, dtype: torch.dtype = torch.float32, for_export=False):
    """A module other than the transformer, by the library class its family names (`ModelSource.module_class`:
    CLIPTextModel, T5EncoderModel, AutoencoderKL, FLUX.2's Qwen3 / Mistral3 LM, …), with the source's LoRAs
    merged; `for_export` gives the family's `eager_attention` modules eager attention (sdpa does not trace under
    dynamo; their masks do)."""
    library_class = source.module_class(module)
    dtype_argument = "torch_dtype" if library_class.__module__.startswith("diffusers") else "dtype"
    kwargs: dict[str, object] = {dtype_argument: dtype}
    if for_export and module in source.family.eager_attention:
        kwargs["attn_implementation"] = "eager"
    return with_loras(source, module, from_folder(source, module, library_class, **kwargs)).eval()


def load_clip(source: ModelSource, dtype: torch.dtype = torch.float32):
    """FLUX.1's CLIP text encoder."""
    return load_library_module(source, "clip", dtype)


def load_t5(source: ModelSource, dtype: torch.dtype = torch.float32, for_export: bool = False):
    """FLUX.1's T5 encoder; export takes eager attention."""
    return load_library_module(source, "t5", dtype, for_export)


def load_vae(source: ModelSource, dtype: torch.dtype = torch.float32):
    """The family's VAE (AutoencoderKL, AutoencoderKLFlux2)."""
    return load_library_module(source, "vae", dtype)


def load_text_encoder(source: ModelSource, dtype: torch.dtype = torch.float32, for_export: bool = False):
    """FLUX.2's text encoder, by the class diffusers loads it with (model_index.json's, else the pipeline's:
    Qwen3ForCausalLM, Mistral3ForConditionalGeneration); export takes eager attention."""
    return load_library_module(source, "text_encoder", dtype, for_export)


# The module each component runs, over every family (both VAE components share one autoencoder)
MODULE_OF = {name: module for family in FAMILIES for name, module in family.module_of.items()}


def load_module(source: ModelSource, module: str, dtype: torch.dtype = torch.float32, for_export: bool = False):
    """One of the family's modules ("clip", "t5", "text_encoder", "transformer", "vae"); `for_export` picks the
    traceable (eager) attention of the text encoders that need it."""
    if module == "transformer":
        return load_transformer(source, dtype)
    return load_library_module(source, module, dtype, for_export)
