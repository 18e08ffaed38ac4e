"""A checkpoint's tensors, one at a time, straight from its memory-mapped safetensors files.

Nothing here holds a whole model: `CheckpointTensors.load(name)` reads one tensor (or, for black-forest-labs'
fused projections, the rows of one part of it) when asked. Diffusers folders may be sharded (FLUX.1-dev's
transformer is 3 shards with an index json, its T5 2 shards); every `*.safetensors` file of the part's
subfolder is read, by header only, to find which file holds which tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxexport.errors import FluxExportError
from fluxexport.models.quantized_checkpoint import QuantScale, dequantize, quant_scale, quantization_keys, read_header
from fluxexport.models.source import ModelSource


@dataclass(frozen=True)
class TensorLocation:
    """Where one model tensor lives: a file and key, and how to cut it out (rows of a fused tensor, or BFL's
    swapped final-modulation halves)."""

    file: Path
    key: str
    rows: tuple[int, int] | None = None  # [start, stop) along dim 0 of a fused tensor
    swap_halves: bool = False
    scale: QuantScale | None = None  # an FP8 weight's scales (models/quantized_checkpoint.py): read dequantized


def _safetensors_files(folder: Path) -> list[Path]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise FluxExportError(f"{index[0]} is not a safetensors index ({error}): re-download the model") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise FluxExportError(f"{folder} lacks shard {missing[0]} named by {index[0].name}: re-download it")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FluxExportError(f"{folder} has no .safetensors weights (only safetensors are read)")
    return files


def _keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise FluxExportError(f"cannot read {path}: {error} (it must be a .safetensors file)") from None


def folder_locations(folder: Path) -> dict[str, TensorLocation]:
    """name → location for every tensor of a (possibly sharded) diffusers/transformers subfolder; a quantized
    weight's location carries its scales (whose keys are no tensor of the module)."""
    locations = {}
    for path in _safetensors_files(folder):
        header = read_header(path)
        extra = quantization_keys({key: dtype for key, (dtype, _) in header.tensors.items()})
        for key in header.tensors:
            if key not in extra:
                locations[key] = TensorLocation(path, key, scale=quant_scale(header, key))
    return locations


def bfl_locations(path: Path) -> dict[str, TensorLocation]:
    """diffusers name → location for a black-forest-labs single file of either family: the fused qkv (and
    FLUX.1's linear1) split by rows, read lazily from the mmapped file."""
    from safetensors import safe_open

    from fluxexport.models.single_file import BFL_PREFIX, bfl_layout

    header = read_header(path)  # a quantized file's scales and markers are no tensors of the layout
    extra = quantization_keys({key: dtype for key, (dtype, _) in header.tensors.items()})
    keys = [key for key in header.tensors if key not in extra]
    prefix = BFL_PREFIX if any(key.startswith(BFL_PREFIX) for key in keys) else ""
    with safe_open(str(path), framework="pt") as handle:
        rows_of = {key.removeprefix(prefix): handle.get_slice(key).get_shape()[0] for key in keys}
    locations = {}
    for ours, theirs, kind, rows in bfl_layout(rows_of):
        key = prefix + theirs
        scale = quant_scale(header, key)
        locations[ours] = TensorLocation(path, key, rows=rows, swap_halves=kind == "swap", scale=scale)
    return locations


# Prefixes published checkpoints carry that the library's module does not: transformers ≥ 5 builds
# CLIPTextModel without its `text_model.` level and drops the prefix when loading (its PrefixChange rule).
DROPPED_PREFIXES = {"clip": "text_model."}


def without_prefix(locations: dict[str, TensorLocation], prefix: str | None) -> dict[str, TensorLocation]:
    """The locations under the module's own names: `prefix` removed where the checkpoint has it."""
    if not prefix:
        return locations
    return {name.removeprefix(prefix): location for name, location in locations.items()}


def library_names(source: ModelSource, module: str, locations: dict[str, TensorLocation]) -> dict[str, TensorLocation]:
    """FLUX.2's text encoder under the names its transformers module uses: a Mistral3 checkpoint is stored in the
    legacy layout (`language_model.model.layers.…`, as transformers ≥ 5 still saves it) that transformers' own
    renamings map to the module's (`model.language_model.layers.…`) when it loads; we apply the same renamings."""
    if module != "text_encoder":
        return locations
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    from fluxexport.models.meta import module_from_config, parameters_on_meta

    with parameters_on_meta():
        model = module_from_config(source, module, for_export=False)
    renamings = [step for step in get_model_conversion_mapping(model) if isinstance(step, WeightRenaming)]
    if not renamings:
        return locations
    return {apply_renamings(name, renamings): location for name, location in locations.items()}


class CheckpointTensors:
    """The tensors of one module of a checkpoint ("clip", "t5", "transformer", "vae"), loaded on demand."""

    def __init__(self, source: ModelSource, module: str):
        self.module = module
        self.loras = source.lora_set  # merged into each tensor as it is read
        if module == "transformer" and source.transformer_file is not None:
            self.locations = bfl_locations(source.transformer_file)
        else:
            locations = folder_locations(source.root / source.subfolders[module])
            locations = without_prefix(locations, DROPPED_PREFIXES.get(module))
            self.locations = library_names(source, module, locations)

    def __contains__(self, name: str) -> bool:
        return name in self.locations

    def first_of(self, aliases: list[str]) -> str:
        """The first of a parameter's names the checkpoint has, or a one-line refusal naming it."""
        found = next((alias for alias in aliases if alias in self.locations), None)
        if found is None:
            raise FluxExportError(
                f"the {self.module} checkpoint has no tensor {aliases[0]!r}: it does not fit its config "
                "(truncated download, or another model's weights)"
            )
        return found

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read from its mmapped file (only the needed rows of a fused one), cast to `dtype`."""
        from safetensors import safe_open

        location = self.locations[name]
        with safe_open(str(location.file), framework="pt") as handle:
            if location.rows is not None:
                start, stop = location.rows
                tensor = handle.get_slice(location.key)[start:stop]
            else:
                tensor = handle.get_tensor(location.key)
            if location.scale is not None:  # an FP8 weight: the float32 weight its scales make of it
                tensor = dequantize(handle, location.scale, tensor, location.rows)
        if location.swap_halves:  # BFL's final AdaLN emits (shift, scale); diffusers' (scale, shift)
            first, second = tensor.chunk(2, dim=0)
            tensor = torch.cat([second, first], dim=0)
        if self.loras is not None:
            tensor = self.loras.merged(self.module, name, tensor)
        return tensor if dtype is None else tensor.to(dtype)

    def loader(self, name: str, dtype: torch.dtype | None = None) -> Callable[[], torch.Tensor]:
        return lambda: self.load(name, dtype)

    def load_buffers(self, module: torch.nn.Module, dtype: torch.dtype) -> int:
        """Give `module` the checkpoint's value of every buffer the checkpoint holds (FLUX.2's VAE batch-norm
        statistics); the rest keep their values from the config (non-persistent ones such as RoPE frequencies).
        Buffers are small; what is computed from them must be real before tracing or running. Returns how many
        were read."""
        names = {id(buffer): name for name, buffer in module.named_buffers()}
        count = 0
        for owner in module.modules():
            for leaf, buffer in owner._buffers.items():
                full = names.get(id(buffer)) if buffer is not None else None
                if full is None or full not in self.locations:
                    continue
                owner._buffers[leaf] = self.load(full, dtype if buffer.is_floating_point() else buffer.dtype)
                count += 1
        return count
