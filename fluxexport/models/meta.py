"""Modules built from their config alone: parameters on the meta device (no memory), buffers real."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from fluxexport.models.source import ModelSource


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no initialisation cost) and
    keep their buffers real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        register(module, name, parameter)
        if parameter is not None and parameter.device.type != "meta":
            module._parameters[name] = nn.Parameter(parameter.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def module_from_config(source: ModelSource, module: str, for_export: bool = True) -> nn.Module:
    """The module ("clip", "t5", "transformer" or "vae") built from the checkpoint's config (weights are not read);
    `for_export` gives T5 its traceable eager attention (else the library's default, as `load_t5`)."""
    root = source.root
    if module == "transformer":
        from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

        library_class = Flux2Transformer2DModel if source.is_flux2 else FluxTransformer2DModel
        return library_class.from_config(library_class.load_config(str(root), subfolder="transformer"))
    if module == "vae":
        from diffusers import AutoencoderKL, AutoencoderKLFlux2

        library_class = AutoencoderKLFlux2 if source.is_flux2 else AutoencoderKL
        return library_class.from_config(library_class.load_config(str(root), subfolder="vae"))
    from transformers import AutoConfig, CLIPTextModel, T5EncoderModel

    config = AutoConfig.from_pretrained(root / source.subfolders[module])
    if module == "text_encoder":  # FLUX.2's LM, by the class diffusers loads it with
        if for_export:
            config._attn_implementation = "eager"
        return source.component_class("text_encoder")(config)
    if module == "t5":
        if for_export:
            config._attn_implementation = "eager"  # sdpa does not trace under dynamo (as in loaders.load_t5)
        return T5EncoderModel(config)
    return CLIPTextModel(config)


def parameter_aliases(module: nn.Module) -> dict[int, list[str]]:
    """Every name each parameter goes by, keyed by its id (tied ones have several: T5's `shared` and
    `encoder.embed_tokens`)."""
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return names


def check_loras(source: ModelSource, module: str, model: nn.Module) -> None:
    """Refuse, before anything is read or written, LoRAs that do not fit `model` (built on meta)."""
    if source.lora_set is not None:
        source.lora_set.check(module, {name: p.shape for name, p in model.named_parameters()})


def weightless_module(source: ModelSource, module: str, for_export: bool = True) -> nn.Module:
    """`module` built from the checkpoint's config with its parameters on the meta device (nothing read or
    allocated), after `source`'s LoRAs were checked against it: where every module without weights starts (the
    streamed export's fake-weight module, the block-streamed PyTorch module, the LoRA swap's check)."""
    with parameters_on_meta():
        model = module_from_config(source, module, for_export)
    check_loras(source, module, model)
    return model
