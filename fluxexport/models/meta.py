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
    """The module ("clip", "t5", "text_encoder", "transformer" or "vae") built from the checkpoint's config by the
    class its family names (weights are not read); `for_export` gives the family's `eager_attention` modules their
    traceable eager attention (else the library's default, as `loaders.load_library_module`)."""
    library_class = source.module_class(module)
    subfolder = source.subfolders[module]
    if library_class.__module__.startswith("diffusers"):
        return library_class.from_config(library_class.load_config(str(source.root), subfolder=subfolder))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.root / subfolder)
    if for_export and module in source.family.eager_attention:
        config._attn_implementation = "eager"
    return library_class(config)


def parameter_aliases(module: nn.Module) -> dict[int, list[str]]:
    """Every name each parameter goes by, keyed by its id (tied ones have several: T5's `shared` and
    `encoder.embed_tokens`)."""
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return names


def check_loras(source: ModelSource, module: str, model: nn.Module) -> None:
    """Refuse, before anything is read or written, LoRAs that do not fit `model` (built on meta), and widen the
    layers a LoRA widens (BFL's Canny/Depth LoRAs: `LoraSet.widen`), as the loaded model is widened."""
    if source.lora_set is not None:
        source.lora_set.check(module, {name: p.shape for name, p in model.named_parameters()})
        source.lora_set.widen(module, model)


def weightless_module(source: ModelSource, module: str, for_export: bool = True) -> nn.Module:
    """`module` built from the checkpoint's config with its parameters on the meta device (nothing read or
    allocated), after `source`'s LoRAs were checked against it: where every module without weights starts (the
    streamed export's fake-weight module, the block-streamed PyTorch module, the LoRA swap's check)."""
    with parameters_on_meta():
        model = module_from_config(source, module, for_export)
    check_loras(source, module, model)
    return model
