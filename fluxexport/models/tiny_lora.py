"""Random LoRAs that fit a tiny model, in each format `models/lora.py` reads, so that `--lora` can be tried offline.

FLUX.1: diffusers/PEFT (`transformer.<module>.lora_A/lora_B`), kohya (`lora_unet_…` on black-forest-labs' fused
modules with `.alpha`, plus CLIP's first attention as `lora_te1_…`) and XLabs (`double_blocks.N.processor.…`).
FLUX.2: diffusers/PEFT with the `lora_alpha` metadata diffusers saves, kohya (`lora_unet_…` with `.alpha`) and
ai-toolkit (`diffusion_model.double_blocks.…`). Each adapts the first double and single block: every update
(`alpha / rank · B·A`, what a LoRA adds at scale 1) is `RELATIVE` times the norm of the weight it adapts, enough
to change a tiny model's image visibly without drowning it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxexport.atomic import atomic_file
from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource

RANK = 4
ALPHA = 8.0  # kohya's `.alpha` and FLUX.2 PEFT's `lora_alpha`: updates scaled by ALPHA / RANK = 2
RELATIVE = 2.0  # ‖update‖ / ‖W‖ for each adapted weight (at --lora scale 1)
FORMATS = {"flux1": ("peft", "kohya", "xlabs"), "flux2": ("peft", "kohya", "ai-toolkit")}


@dataclass(frozen=True)
class Target:
    """One LoRA layer of the file: its key stem and the modules of our model it adapts (several: a fused qkv)."""

    key: str
    modules: tuple[str, ...]
    model: str = "transformer"  # or "clip"


def _qkv(block: str, prefix: str = "to_") -> tuple[str, ...]:
    names = ("q", "k", "v") if prefix == "to_" else ("q_proj", "k_proj", "v_proj")
    return tuple(f"{block}.attn.{prefix}{name}" for name in names)


def _kohya_targets(family: str) -> list[Target]:
    double, single = "transformer_blocks.0", "single_transformer_blocks.0"
    targets = [
        Target("lora_unet_double_blocks_0_img_attn_qkv", _qkv(double)),
        Target("lora_unet_double_blocks_0_img_attn_proj", (f"{double}.attn.to_out.0",)),
    ]
    if family == "flux1":  # single blocks' linear1 is left out: diffusers' conversion assumes FLUX.1's real widths
        clip = [Target(f"lora_te1_text_model_encoder_layers_0_self_attn_{name}",
                       (f"encoder.layers.0.self_attn.{name}",), "clip") for name in ("q_proj", "k_proj", "v_proj", "out_proj")]  # fmt: skip
        return [*targets, Target("lora_unet_single_blocks_0_linear2", (f"{single}.proj_out",)), *clip]
    return [
        *targets,
        Target("lora_unet_double_blocks_0_txt_attn_qkv", _qkv(double, "add_")),
        Target("lora_unet_double_blocks_0_txt_attn_proj", (f"{double}.attn.to_add_out",)),
        Target("lora_unet_double_blocks_0_img_mlp_0", (f"{double}.ff.linear_in",)),
        Target("lora_unet_double_blocks_0_img_mlp_2", (f"{double}.ff.linear_out",)),
        Target("lora_unet_single_blocks_0_linear1", (f"{single}.attn.to_qkv_mlp_proj",)),
        Target("lora_unet_single_blocks_0_linear2", (f"{single}.attn.to_out",)),
    ]


def targets(fmt: str, family: str, transformer: torch.nn.Module) -> list[Target]:
    """The layers a `fmt` LoRA of a `family` model holds (keys without the format's suffixes)."""
    double, single = "transformer_blocks.0", "single_transformer_blocks.0"
    if fmt == "peft":
        return [Target(f"transformer.{name}", (name,)) for name, module in transformer.named_modules()
                if isinstance(module, torch.nn.Linear) and name.startswith((f"{double}.", f"{single}."))]  # fmt: skip
    if fmt == "kohya":
        return _kohya_targets(family)
    if fmt == "xlabs":
        return [
            Target("double_blocks.0.processor.qkv_lora1", _qkv(double)),
            Target("double_blocks.0.processor.qkv_lora2", _qkv(double, "add_")),
            Target("double_blocks.0.processor.proj_lora1", (f"{double}.attn.to_out.0",)),
            Target("double_blocks.0.processor.proj_lora2", (f"{double}.attn.to_add_out",)),
        ]
    return [  # ai-toolkit
        Target("diffusion_model.double_blocks.0.img_attn.qkv", _qkv(double)),
        Target("diffusion_model.double_blocks.0.txt_attn.qkv", _qkv(double, "add_")),
        Target("diffusion_model.single_blocks.0.linear1", (f"{single}.attn.to_qkv_mlp_proj",)),
        Target("diffusion_model.single_blocks.0.linear2", (f"{single}.attn.to_out",)),
    ]


def _names(fmt: str) -> tuple[str, str]:
    """The down and up suffixes of `fmt`'s keys."""
    return {"kohya": ("lora_down", "lora_up"), "xlabs": ("down", "up")}.get(fmt, ("lora_A", "lora_B"))


def _factor(fmt: str, family: str) -> float:
    """alpha / rank as the reader applies it (1 where the format carries no alpha)."""
    return ALPHA / RANK if fmt == "kohya" or (fmt == "peft" and family == "flux2") else 1.0


def lora_tensors(
    fmt: str, family: str, weights: dict[str, dict[str, torch.Tensor]], transformer: torch.nn.Module, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The file's tensors: for each target, random A and B sized so that factor · ‖B·A‖ = RELATIVE · ‖W‖ (W the
    target's weights stacked as the fused layer holds them); `weights` is model → Linear name → weight."""
    generator, state = torch.Generator().manual_seed(seed), {}
    down_name, up_name = _names(fmt)
    factor = _factor(fmt, family)
    for target in targets(fmt, family, transformer):
        weight = torch.cat([weights[target.model][name] for name in target.modules])
        down = torch.randn(RANK, weight.shape[1], generator=generator)
        up = torch.randn(weight.shape[0], RANK, generator=generator)
        up *= RELATIVE * weight.norm() / (factor * (up @ down).norm())
        state[f"{target.key}.{down_name}.weight"], state[f"{target.key}.{up_name}.weight"] = down, up
        if fmt == "kohya":
            state[f"{target.key}.alpha"] = torch.tensor(ALPHA)
    return state


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach().float() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}  # fmt: skip


def write_tiny_lora(source: ModelSource, path: Path, fmt: str = "peft", seed: int = 0) -> Path:
    """A random LoRA of `source` (a tiny model) in format `fmt`, written atomically to `path` (.safetensors)."""
    from safetensors.torch import save_file

    from fluxexport.models.loaders import load_clip, load_transformer

    family = source.family.name
    if not source.is_tiny:
        raise FluxExportError(f"{source.name} is not a tiny model: tiny-lora writes LoRAs for tiny variants only")
    if fmt not in FORMATS[family]:
        raise FluxExportError(
            f"{source.name} ({source.family.title}) takes LoRAs in {', '.join(FORMATS[family])}, not {fmt} (--format)"
        )
    path = Path(path)
    if path.suffix != ".safetensors":
        raise FluxExportError(f"{path}: a LoRA file must end in .safetensors (--out)")
    if not path.parent.is_dir():
        raise FluxExportError(f"folder {path.parent} does not exist: create it or choose another --out")
    base = source.with_loras(())
    transformer = load_transformer(base)
    weights = {"transformer": _linear_weights(transformer)}
    if fmt == "kohya" and family == "flux1":
        weights["clip"] = _linear_weights(load_clip(base))
    state = {key: value.contiguous() for key, value in lora_tensors(fmt, family, weights, transformer, seed).items()}
    metadata = None
    if fmt == "peft" and family == "flux2":  # the PEFT config diffusers saves beside FLUX.2 LoRAs
        modules = sorted(key.removeprefix("transformer.").removesuffix(".lora_A.weight") for key in state
                         if key.endswith(".lora_A.weight"))  # fmt: skip
        config = {"transformer.r": RANK, "transformer.lora_alpha": ALPHA, "transformer.target_modules": modules}
        metadata = {"lora_adapter_metadata": json.dumps(config)}
    with atomic_file(path) as staging:
        save_file(state, str(staging), metadata=metadata)
    return path
