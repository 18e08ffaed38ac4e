"""The weights a LoRA set changes, as a graph or an engine holds them: one code path for the ONNX Runtime swap,
the Triton components' per-request swap and TensorRT refit.

The export manifest records, per initializer, the checkpoint tensor it holds and its transpose (`perm`), and for
`quantize`'s FP8 weights the DequantizeLinear scale (`fp8_scale`). A merged weight is the base tensor + the LoRA
delta in float32, cast back to the graph's base dtype, transposed as the graph holds it and, for FP8 weights,
quantized with the stored scale (the export's own rounding: x / scale, saturated to ±448). The scale is not
re-calibrated: a merged weight beyond the base weight's amax saturates (`scripts/bench_lora_fp8.py` measures it).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import numpy as np
import torch

from fluxexport.artifacts.records import GraphRecord, WeightOrigin
from fluxexport.dtypes import quantize_e4m3
from fluxexport.errors import FluxExportError
from fluxexport.models.lora import LoraSet

BaseTensor = Callable[[str], torch.Tensor]  # checkpoint tensor name → its base values, in the graph's base dtype


def check_swap(source, module: str, graph: GraphRecord) -> dict[str, WeightOrigin]:
    """Refuse (one line), before any weight is read, LoRAs of `source` (a ModelSource with LoRAs) that do not
    fit `module`, or a graph that does not record where its weights come from; returns those origins."""
    from fluxexport.models.meta import weightless_module

    if source.lora_set is not None:  # a LoRA that widens the transformer's input is merged at export only
        source.lora_set.refuse_widening(graph.file, source.with_loras(()).transformer)
    weightless_module(source, module)  # refuses LoRAs that do not fit it
    return graph.require_weight_origins("export it again to swap LoRAs, or export with --lora")


def refuse_unheld(loras: LoraSet, module: str, held: Collection[str], graph: str, siblings: bool = False) -> None:
    """Refuse (one line) a LoRA layer of `module` whose weight is not among the checkpoint tensors `held` (by
    `graph`, and with `siblings` by the transformer's other parts too)."""
    missing = [f"{layer}.weight" for layer in loras.layers.get(module, {}) if f"{layer}.weight" not in held]
    if missing:
        where = f"{graph} (nor any other part of the transformer)" if siblings else graph
        raise FluxExportError(f"{where} has no initializer for {missing[0]}: export with --lora instead")


def sibling_tensors(graphs: dict[str, GraphRecord], name: str, parts: Collection[str]) -> set[str]:
    """The checkpoint tensors held by the graphs of `parts` (the transformer's, for First Block Cache) other than
    `name`'s: a LoRA layer one part lacks is another's. Empty when `name` is not one of `parts`."""
    if name not in parts:
        return set()
    others = [graph for part, graph in graphs.items() if part in parts and part != name]
    return {origin.tensor for graph in others for origin in (graph.weights or {}).values()}


def merged_initializers(
    weights: dict[str, WeightOrigin], module: str, loras: LoraSet, base: BaseTensor, graph: str,
    elsewhere: Collection[str] = (),
) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """(initializer name, merged values in the graph's layout and type) for each initializer the LoRAs touch,
    one at a time; refuses (one line) a LoRA layer the graph holds no initializer for (`graph` names it), unless
    its weight is `elsewhere`: a checkpoint tensor a sibling graph holds (one part of the transformer holds some
    of the weights a LoRA adapts, the other parts the rest)."""
    held = {origin.tensor for origin in weights.values()} | set(elsewhere)
    refuse_unheld(loras, module, held, graph, siblings=bool(elsewhere))
    for initializer, origin in weights.items():
        if not loras.touches(module, origin.tensor):
            continue
        values = base(origin.tensor)
        merged = loras.merged(module, origin.tensor, values)
        if merged.shape != values.shape:  # a LoRA widened it (callers with the model refuse it earlier)
            raise loras.widening_error(origin.tensor.removesuffix(".weight"), graph)
        if origin.perm:
            merged = merged.permute(origin.perm)
        if origin.fp8_scale is not None:
            merged = quantize_e4m3(merged, torch.tensor(origin.fp8_scale, dtype=torch.float32))
        yield initializer, merged.contiguous()


def graph_base(path: Path, weights: dict[str, WeightOrigin]) -> BaseTensor:
    """Base tensors read back from a graph's own initializers (un-transposed): LoRAs can be swapped where only
    the graphs were shipped (a Triton repository). Not for FP8 weights, whose base values the graph lacks."""
    import onnx_ir as ir

    if any(origin.fp8_scale is not None for origin in weights.values()):
        raise FluxExportError(f"{path.name} holds FP8 weights: LoRAs need the base weights (the checkpoint)")
    initializers = ir.load(path).graph.initializers  # external data stays on disk until read
    by_tensor = {origin.tensor: (name, origin.perm) for name, origin in weights.items()}

    def read(tensor: str) -> torch.Tensor:
        name, perm = by_tensor[tensor]
        values = initializers[name].const_value
        array = values.numpy()
        result = torch.from_numpy(np.asarray(array, dtype=np.float32).copy())
        if values.dtype == ir.DataType.BFLOAT16:
            result = result.to(torch.bfloat16)
        elif values.dtype == ir.DataType.FLOAT16:
            result = result.to(torch.float16)
        return result.permute(np.argsort(perm).tolist()) if perm else result

    return read
