"""Run a model that does not fit in memory: its blocks are read from the checkpoint one at a time.

`streamed_module` builds the module from its config with parameters on the meta device, loads the small
rest (embeddings, norms, the output layers: the "shell") and leaves every block of its block lists empty.
A block reads its weights from the memory-mapped safetensors (`CheckpointTensors`) right before it runs and
drops them right after, so the model's peak is the shell, one block and the activations.

With a batch, `per_sample` runs a FLUX block sample by sample (one block read serves the whole batch, and
the activations are those of one sample): this is how calibration walks every prompt through block i before
reading block i + 1, and how a 24 GB host calibrates a 24 GB transformer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fluxexport.errors import FluxExportError
from fluxexport.models.checkpoint import CheckpointTensors
from fluxexport.models.meta import module_from_config, parameters_on_meta
from fluxexport.models.source import ModelSource

# the ModuleLists whose blocks stream, per module; everything else is the shell, loaded once
BLOCK_LISTS = {
    "transformer": ("transformer_blocks", "single_transformer_blocks"),
    "t5": ("encoder.block",),
    "clip": ("encoder.layers",),
    "vae": (),
}
# blocks whose forward takes keyword tensors with a leading batch axis (FLUX's double and single blocks)
PER_SAMPLE_LISTS = ("transformer_blocks", "single_transformer_blocks")


def _set_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    target._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _aliases(module: nn.Module) -> dict[int, list[str]]:
    """Every name a parameter goes by (tied ones have several: T5's `shared` / `encoder.embed_tokens`)."""
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return names


def load_parameters(
    module: nn.Module, names: list[list[str]], tensors: CheckpointTensors, dtype: torch.dtype, device: torch.device,
    prefix: str = "",
) -> None:  # fmt: skip
    """Give each parameter (listed with its aliases, relative to `module`) its checkpoint tensor."""
    for aliases in names:
        key = next((prefix + alias for alias in aliases if prefix + alias in tensors), None)
        if key is None:
            raise_missing(tensors, prefix + aliases[0])
        value = tensors.load(key, dtype).to(device)
        for alias in aliases:
            _set_parameter(module, alias, value)


def raise_missing(tensors: CheckpointTensors, name: str) -> None:
    raise FluxExportError(
        f"the {tensors.module} checkpoint has no tensor {name!r}: it does not fit its config "
        "(truncated download, or another model's weights)"
    )


def release_parameters(module: nn.Module) -> None:
    """Put every parameter of `module` back on the meta device: the block's memory is freed."""
    for submodule in module.modules():
        for leaf, parameter in submodule._parameters.items():
            if parameter is not None and parameter.device.type != "meta":
                submodule._parameters[leaf] = nn.Parameter(parameter.to("meta"), requires_grad=False)


def per_sample(forward: Callable) -> Callable:
    """A FLUX block's forward run one sample at a time: tensor keywords are sliced along the batch axis
    (the RoPE tuple, shared by all samples, is not) and the outputs concatenated back."""

    def run(*args, **kwargs):
        batch = kwargs["hidden_states"].shape[0]
        if args or batch == 1:
            return forward(*args, **kwargs)
        outputs = []
        for index in range(batch):
            sliced = {
                key: value[index : index + 1] if isinstance(value, torch.Tensor) and value.shape[:1] == (batch,)
                else value
                for key, value in kwargs.items()
            }  # fmt: skip
            outputs.append(forward(**sliced))
        if isinstance(outputs[0], torch.Tensor):
            return torch.cat(outputs)
        return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))

    return run


def stream_block(
    block: nn.Module, prefix: str, tensors: CheckpointTensors, dtype: torch.dtype, device: torch.device,
    one_sample_at_a_time: bool,
) -> None:  # fmt: skip
    """Hooks that load `block`'s weights (checkpoint names under `prefix`) before it runs and free them after."""
    names = list(_aliases(block).values())

    def load(_module, _args, _kwargs=None):
        load_parameters(block, names, tensors, dtype, device, prefix)

    def release(_module, _args, _kwargs, _output=None):
        release_parameters(block)

    block.register_forward_pre_hook(load, with_kwargs=True)
    block.register_forward_hook(release, with_kwargs=True, always_call=True)
    if one_sample_at_a_time:
        block.forward = per_sample(block.forward)  # type: ignore[method-assign]


def streamed_module(
    source: ModelSource, module: str, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> nn.Module:
    """`module` ("clip", "t5", "transformer", "vae") with its shell loaded and its blocks streamed, in eval mode."""
    device = torch.device(device)
    with parameters_on_meta():
        model = module_from_config(source, module, for_export=False)
    tensors = CheckpointTensors(source, module)
    blocks = {
        f"{list_name}.{index}": (block, list_name in PER_SAMPLE_LISTS)
        for list_name in BLOCK_LISTS[module]
        for index, block in enumerate(model.get_submodule(list_name))
    }
    in_blocks = {id(p) for block, _ in blocks.values() for p in block.parameters()}
    shell = [names for key, names in _aliases(model).items() if key not in in_blocks]
    load_parameters(model, shell, tensors, dtype, device)
    for buffer_owner in model.modules():
        for leaf, buffer in buffer_owner._buffers.items():
            if buffer is not None:
                converted = buffer.to(device, dtype) if buffer.is_floating_point() else buffer.to(device)
                buffer_owner._buffers[leaf] = converted
    for prefix, (block, one_sample_at_a_time) in blocks.items():
        stream_block(block, f"{prefix}.", tensors, dtype, device, one_sample_at_a_time)
    return model.eval()
