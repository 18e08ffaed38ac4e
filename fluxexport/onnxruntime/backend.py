"""ONNX Runtime backend: one InferenceSession per component, I/O named and typed by the manifest (= specs)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch

from fluxexport.artifacts.folders import FP8_COMPONENTS, open_export
from fluxexport.artifacts.published import SAMPLES, PublishedFolder, posterior_record, refuse_tensorrt_only
from fluxexport.artifacts.records import GraphRecord
from fluxexport.dtypes import ELEMENT_NUMPY
from fluxexport.errors import FluxExportError
from fluxexport.models.loaders import MODULE_OF
from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Component, Feeds, LoadedComponents, refuse_unknown_feeds
from fluxexport.runtime.request import ResolvedRequest
from fluxexport.specs import TRANSFORMER_PARTS

LORA_COMPONENTS = ("transformer", "clip", *TRANSFORMER_PARTS)  # the components whose weights LoRAs adapt
# Execution providers by where the graphs run; CPU always last, as ONNX Runtime's fallback
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise FluxExportError(
            "the onnxruntime backend needs ONNX Runtime: pip install 'fluxexport[onnx]' (or onnxruntime-gpu)"
        ) from None
    return onnxruntime


def default_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu has it, CPU always."""
    available = _import_onnxruntime().get_available_providers()
    return [p for p in PROVIDERS["cuda"] if p in available]


def session_runner(session, graph: GraphRecord, component: str = "graph") -> Component:
    """A Component around an InferenceSession whose I/O is described by the graph's record; a feed the graph
    does not take is refused (ONNX Runtime would only say "invalid input name")."""
    # bf16 inputs become float32 once upcast; fp16 graphs take float16 arrays
    inputs = {t.name: ELEMENT_NUMPY.get(t.dtype, np.float32) for t in graph.inputs}
    output_names = graph.output_names()

    def run(feeds: Feeds) -> Feeds:
        refuse_unknown_feeds(component, feeds, inputs)
        arrays = {
            key: feeds[key].detach().cpu().numpy().astype(dtype, copy=False)
            for key, dtype in inputs.items()
            if key in feeds
        }
        outputs = session.run(output_names, arrays)
        return {
            key: torch.from_numpy(np.asarray(value, dtype=np.float32))
            for key, value in zip(output_names, outputs, strict=True)
        }

    run.output_names = output_names  # type: ignore[attr-defined]  # what a step cache checks before a run
    return run


def ort_value(tensor: torch.Tensor, upcast: bool = False):
    """An OrtValue holding a CPU tensor: FP8 as FLOAT8E4M3FN bytes, reduced floats as float32 when the graph
    runs upcast."""
    import onnx

    onnxruntime = _import_onnxruntime()
    if tensor.dtype == torch.float8_e4m3fn:
        raw = tensor.view(torch.uint8).numpy()
        return onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, onnx.TensorProto.FLOAT8E4M3FN)
    if upcast or tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return onnxruntime.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor.numpy()))


def create_session(
    path: Path, upcast: bool = False, providers: list[str] | None = None, threads: int = 0, overrides=None,
    upcast_folder: Path | None = None,
):  # fmt: skip
    """An InferenceSession for a graph file; `upcast` runs a bf16 graph in float32 (its rounded weights), loaded
    from the float32 copy `write_upcast` writes into `upcast_folder` (kept there for the next session of the same
    graph), or, without one, into a temporary folder beside the graph that is removed once the session holds it;
    `overrides` (initializer name → CPU tensor, FP8 included) replace initializers when the session is created."""
    onnxruntime = _import_onnxruntime()
    options = onnxruntime.SessionOptions()
    values = [ort_value(tensor, upcast) for tensor in (overrides or {}).values()]
    for name, value in zip(overrides or {}, values, strict=True):
        options.add_initializer(name, value)
    options.log_severity_level = 3
    # Idle intra-op workers otherwise spin for a while after each run, taking the cores from the Python
    # code between engine calls (measured: ~10 ms of a 226 ms step on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if not Path(path).is_file():
        raise FluxExportError(f"{path} is missing: the export is incomplete, export again")
    providers = providers or default_providers()
    if upcast:
        from fluxexport.onnxruntime.upcast import upcast_folder_for, write_upcast

        # no CPU arena for these (validation's) sessions: each run's activations go back to the system after
        # it (measured, full-width transformer at 1024²: 8.1 GB peak, 2.8 GB after; with the arena 17 GB kept)
        options.enable_cpu_mem_arena = False
        with upcast_folder_for(Path(path), upcast_folder) as folder:
            upcast_path = write_upcast(Path(path), folder)
            session = onnxruntime.InferenceSession(str(upcast_path), options, providers=providers)
    else:
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    session._fluxexport_overrides = values  # the session reads replaced initializers from them: keep them alive
    return session


def lora_overrides(
    graph: GraphRecord, module: str, loras, base, elsewhere: Collection[str] = ()
) -> dict[str, torch.Tensor]:
    """Replacement initializers for `graph` with `loras` (a LoraSet) merged: only the weights the LoRAs touch,
    from `base` (checkpoint tensor name → its base values: the checkpoint's, or the graph's own where only graphs
    were shipped, `artifacts.weights.graph_base`), merged in float32 and laid out as the graph holds them (FP8
    weights quantized with the graph's own scales, as `refit` does for FP8 engines). `elsewhere`: the checkpoint
    tensors the graph's siblings hold (the transformer's other parts), which the LoRAs may adapt too. One code
    path for `run --lora` on base graphs and the Triton components' per-request LoRAs."""
    from fluxexport.artifacts.weights import merged_initializers

    weights = graph.require_weight_origins("export it again to swap LoRAs, or export with --lora")
    return dict(merged_initializers(weights, module, loras, base, graph.file, elsewhere))


def swapped_initializers(
    source: ModelSource, loras, module: str, graph: GraphRecord, elsewhere: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """`lora_overrides` from the base checkpoint of `source`, after its LoRAs are checked against the module.
    `elsewhere`: the checkpoint tensors the graph's sibling parts hold; None where they are not known here (one
    engine compared with its graph): then a part of the transformer takes the layers it holds, and the others
    are taken to be its siblings' (check_swap has checked them against the module)."""
    from fluxexport.artifacts.weights import check_swap
    from fluxexport.dtypes import torch_dtype
    from fluxexport.models.checkpoint import CheckpointTensors

    check_swap(source, module, graph)
    if elsewhere is None:
        part = _is_transformer_part(graph)
        elsewhere = {f"{layer}.weight" for layer in loras.layers.get(module, {})} if part else ()
    tensors = CheckpointTensors(source.with_loras(()), module)
    dtype = torch_dtype(graph.base_dtype)
    return lora_overrides(graph, module, loras, lambda tensor: tensors.load(tensor, dtype), elsewhere)


def _is_transformer_part(graph: GraphRecord) -> bool:
    """Whether `graph` is one of the transformer's parts: export names each graph after its component
    (`transformer_head.onnx`), quantize and optimize too (`transformer_head.fp8.onnx`, `onnxruntime/…`)."""
    return Path(graph.file).name.partition(".")[0] in TRANSFORMER_PARTS


class OnnxRuntimeBackend(LoadedComponents):
    """Runs exported graphs; the checkpoint supplies only tokenizers and configs. `close()` drops the sessions."""

    name = "onnxruntime"
    device = torch.device("cpu")  # ORT takes and returns host arrays, whichever provider runs them

    def __init__(
        self,
        source: ModelSource,
        engines: Path,
        providers: list[str] | None = None,
        threads: int = 0,
        upcast_bf16: bool = False,
        fp8: bool | None = None,
        optimized: bool | None = None,
        upcast_folder: Path | None = None,
    ):
        """`upcast_bf16`: run bf16 graphs in float32 (their bf16-rounded weights) instead of refusing them, from
        float32 copies written into `upcast_folder` (reused by the next backend given it) or a temporary folder.
        `fp8`: run `quantize`'s FP8 transformer (True), the base one (False), or the FP8 one if there is one.
        `optimized`: run `optimize`'s fused graphs (True), the portable ones (False), or the fused ones where
        they were made from the portable graphs now in the folder (None)."""
        super().__init__()
        self.source = source
        self.upcast_bf16 = upcast_bf16
        self.upcast_folder = upcast_folder
        self.engines = Path(engines)
        self.folder = open_export(self.engines)
        if isinstance(self.folder, PublishedFolder):
            self.upcast_bf16 = True  # BFL publishes bf16 graphs only: run them in float32, their bf16-rounded weights
        self.swapped = None  # the LoRAs applied at session creation (base graphs run with --lora)
        if self.folder.model.swaps_in(source):  # a LoRA that widens the transformer's input is merged at export only
            source.lora_set.refuse_widening(f"the graphs in {self.engines}", source.with_loras(()).transformer)
            self.swapped = source.lora_set
        else:
            self.folder.check_made_from(source)
        self.providers = providers or default_providers()
        self.threads = threads
        self.fp8 = fp8
        self.entries = self.folder.graphs(fp8, optimized)
        self.optimized = sorted(name for name, graph in self.entries.items() if graph.is_optimized)
        if optimized and not self.optimized:
            made = "stale (exported again since)" if self.folder.optimized else "none"
            raise FluxExportError(
                f"{self.engines} has no optimized graphs ({made}): run fluxexport optimize --model {source.name} "
                f"--engines {self.engines}"
            )

    def check_request(self, resolved: ResolvedRequest) -> None:
        """Refuse, before any work, FLUX.2 references past the reference budget this folder was exported for, and
        a T5 length a published folder's graphs do not take (`generate` asks, through
        `runtime.backend.check_request`)."""
        from fluxexport.specs import check_folder_serves

        check_folder_serves(self.source, self.folder, resolved)
        if isinstance(self.folder, PublishedFolder):
            self.folder.check_text_length(resolved.max_sequence_length)

    def set_loras(self, loras) -> None:
        """Swap LoRAs (LoraFile) in a long-lived backend: only the sessions whose weights they touch (the
        transformer's, CLIP's) are recreated, with the new weights; the other components stay loaded."""
        from fluxexport.models.lora import LoraSet

        previous = self.swapped
        self.swapped = LoraSet(loras, self.source.family.name) if loras else None
        touched = {"transformer", "clip"} if previous is None else set(previous.layers)
        touched |= set(self.swapped.layers) if self.swapped is not None else set()
        for name in LORA_COMPONENTS:
            if MODULE_OF[name] in touched:
                self._components.pop(name, None)

    def _lora_overrides(self, name: str, graph: GraphRecord) -> dict[str, torch.Tensor]:
        """The LoRAs' merged weights `name`'s graph holds; each part of the transformer takes those of its own
        weights (the LoRA layers it lacks are its sibling parts')."""
        module = MODULE_OF[name]
        if self.swapped is None or module not in self.swapped.layers:
            return {}
        from fluxexport.artifacts.weights import sibling_tensors

        elsewhere = sibling_tensors(self.entries, name, TRANSFORMER_PARTS)
        return swapped_initializers(self.source, self.swapped, module, graph, elsewhere)

    @property
    def transformer_graph(self) -> str:
        """Which transformer graph runs, in words (the CLI prints it)."""
        graph = self.entries.get("transformer")
        return "none" if graph is None else graph.describe()

    def _load(self, name: str) -> Component:
        entries = self.entries
        if name == "transformer" and name not in entries and self.fp8:
            raise FluxExportError(
                f"{self.engines} has no FP8 transformer: run fluxexport quantize --model {self.source.name} "
                f"--dtype fp32 --out {self.engines}"
            )
        if name in FP8_COMPONENTS and name not in entries and self.folder.runs_fp8(self.fp8):
            raise FluxExportError(
                f"{self.engines} has no FP8 {name} graph to run beside the FP8 transformer: run fluxexport "
                f"quantize --model {self.source.name} --dtype fp32 --transformer-parts --out {self.engines}, or run "
                "with --no-fp8"
            )
        if name not in entries:
            fix = f"--components {','.join(TRANSFORMER_PARTS) if name in TRANSFORMER_PARTS else name}"
            why = " (the parts --cache first-block, magcache and teacache run)" if name in TRANSFORMER_PARTS else ""
            raise FluxExportError(
                f"{self.engines} has no {name} graph (it has {', '.join(entries) or 'none'}): "
                f"run fluxexport export --model {self.source.name} --dtype {self.folder.dtype} {fix} "
                f"--out {self.engines}{why}"
            )
        graph = entries[name]
        refuse_tensorrt_only(graph, name, self.engines)  # a published graph with TensorRT's own ops
        bf16 = graph.base_dtype == "bf16"  # an FP8 graph computes the rest in its base
        if bf16 and not self.upcast_bf16:
            what = "a bf16 graph" if graph.dtype == "bf16" else f"an {graph.dtype} graph on a bf16 base"
            raise FluxExportError(
                f"{name} in {self.engines} is {what}, which ONNX Runtime cannot run on CPU: run it with "
                f"TensorRT, or {self._fp32_fix(graph)} for onnxruntime"
            )
        overrides = self._lora_overrides(name, graph)
        copy = bf16 or bool(graph.extra.get(SAMPLES))  # a published encoder's copy gives the posterior, not a draw
        session = self._session(self.engines / graph.file, copy, overrides)
        return session_runner(session, posterior_record(graph), name)

    def _fp32_fix(self, graph: GraphRecord) -> str:
        """The command that gives ONNX Runtime on CPU an fp32 graph in place of `graph` (a bf16 one)."""
        if graph.dtype == "fp8":  # quantize's graph on a bf16 base: quantize again on an fp32 one, same folder
            saved = self.engines / str(graph.extra.get("quantization", {}).get("calibration", ""))
            reuse = f" --calibration {saved}" if saved.is_file() else ""  # its scales: no calibration runs
            return f"fluxexport quantize --model {self.source.name} --dtype fp32{reuse} --out {self.engines}"
        return f"fluxexport export --model {self.source.name} --dtype fp32 --out DIR and run --engines DIR"

    def _session(self, path: Path, upcast: bool = False, overrides: dict | None = None):
        return create_session(path, upcast, self.providers, self.threads, overrides, self.upcast_folder)
