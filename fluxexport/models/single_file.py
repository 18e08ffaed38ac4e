"""black-forest-labs single-file transformer checkpoints (`flux1-dev.safetensors` layout) ↔ diffusers keys.

diffusers' own converter hard-codes FLUX.1's width (3072), so it cannot read a checkpoint of any other
size; this mapping reads widths from the tensors and is checked against diffusers' at full width in tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxexport.errors import FluxExportError

BFL_PREFIX = "model.diffusion_model."

# One-to-one renames: diffusers suffix ← BFL suffix.
_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
_DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
# Fused projections: BFL tensor → the diffusers tensors it concatenates along dim 0, in order.
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """BFL's final AdaLN emits (shift, scale); diffusers' (scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _block_count(keys, prefix: str) -> int:
    indices = {int(key[len(prefix) :].split(".")[0]) for key in keys if key.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _mapping(num_double: int, num_single: int, guidance: bool):
    """Yield (diffusers names, BFL name, kind) for every parameter; kind: rename | fused | swap."""
    for ours, theirs in _TOP.items():
        if "guidance" in ours and not guidance:
            continue
        for leaf in ("weight", "bias"):
            yield (f"{ours}.{leaf}",), f"{theirs}.{leaf}", "rename"
    for leaf in ("weight", "bias"):
        yield ("norm_out.linear." + leaf,), "final_layer.adaLN_modulation.1." + leaf, "swap"
    for index in range(num_double):
        yield from _block(
            f"transformer_blocks.{index}.", f"double_blocks.{index}.", _DOUBLE, _DOUBLE_NORMS, _DOUBLE_FUSED
        )
    for index in range(num_single):
        yield from _block(
            f"single_transformer_blocks.{index}.", f"single_blocks.{index}.", _SINGLE, _SINGLE_NORMS, _SINGLE_FUSED
        )


def _block(ours_prefix: str, theirs_prefix: str, renames: dict, norms: dict, fused: dict):
    """The parameters of one double or single block, by the block kind's tables."""
    for ours, theirs in renames.items():
        for leaf in ("weight", "bias"):
            yield (f"{ours_prefix}{ours}.{leaf}",), f"{theirs_prefix}{theirs}.{leaf}", "rename"
    for ours, theirs in norms.items():
        yield (ours_prefix + ours,), theirs_prefix + theirs, "rename"
    for theirs, parts in fused.items():
        for leaf in ("weight", "bias"):
            yield tuple(f"{ours_prefix}{p}.{leaf}" for p in parts), f"{theirs_prefix}{theirs}.{leaf}", "fused"


def bfl_layout(rows_of: dict[str, int]):
    """Yield (diffusers name, BFL name, kind, rows) for a BFL checkpoint given each tensor's dim-0 size (keys
    without the `model.diffusion_model.` prefix): `rows` is the [start, stop) slice of a fused tensor, else None.
    Streaming export reads exactly these slices, one tensor at a time."""
    if "img_in.weight" not in rows_of or "final_layer.linear.weight" not in rows_of:
        raise FluxExportError("not a black-forest-labs FLUX transformer checkpoint (no img_in / final_layer keys)")
    inner = rows_of["img_in.weight"]
    guidance = "guidance_in.in_layer.weight" in rows_of
    mapping = list(_mapping(_block_count(rows_of, "double_blocks."), _block_count(rows_of, "single_blocks."), guidance))
    expected = {theirs for _, theirs, _ in mapping}
    missing = next((theirs for _, theirs, _ in mapping if theirs not in rows_of), None)
    if missing:
        raise FluxExportError(f"checkpoint is missing {missing}: it is truncated or not a FLUX.1 transformer")
    extra = sorted(set(rows_of) - expected)
    if extra:
        raise FluxExportError(
            f"checkpoint has keys FLUX.1 does not ({', '.join(extra[:3])}): it is not a FLUX.1 transformer"
        )
    for ours, theirs, kind in mapping:
        if kind != "fused":
            yield ours[0], theirs, kind, None
            continue
        # q, k, v are `inner` rows each; a single block's MLP projection takes the remaining rows.
        sizes = [inner] * len(ours)
        sizes[-1] = rows_of[theirs] - inner * (len(ours) - 1)
        start = 0
        for name, size in zip(ours, sizes, strict=True):
            yield name, theirs, kind, (start, start + size)
            start += size


def bfl_to_diffusers(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a BFL transformer state dict to diffusers' FluxTransformer2DModel keys."""
    state = {key.removeprefix(BFL_PREFIX): value for key, value in checkpoint.items()}
    converted: dict[str, torch.Tensor] = {}
    for ours, theirs, kind, rows in bfl_layout({key: value.shape[0] for key, value in state.items()}):
        tensor = state[theirs]
        if kind == "swap":
            converted[ours] = _swap_halves(tensor)
        else:
            converted[ours] = tensor if rows is None else tensor[rows[0] : rows[1]]
    return converted


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse: diffusers FluxTransformer2DModel keys → BFL single-file keys (to write test checkpoints)."""
    num_double = _block_count(state, "transformer_blocks.")
    num_single = _block_count(state, "single_transformer_blocks.")
    guidance = any(key.startswith("time_text_embed.guidance_embedder.") for key in state)
    converted = {}
    for ours, theirs, kind in _mapping(num_double, num_single, guidance):
        if kind == "swap":
            converted[theirs] = _swap_halves(state[ours[0]])
        elif kind == "fused":
            converted[theirs] = torch.cat([state[name] for name in ours], dim=0)
        else:
            converted[theirs] = state[ours[0]]
    return {key: value.contiguous() for key, value in converted.items()}


def load_bfl_transformer(path: Path, config_folder: Path, dtype: torch.dtype = torch.float32):
    """A FluxTransformer2DModel built from `config_folder`'s config with weights from a BFL file."""
    from diffusers import FluxTransformer2DModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        checkpoint = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise FluxExportError(f"cannot read {path}: {error} (it must be a .safetensors file)") from None
    state = bfl_to_diffusers(checkpoint)
    config = FluxTransformer2DModel.load_config(str(config_folder), subfolder="transformer")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise FluxExportError(
            f"{path.name} does not fit {config_folder}/transformer/config.json ({first}): pair it with the "
            "matching --base-model"
        ) from None
    return (model if dtype == torch.float32 else model.to(dtype)).eval()
