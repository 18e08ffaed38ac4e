"""`fluxexport refit`: LoRAs into built engines without rebuilding them (TensorRT's Refitter, by ONNX
initializer name), and back to the base weights with `--reset`.

A refit always starts from the base plan `build` wrote, which stays as it is: only the weights the LoRAs touch
are computed (base tensor + delta in float32, cast to the engine's weight type, laid out as the graph holds
them: `artifacts/weights.py`), set by name, and the refitted plan is written atomically beside the base one,
straight from TensorRT's serialized buffer (no second host copy of a plan that may weigh tens of GB).
A LoRA that adapts an FP8-quantized weight is refused: quantized with the base model's scales, the merged weight
saturates past the base amax; NVIDIA's guidance (ModelOpt, its diffusion demo) is to fuse the LoRA, then
quantize. FP8 engines still take LoRAs on the weights the recipe keeps in high precision, and unchanged FP8
weights TensorRT asks for are set to the graph's own bytes. The engine manifest then names the refitted plan, the
LoRA set and the merged model's fingerprint, so `run --lora …` finds it; `--reset` points back at the base.
The transformer's parts (First Block Cache's engines) are refitted like the transformer, each with the LoRA
deltas of the weights it holds; a part the LoRAs do not touch keeps its base plan.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fluxexport.artifacts.files import file_sha256, now
from fluxexport.artifacts.folders import EngineFolder, open_engines
from fluxexport.artifacts.records import GraphRecord
from fluxexport.artifacts.weights import refuse_unheld, sibling_tensors
from fluxexport.atomic import write_bytes_atomic
from fluxexport.errors import FluxExportError
from fluxexport.models.loaders import MODULE_OF
from fluxexport.models.source import ModelSource
from fluxexport.specs import TRANSFORMER_PARTS

if TYPE_CHECKING:  # typed by tensorrt-stubs
    import tensorrt as trt

REFITTABLE = ("transformer", "clip", *TRANSFORMER_PARTS)  # the components LoRAs adapt (the parts, for the cache)


def refit_plan_name(base_file: str) -> str:
    """`transformer_bf16.trt_10.13.plan` → `transformer_bf16.lora.trt_10.13.plan`."""
    stem, _, rest = base_file.partition(".trt_")
    return f"{stem}.lora.trt_{rest}" if rest else f"{Path(base_file).stem}.lora.plan"


def _initializer_values(graph_path: Path):
    """Initializer name → its values as a torch tensor of the graph's own type, read one at a time (external
    data stays on disk until read): the unchanged weights TensorRT may ask for again."""
    import onnx_ir as ir

    from fluxexport.dtypes import ELEMENT_TORCH

    initializers = ir.load(graph_path).graph.initializers

    def read(name: str) -> torch.Tensor | None:
        value = initializers.get(name)
        tensor = None if value is None else value.const_value
        dtype = None if tensor is None else ELEMENT_TORCH.get(tensor.dtype.name.lower())  # BFLOAT16 → bfloat16
        if tensor is None or dtype is None:
            return None
        raw = torch.frombuffer(bytearray(tensor.tobytes()), dtype=torch.uint8)
        return raw.view(dtype).reshape(tuple(int(d) for d in tensor.shape))

    return read


def refit_component(
    engine_file: Path, graph: GraphRecord, graph_path: Path, source: ModelSource, module: str,
    elsewhere: Collection[str] = (),
) -> tuple[trt.IHostMemory, int]:  # fmt: skip
    """The serialized plan (TensorRT's own buffer: write it as it is, never copy it) of `engine_file` with `source`'s LoRAs merged into the weights they touch (FP8
    weights quantized with the graph's scales), and how many weights were set. Weights TensorRT still reports
    missing afterwards (it may ask for unchanged ones too) are set to the graph's own values. `elsewhere`: the
    checkpoint tensors the engines of the transformer's other parts hold (LoRA layers this part lacks)."""
    import tensorrt as trt

    from fluxexport.artifacts.weights import merged_initializers
    from fluxexport.dtypes import torch_dtype
    from fluxexport.models.checkpoint import CheckpointTensors
    from fluxexport.tensorrt.backend import torch_dtype_of

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_file.read_bytes())
    if engine is None:
        raise FluxExportError(f"TensorRT cannot deserialize {engine_file.name}: rebuild it")
    refitter = trt.Refitter(engine, logger)
    base = CheckpointTensors(source.with_loras(()), module)
    dtype = torch_dtype(graph.base_dtype)
    held: list[torch.Tensor] = []  # TensorRT reads the host buffers during refit_cuda_engine: keep them

    def set_weights(initializer: str, tensor: torch.Tensor, fp8: bool) -> None:
        prototype = refitter.get_weights_prototype(initializer)
        if prototype.size < 0:
            raise FluxExportError(
                f"{engine_file.name}: TensorRT folded {initializer} into other layers at build time, so it cannot "
                "be refitted: merge this LoRA at export instead (fluxexport export --lora)"
            )
        if fp8 and prototype.dtype.name != "FP8":
            raise FluxExportError(
                f"{engine_file.name}: {initializer} is an FP8 weight of the graph, but the engine holds it as "
                f"{prototype.dtype.name}: rebuild the engine from this graph (fluxexport build --refittable)"
            )
        values = tensor.to(torch_dtype_of(prototype.dtype)).contiguous()
        if values.numel() != prototype.size:
            raise FluxExportError(
                f"{engine_file.name}: {initializer} holds {prototype.size} values, not {values.numel()}"
            )
        held.append(values)
        if not refitter.set_named_weights(initializer, trt.Weights(prototype.dtype, values.data_ptr(), values.numel())):
            raise FluxExportError(f"TensorRT refused new weights for {initializer} in {engine_file.name}")

    weights = graph.require_weight_origins("export it again, rebuild with --refittable, then refit")
    load = lambda tensor: base.load(tensor, dtype)  # noqa: E731
    merged = merged_initializers(weights, module, source.lora_set, load, graph.file, elsewhere)
    for initializer, tensor in merged:
        set_weights(initializer, tensor, weights[initializer].fp8_scale is not None)
    changed = len(held)
    unchanged = _initializer_values(graph_path)
    for initializer in refitter.get_missing_weights():
        tensor = unchanged(initializer)
        if tensor is None:
            raise FluxExportError(
                f"refitting {engine_file.name} needs {initializer}, which {graph_path.name} does not hold: "
                "rebuild the engine from this graph"
            )
        set_weights(initializer, tensor, tensor.dtype == torch.float8_e4m3fn)
    missing = refitter.get_missing_weights()
    if missing:
        raise FluxExportError(f"refitting {engine_file.name} leaves {missing[0]} unset: rebuild the engine")
    if not refitter.refit_cuda_engine():
        raise FluxExportError(f"TensorRT could not refit {engine_file.name} (see its log above)")
    return engine.serialize(), changed


def _refuse_fp8_loras(engine_file: str, graph: GraphRecord, source: ModelSource, module: str) -> None:
    """Refuse a LoRA that adapts an FP8-quantized weight of `graph` (NVIDIA's guidance: fuse, then quantize)."""
    lora_set = source.lora_set
    if lora_set is None or module not in lora_set.layers:
        return
    weights = graph.require_weight_origins("export it again, rebuild with --refittable, then refit")
    touched = [origin.tensor for origin in weights.values()
               if origin.fp8_scale is not None and lora_set.touches(module, origin.tensor)]  # fmt: skip
    if touched:
        loras = " ".join([f"--model {source.name}", *(f"--lora {lora.path}:{lora.scale:g}" for lora in source.loras)])
        raise FluxExportError(
            f"{engine_file} holds {touched[0]} in FP8: a refit would quantize the LoRA-merged weight with the base "
            f"model's scale; fuse the LoRAs before quantizing instead (fluxexport quantize {loras} --out NEW_ONNX, "
            f"then fluxexport build --precision fp8 {loras} --onnx NEW_ONNX), or refit bf16 engines"
        )


def _touched(name: str, graph: GraphRecord, source: ModelSource, elsewhere: Collection[str]) -> bool:
    """Whether `source`'s LoRAs change a weight of `name`'s engine. A whole component counts whenever the LoRAs
    adapt its module (refit refuses there a LoRA layer the graph lacks). A part of the transformer may hold none
    of the weights a LoRA adapts, and then keeps its base plan, once the LoRA layers are known to be held by it
    or by its sibling parts (`elsewhere`)."""
    module = MODULE_OF[name]
    if source.lora_set is None or module not in source.lora_set.layers:
        return False
    if name not in TRANSFORMER_PARTS:
        return True
    weights = graph.require_weight_origins("export it again, rebuild with --refittable, then refit")
    held = {origin.tensor for origin in weights.values()}
    refuse_unheld(source.lora_set, module, held | set(elsewhere), graph.file, siblings=True)
    return any(source.lora_set.touches(module, tensor) for tensor in held)


def refit_engines(source: ModelSource, engines: Path, reset: bool = False) -> EngineFolder:
    """Refit `engines` with `source`'s LoRAs (or, with `reset`, go back to the base plans); returns the folder."""
    from dataclasses import replace

    from fluxexport.tensorrt.environment import import_tensorrt, require_tensorrt_version

    engines = Path(engines)
    folder = open_engines(engines)
    if folder.model.base != source.with_loras(()).fingerprint():
        raise FluxExportError(
            f"the engines in {engines} were built from {folder.model.made_from(source)}: "
            "pass the same --model as at build time"
        )
    if not folder.refittable:
        raise FluxExportError(
            f"the engines in {engines} are not refittable: rebuild them with fluxexport build --refittable"
        )
    if not reset and not source.loras:
        raise FluxExportError("refit needs at least one --lora FILE[:SCALE] (or --reset for the base weights)")
    if not reset and source.lora_set is not None:  # a LoRA that widens the transformer's input: export only
        source.lora_set.refuse_widening(f"the engines in {engines}", source.with_loras(()).transformer)
    import_tensorrt()
    import tensorrt as trt

    require_tensorrt_version(trt)
    names = [name for name in REFITTABLE if name in folder.components]
    graphs = {} if reset else {name: folder.built_from(name) for name in names}
    for name, graph in graphs.items():  # before any plan is written
        _refuse_fp8_loras(folder.components[name].file, graph, source, MODULE_OF[name])
    for name in names:
        engine = folder.components[name]
        base_file = engine.base_plan
        extra = {key: value for key, value in engine.extra.items() if key != "refitted_at"}
        elsewhere = sibling_tensors(graphs, name, TRANSFORMER_PARTS)
        if reset or not _touched(name, graphs[name], source, elsewhere):
            if engine.file != base_file:
                (engines / engine.file).unlink(missing_ok=True)
            folder.components[name] = replace(engine, file=base_file, base_file=None, refitted_weights=None,
                                              engine_sha256=file_sha256(engines / base_file), extra=extra)  # fmt: skip
            continue
        plan, count = refit_component(engines / base_file, graphs[name], Path(engine.onnx), source, MODULE_OF[name],
                                      elsewhere)  # fmt: skip
        refitted = refit_plan_name(base_file)
        write_bytes_atomic(engines / refitted, memoryview(plan))  # IHostMemory's buffer, not a copy of it
        folder.components[name] = replace(
            engine, file=refitted, base_file=base_file, engine_sha256=file_sha256(engines / refitted),
            refitted_weights=count, extra=extra | {"refitted_at": now()},
        )  # fmt: skip
    folder.model = folder.model.with_loras(source.with_loras(()) if reset else source)
    folder.write()
    return folder
