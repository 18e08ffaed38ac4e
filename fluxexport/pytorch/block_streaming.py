"""Run a model that does not fit in memory: its blocks are read from the checkpoint one at a time.

`streamed_module` builds the module from its config with parameters on the meta device, loads the small
rest its adapter runs (embeddings, norms, the output layers: the "shell") and leaves every block of its block
lists empty. A block reads its weights from the memory-mapped safetensors (`CheckpointTensors`) right before it
runs and drops them right after, so the model's peak is the shell, one block and the activations.

FLUX.2's text encoder streams its LM's decoder layers. Its adapter runs the decoder stack only up to the deepest
layer read (`TextEncoderAdapter`), and the shell is what that stack runs: the LM head, a VLM's vision tower and
projector, the layers past the deepest read and a cut-off final norm are never read and stay on meta. FLUX.2
[dev]'s Mistral-Small-3.2-24B (48 GB in bf16) then holds its 1.3 GB embedding table and one 1.1 GB layer.

With a batch, `per_sample` runs a FLUX block sample by sample (one block read serves the whole batch, and
the activations are those of one sample): this is how calibration walks every prompt through block i before
reading block i + 1, and how a 24 GB host calibrates a 24 GB transformer. The LM's decoder layers run the
batch whole (their keyword tensors are masks and rotary tables, not FLUX's per-sample streams).

A bf16 checkpoint run in float32 keeps its tensors in bf16 while they are held (the shells, FLUX's blocks, the
LM's decoder layers) and each leaf module's parameters are upcast only while that module runs (`compute_in`):
half the memory, the same numbers as the whole float32 model, since bf16 → float32 is exact and each of these
modules reads only its own weights. In Qwen3's and Mistral's layers the RMSNorms normalise in float32 and cast
back to their input's dtype (float32) before multiplying by their own weight, the rotary tables take the dtype
of the embeddings (float32: the Embedding's output is cast), and attention and MLP are Linears. T5's and CLIP's
blocks are loaded in float32 instead: their modules read other modules' weight dtypes (T5's feed-forward casts
its input to `wo.weight.dtype`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fluxexport.adapters import adapter_for
from fluxexport.models.checkpoint import CheckpointTensors
from fluxexport.models.meta import parameter_aliases, weightless_module
from fluxexport.models.source import ModelSource

# the ModuleLists whose blocks stream, per module; everything else the module runs is the shell, loaded once.
# FLUX.2's text encoder streams its LM's decoder layers, found where the LM keeps them (`streamed_parts`)
BLOCK_LISTS = {
    "transformer": ("transformer_blocks", "single_transformer_blocks"),
    "t5": ("encoder.block",),
    "clip": ("encoder.layers",),
    "vae": (),
}
# modules whose blocks take keyword tensors with a leading batch axis (FLUX's double and single blocks)
PER_SAMPLE_MODULES = ("transformer",)
# modules whose blocks keep the checkpoint's narrower dtype while held (their modules read only their own weights)
NARROW_MODULES = ("transformer", "text_encoder")


def held_dtype(stored: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """The dtype a tensor is held in: as stored when that is a narrower float than `compute`."""
    narrower = stored.is_floating_point and compute.is_floating_point and stored.itemsize < compute.itemsize
    return stored if narrower else compute


def compute_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Hooks that run every leaf module in `dtype` whatever its parameters are held in: an Embedding gathers
    in its own dtype and casts the rows; any other module's parameters are upcast while it runs."""
    for module in model.modules():
        if not module._parameters:
            continue
        if isinstance(module, nn.Embedding):
            module.register_forward_hook(lambda _m, _args, output: output.to(dtype))
            continue
        held: dict[str, nn.Parameter] = {}

        def upcast(module, _args, held=held):
            for leaf, parameter in module._parameters.items():
                if parameter is not None and parameter.dtype != dtype and parameter.is_floating_point():
                    held[leaf] = parameter
                    module._parameters[leaf] = nn.Parameter(parameter.to(dtype), requires_grad=False)

        def restore(module, _args, _output, held=held):
            module._parameters.update(held)
            held.clear()

        module.register_forward_pre_hook(upcast)
        module.register_forward_hook(restore, always_call=True)


def _set_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    target._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def load_parameters(
    module: nn.Module, names: list[list[str]], tensors: CheckpointTensors, dtype: torch.dtype, device: torch.device,
    prefix: str = "", keep_narrower: bool = False,
) -> None:  # fmt: skip
    """Give each parameter (listed with its aliases, relative to `module`) its checkpoint tensor, in `dtype`
    (or, with `keep_narrower`, in the checkpoint's own dtype when that is narrower)."""
    for aliases in names:
        value = tensors.load(tensors.first_of([prefix + alias for alias in aliases]))
        value = value.to(device, held_dtype(value.dtype, dtype) if keep_narrower else dtype)
        for alias in aliases:
            _set_parameter(module, alias, value)


def release_parameters(module: nn.Module) -> None:
    """Put every parameter of `module` back on the meta device: the block's memory is freed."""
    for submodule in module.modules():
        for leaf, parameter in submodule._parameters.items():
            if parameter is not None and parameter.device.type != "meta":
                submodule._parameters[leaf] = nn.Parameter(parameter.to("meta"), requires_grad=False)


def _concatenated(outputs: list):
    """Per-sample outputs (tensors, tuples or dicts of them) joined along the batch axis."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, dict):
        return {name: torch.cat([output[name] for output in outputs]) for name in first}
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


def run_per_sample(run: Callable[[dict], Any], inputs: dict, batch: int, batched: Callable[[str, Any], bool]):
    """`run` on each sample of `inputs` (the entries `batched` names sliced along the batch axis, the others as
    they are), the outputs concatenated: the activations, and the numerics, of batch-1 runs."""
    if batch == 1:
        return run(inputs)
    slices = [{k: v[i : i + 1] if batched(k, v) else v for k, v in inputs.items()} for i in range(batch)]
    return _concatenated([run(sliced) for sliced in slices])


def per_sample(forward: Callable) -> Callable:
    """A FLUX block's forward run one sample at a time: tensor keywords with the batch axis are sliced (the RoPE
    tuple, shared by all samples, is not)."""

    def run(*args, **kwargs):
        if args:
            return forward(*args, **kwargs)
        batch = kwargs["hidden_states"].shape[0]

        def batched(_key, value) -> bool:
            return isinstance(value, torch.Tensor) and value.shape[:1] == (batch,)

        return run_per_sample(lambda sliced: forward(**sliced), kwargs, batch, batched)

    return run


def stream_block(
    block: nn.Module, prefix: str, tensors: CheckpointTensors, dtype: torch.dtype, device: torch.device,
    one_sample_at_a_time: bool = False, keep_narrower: bool = False,
) -> None:  # fmt: skip
    """Hooks that load `block`'s weights (checkpoint names under `prefix`) before it runs and free them after;
    a FLUX block runs `one_sample_at_a_time`; `keep_narrower` holds the checkpoint's narrower dtype."""
    names = list(parameter_aliases(block).values())

    def load(_module, _args, _kwargs=None):
        load_parameters(block, names, tensors, dtype, device, prefix, keep_narrower)

    def release(_module, _args, _kwargs, _output=None):
        release_parameters(block)

    block.register_forward_pre_hook(load, with_kwargs=True)
    block.register_forward_hook(release, with_kwargs=True, always_call=True)
    if one_sample_at_a_time:
        block.forward = per_sample(block.forward)  # type: ignore[method-assign]


def streamed_parts(source: ModelSource, module: str, model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """(the part of `model` its adapter runs, the blocks of that part which stream). FLUX.2's text encoder runs its
    LM's decoder stack cut after the deepest layer read, the adapter's own cut (Qwen3's `model.layers`, Mistral3's
    `model.language_model.layers`); the other modules run whole."""
    if module == "text_encoder":
        stack = adapter_for(source, module, model).stack  # the family's text-encoder adapter cuts it
        return stack, list(stack.layers)
    return model, [block for name in BLOCK_LISTS[module] for block in model.get_submodule(name)]


def streamed_module(
    source: ModelSource, module: str, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> nn.Module:
    """`module` ("clip", "t5", "transformer", "vae", "text_encoder") with its shell loaded and its blocks streamed,
    in eval mode, computing in `dtype`; what its adapter never runs stays on meta, unread."""
    device = torch.device(device)
    model = weightless_module(source, module, for_export=False)
    tensors = CheckpointTensors(source, module)
    runs, blocks = streamed_parts(source, module, model)
    ran = {id(p) for p in runs.parameters()}
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    shell = [names for key, names in parameter_aliases(model).items() if key in ran and key not in in_blocks]
    load_parameters(model, shell, tensors, dtype, device, keep_narrower=True)
    tensors.load_buffers(model, dtype)  # FLUX.2's VAE batch-norm statistics; the others keep the config's values
    for buffer_owner in model.modules():
        for leaf, buffer in buffer_owner._buffers.items():
            if buffer is not None:
                converted = buffer.to(device, dtype) if buffer.is_floating_point() else buffer.to(device)
                buffer_owner._buffers[leaf] = converted
    prefixes = {id(submodule): name for name, submodule in model.named_modules()}
    one_sample_at_a_time, keep_narrower = module in PER_SAMPLE_MODULES, module in NARROW_MODULES
    for block in blocks:
        stream_block(block, f"{prefixes[id(block)]}.", tensors, dtype, device, one_sample_at_a_time, keep_narrower)
    compute_in(model, dtype)
    return model.eval()
