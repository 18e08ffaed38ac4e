"""black-forest-labs single-file transformer checkpoints (`flux1-dev.safetensors`, `flux2-dev.safetensors`
layouts) ↔ diffusers keys.

Both families share BFL's naming (img_in, double_blocks, single_blocks, final_layer) and differ in what a block
holds: FLUX.1 modulates each block by its own `*_mod.lin` and fuses a single block's q, k, v and MLP input into
`linear1` (split here into diffusers' four projections); FLUX.2 modulates all blocks from shared
`*_stream_modulation` layers, has no biases, and diffusers keeps its `linear1` fused (`attn.to_qkv_mlp_proj`).
Each family's tables are its `BFL_LAYOUT` (`families/<f>/models.py`); a file's family is read from its keys (the
layout whose marker keys it holds). diffusers' FLUX.1 converter hard-codes FLUX.1's width (3072), so it cannot
read a checkpoint of any other size; this mapping reads widths from the tensors, and tests check it against
diffusers' converters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxexport.errors import FluxExportError
from fluxexport.families import FAMILIES, Family

BFL_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class BflLayout:
    """One family's tables, diffusers suffix ← BFL suffix; fused: BFL tensor → the diffusers tensors it
    concatenates along dim 0, in order."""

    family: Family
    markers: tuple[str, ...]  # key prefixes only this family has (BFL's and diffusers' alike); () for the default
    leaves: tuple[str, ...]  # the parameters of each renamed or fused Linear
    top: dict[str, str]
    double: dict[str, str]
    double_fused: dict[str, tuple[str, ...]]
    single: dict[str, str]
    single_fused: dict[str, tuple[str, ...]]


# RMSNorm scales, named alike in both families (BFL's `.scale`, diffusers' `.weight`).
_DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
DOUBLE_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}


def layouts() -> tuple[BflLayout, ...]:
    """Every family's layout (`families/<f>/models.py::BFL_LAYOUT`), those with marker keys first."""
    found = tuple(family.part("models").BFL_LAYOUT for family in FAMILIES)
    return tuple(sorted(found, key=lambda layout: not layout.markers))


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """BFL's final AdaLN emits (shift, scale); diffusers' (scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _block_count(keys, prefix: str) -> int:
    indices = {int(key[len(prefix) :].split(".")[0]) for key in keys if key.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def layout_of(keys: Iterable[str]) -> BflLayout:
    """The layout of BFL or diffusers transformer keys: the family whose marker keys they hold (FLUX.2's shared
    modulation layers), else the one without markers (FLUX.1)."""
    keys = list(keys)
    return next(layout for layout in layouts() if not layout.markers or any(k.startswith(layout.markers) for k in keys))


def bfl_family(keys: Iterable[str]) -> Family:
    """The family of a BFL transformer checkpoint from its keys (without the `model.diffusion_model.` prefix)."""
    keys = set(keys)
    if "img_in.weight" not in keys or "final_layer.linear.weight" not in keys:
        raise FluxExportError("not a black-forest-labs FLUX transformer checkpoint (no img_in / final_layer keys)")
    return layout_of(keys).family


def single_file_family(path: Path) -> Family:
    """The family of a BFL single file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise FluxExportError(f"cannot read {path}: {error} (it must be a .safetensors file)") from None
    return bfl_family(key.removeprefix(BFL_PREFIX) for key in keys)


def check_base_family(path: Path, base_family: Family, base_root: Path) -> None:
    """Refuse a single file whose family is not its base model's (its VAE, text encoder and configs)."""
    family = single_file_family(path)
    if family is not base_family:
        raise FluxExportError(
            f"{path.name} is a {family.title} transformer but the base model {base_root} is {base_family.title}: "
            f"pass a {family.title} --base-model"
        )


def _mapping(layout: BflLayout, num_double: int, num_single: int, guidance: bool):
    """Yield (diffusers names, BFL name, kind) for every parameter; kind: rename | fused | swap."""
    for ours, theirs in layout.top.items():
        if theirs.startswith("guidance_in.") and not guidance:
            continue
        for leaf in layout.leaves:
            yield (f"{ours}.{leaf}",), f"{theirs}.{leaf}", "rename"
    for leaf in layout.leaves:
        yield ("norm_out.linear." + leaf,), "final_layer.adaLN_modulation.1." + leaf, "swap"
    for index in range(num_double):
        ours, theirs = f"transformer_blocks.{index}.", f"double_blocks.{index}."
        yield from _block(layout.leaves, ours, theirs, layout.double, _DOUBLE_NORMS, layout.double_fused)
    for index in range(num_single):
        ours, theirs = f"single_transformer_blocks.{index}.", f"single_blocks.{index}."
        yield from _block(layout.leaves, ours, theirs, layout.single, _SINGLE_NORMS, layout.single_fused)


def _block(leaves: tuple[str, ...], ours_prefix: str, theirs_prefix: str, renames: dict, norms: dict, fused: dict):
    """The parameters of one double or single block, by the block kind's tables."""
    for ours, theirs in renames.items():
        for leaf in leaves:
            yield (f"{ours_prefix}{ours}.{leaf}",), f"{theirs_prefix}{theirs}.{leaf}", "rename"
    for ours, theirs in norms.items():
        yield (ours_prefix + ours,), theirs_prefix + theirs, "rename"
    for theirs, parts in fused.items():
        for leaf in leaves:
            yield tuple(f"{ours_prefix}{p}.{leaf}" for p in parts), f"{theirs_prefix}{theirs}.{leaf}", "fused"


def bfl_layout(rows_of: dict[str, int]):
    """Yield (diffusers name, BFL name, kind, rows) for a BFL checkpoint of either family given each tensor's
    dim-0 size (keys without the `model.diffusion_model.` prefix): `rows` is the [start, stop) slice of a fused
    tensor, else None. Streaming export reads exactly these slices, one tensor at a time."""
    bfl_family(rows_of)  # refuses keys that are no FLUX transformer's
    layout = layout_of(rows_of)
    title = layout.family.title
    inner = rows_of["img_in.weight"]
    guidance = "guidance_in.in_layer.weight" in rows_of
    num_double, num_single = _block_count(rows_of, "double_blocks."), _block_count(rows_of, "single_blocks.")
    mapping = list(_mapping(layout, num_double, num_single, guidance))
    expected = {theirs for _, theirs, _ in mapping}
    missing = next((theirs for _, theirs, _ in mapping if theirs not in rows_of), None)
    if missing:
        raise FluxExportError(f"checkpoint is missing {missing}: it is truncated or not a {title} transformer")
    extra = sorted(set(rows_of) - expected)
    if extra:
        raise FluxExportError(
            f"checkpoint has keys {title} does not ({', '.join(extra[:3])}): it is not a {title} transformer"
        )
    for ours, theirs, kind in mapping:
        if kind != "fused":
            yield ours[0], theirs, kind, None
            continue
        # q, k, v are `inner` rows each; a FLUX.1 single block's MLP projection takes the remaining rows.
        sizes = [inner] * len(ours)
        sizes[-1] = rows_of[theirs] - inner * (len(ours) - 1)
        start = 0
        for name, size in zip(ours, sizes, strict=True):
            yield name, theirs, kind, (start, start + size)
            start += size


def bfl_to_diffusers(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a BFL transformer state dict to diffusers' keys (FluxTransformer2DModel or
    Flux2Transformer2DModel, by the checkpoint's family)."""
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
    """The inverse: a diffusers FLUX.1 or FLUX.2 transformer state dict → BFL single-file keys (to write test
    checkpoints)."""
    layout = layout_of(state)
    num_double = _block_count(state, "transformer_blocks.")
    num_single = _block_count(state, "single_transformer_blocks.")
    guidance = any(".guidance_embedder." in key for key in state)
    converted = {}
    for ours, theirs, kind in _mapping(layout, num_double, num_single, guidance):
        if kind == "swap":
            converted[theirs] = _swap_halves(state[ours[0]])
        elif kind == "fused":
            converted[theirs] = torch.cat([state[name] for name in ours], dim=0)
        else:
            converted[theirs] = state[ours[0]]
    return {key: value.contiguous() for key, value in converted.items()}


def load_bfl_transformer(path: Path, config_folder: Path, dtype: torch.dtype = torch.float32):
    """The diffusers transformer of the file's family (FluxTransformer2DModel or Flux2Transformer2DModel) built
    from `config_folder`'s config with weights from a BFL file."""
    import diffusers
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fluxexport.models.quantized_checkpoint import dequantized_state

    try:
        checkpoint = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise FluxExportError(f"cannot read {path}: {error} (it must be a .safetensors file)") from None
    family = bfl_family(key.removeprefix(BFL_PREFIX) for key in checkpoint)
    state = bfl_to_diffusers(dequantized_state(checkpoint))  # an FP8 file runs on its dequantized weights
    library_class = getattr(diffusers, family.transformer_class)
    config = library_class.load_config(str(config_folder), subfolder="transformer")
    with torch.device("meta"):
        model = library_class.from_config(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise FluxExportError(
            f"{path.name} does not fit {config_folder}/transformer/config.json ({first}): pair it with the "
            "matching --base-model"
        ) from None
    return (model if dtype == torch.float32 else model.to(dtype)).eval()
