"""Random LoRAs that fit a tiny model, in each format `models/lora.py` reads, so that `--lora` can be tried offline.

FLUX.1: diffusers/PEFT (`transformer.<module>.lora_A/lora_B`), kohya (`lora_unet_…` on black-forest-labs' fused
modules with `.alpha`, plus CLIP's first attention as `lora_te1_…`) and XLabs (`double_blocks.N.processor.…`).
FLUX.1 also `control`: a Canny/Depth LoRA as diffusers saves one (PEFT keys, `lora_B` biases, the attention norms'
scales, and `x_embedder` widened to twice the model's input: noise and control-image latents), which turns FLUX.1-dev
into a FluxControlPipeline. (BFL's own layout of those LoRAs, `img_in.lora_A…`/`…query_norm.scale`, is read through
diffusers' conversion, which is written for FLUX.1's 19 + 38 blocks: no tiny model can have a file in it.)
FLUX.2: diffusers/PEFT with the `lora_alpha` metadata diffusers saves, kohya (`lora_unet_…` with `.alpha`) and
ai-toolkit (`diffusion_model.double_blocks.…`). Each adapts the first double and single block: every update
(`alpha / rank · B·A`, what a LoRA adds at scale 1) is `RELATIVE` times the norm of the weight it adapts, enough
to change a tiny model's image visibly without drowning it. The formats a family takes are its `lora_formats`,
the layers of each fixed-table format its `TINY_LORA_TARGETS` (`families/<f>/models.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxexport.atomic import atomic_file
from fluxexport.errors import FluxExportError
from fluxexport.families import family_named
from fluxexport.models.source import ModelSource

RANK = 4
ALPHA = 8.0  # kohya's `.alpha` and FLUX.2 PEFT's `lora_alpha`: updates scaled by ALPHA / RANK = 2
RELATIVE = 2.0  # ‖update‖ / ‖W‖ for each adapted weight (at --lora scale 1)
CONTROL = "control"  # the format of a LoRA that widens the transformer's input (FLUX.1 Canny/Depth)
WIDENING = 2  # a control LoRA's widened layers take twice the model's input (noise + control-image latents)


@dataclass(frozen=True)
class Target:
    """One LoRA layer of the file: its key stem and the modules of our model it adapts (several: a fused qkv)."""

    key: str
    modules: tuple[str, ...]
    model: str = "transformer"  # or "clip"


def qkv(block: str, prefix: str = "to_") -> tuple[str, ...]:
    """The q, k, v projections of a block's attention (`to_q`…, or the text stream's `add_q_proj`…)."""
    names = ("q", "k", "v") if prefix == "to_" else ("q_proj", "k_proj", "v_proj")
    return tuple(f"{block}.attn.{prefix}{name}" for name in names)


def targets(fmt: str, family: str, transformer: torch.nn.Module) -> list[Target]:
    """The layers a `fmt` LoRA of a model of `family` (its name) holds (keys without the format's suffixes): PEFT's
    every Linear of the first double and single block, the other formats' the family's table
    (`families/<f>/models.py::TINY_LORA_TARGETS`)."""
    double, single = "transformer_blocks.0", "single_transformer_blocks.0"
    widened = tuple(family_named(family).lora_widened_inputs) if fmt == CONTROL else ()
    if fmt in ("peft", CONTROL):
        return [Target(f"transformer.{name}", (name,)) for name, module in transformer.named_modules()
                if isinstance(module, torch.nn.Linear) and (name.startswith((f"{double}.", f"{single}."))
                                                             or name in widened)]  # fmt: skip
    return list(family_named(family).part("models").TINY_LORA_TARGETS[fmt])


def _names(fmt: str) -> tuple[str, str]:
    """The down and up suffixes of `fmt`'s keys."""
    return {"kohya": ("lora_down", "lora_up"), "xlabs": ("down", "up")}.get(fmt, ("lora_A", "lora_B"))


def _factor(fmt: str, family: str) -> float:
    """alpha / rank as the reader applies it (1 where the format carries no alpha)."""
    in_metadata = family_named(family).lora_alpha_in_metadata
    return ALPHA / RANK if fmt == "kohya" or (fmt == "peft" and in_metadata) else 1.0


def lora_tensors(
    fmt: str, family: str, weights: dict[str, dict[str, torch.Tensor]], transformer: torch.nn.Module, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The file's tensors: for each target, random A and B sized so that factor · ‖B·A‖ = RELATIVE · ‖W‖ (W the
    target's weights stacked as the fused layer holds them); `weights` is model → Linear name → weight."""
    generator, state = torch.Generator().manual_seed(seed), {}
    down_name, up_name = _names(fmt)
    factor = _factor(fmt, family)
    widened = family_named(family).lora_widened_inputs if fmt == CONTROL else {}
    for target in targets(fmt, family, transformer):
        weight = torch.cat([weights[target.model][name] for name in target.modules])
        width = weight.shape[1] * (WIDENING if target.modules[0] in widened else 1)
        down = torch.randn(RANK, width, generator=generator)
        up = torch.randn(weight.shape[0], RANK, generator=generator)
        up *= RELATIVE * weight.norm() / (factor * (up @ down).norm())
        state[f"{target.key}.{down_name}.weight"], state[f"{target.key}.{up_name}.weight"] = down, up
        if fmt == "kohya":
            state[f"{target.key}.alpha"] = torch.tensor(ALPHA)
        if fmt == CONTROL:  # BFL's LoRA layers carry a bias (diffusers loads it as PEFT's lora_bias)
            state[f"{target.key}.{up_name}.bias"] = 0.1 * torch.randn(weight.shape[0], generator=generator)
    return state | (_norm_scales(family, transformer, generator) if fmt == CONTROL else {})


def _norm_scales(family: str, transformer: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A control LoRA's own attention norm scales for the first double and single block (the norms diffusers'
    `load_lora_weights` replaces as they are: its pipeline's `_control_lora_supported_norm_keys`), around 1."""
    import diffusers

    norms = getattr(diffusers, family_named(family).lora_pipeline)._control_lora_supported_norm_keys
    blocks = ("transformer_blocks.0.", "single_transformer_blocks.0.")
    return {
        f"transformer.{name}": 1.0 + 0.5 * torch.rand(parameter.shape, generator=generator)
        for name, parameter in transformer.named_parameters()
        if name.startswith(blocks) and any(f".{norm}." in name for norm in norms)
    }


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach().float() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}  # fmt: skip


def write_tiny_lora(source: ModelSource, path: Path, fmt: str = "peft", seed: int = 0) -> Path:
    """A random LoRA of `source` (a tiny model) in format `fmt`, written atomically to `path` (.safetensors)."""
    from safetensors.torch import save_file

    from fluxexport.models.loaders import load_module

    family = source.family
    if not source.is_tiny:
        raise FluxExportError(f"{source.name} is not a tiny model: tiny-lora writes LoRAs for tiny variants only")
    if fmt not in family.lora_formats:
        raise FluxExportError(
            f"{source.name} ({family.title}) takes LoRAs in {', '.join(family.lora_formats)}, not {fmt} (--format)"
        )
    path = Path(path)
    if path.suffix != ".safetensors":
        raise FluxExportError(f"{path}: a LoRA file must end in .safetensors (--out)")
    if not path.parent.is_dir():
        raise FluxExportError(f"folder {path.parent} does not exist: create it or choose another --out")
    base = source.with_loras(())
    transformer = load_module(base, "transformer")
    models = {target.model for target in targets(fmt, family.name, transformer)} - {"transformer"}
    weights = {"transformer": _linear_weights(transformer)}
    weights |= {model: _linear_weights(load_module(base, model)) for model in sorted(models)}  # kohya's CLIP
    tensors = lora_tensors(fmt, family.name, weights, transformer, seed)
    state = {key: value.contiguous() for key, value in tensors.items()}
    metadata = None
    if fmt == "peft" and family.lora_alpha_in_metadata:  # the PEFT config diffusers saves beside FLUX.2 LoRAs
        modules = sorted(key.removeprefix("transformer.").removesuffix(".lora_A.weight") for key in state
                         if key.endswith(".lora_A.weight"))  # fmt: skip
        config = {"transformer.r": RANK, "transformer.lora_alpha": ALPHA, "transformer.target_modules": modules}
        metadata = {"lora_adapter_metadata": json.dumps(config)}
    with atomic_file(path) as staging:
        save_file(state, str(staging), metadata=metadata)
    return path
