"""`fluxexport optimize`: ONNX Runtime's own transformer optimizer over the exported graphs, for ONNX Runtime.

Each float32 graph goes through `onnxruntime.transformers.optimizer.optimize_model` with the model type ONNX
Runtime has for it (`mmdit` for the transformer, `t5`, `clip`, `vae`) and the fusion options of the target
provider (the CPU build lacks the CUDA-only GroupNorm/NhwcConv/packed-QKV kernels, so those fusions are off
for `--provider cpu`). No fusion is ours. The results, with `com.microsoft` ops, are written to `ort/` beside
the portable graphs and recorded in the manifest's `onnxruntime` section; the portable graphs, the ones
TensorRT gets, are untouched. Each optimized graph is checked against its portable graph in ONNX Runtime
(rel-L2 ≤ `PARITY`) before it is kept.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fluxexport.artifacts.files import file_sha256, now
from fluxexport.artifacts.folders import ExportFolder, open_export
from fluxexport.artifacts.records import GraphRecord
from fluxexport.atomic import staged_files
from fluxexport.compare import metrics
from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.onnxruntime.backend import PROVIDERS, create_session, session_runner
from fluxexport.specs import component_specs, sample_inputs, validation_sizes

FOLDER = "ort"
MODEL_TYPES = {"transformer": "mmdit", "t5": "t5", "clip": "clip", "vae_decoder": "vae", "vae_encoder": "vae"}
CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                     "enable_packed_qkv", "enable_packed_kv", "enable_bias_add")  # fmt: skip
PARITY = 1e-4  # rel-L2 of an optimized graph against its portable graph (fused kernels reorder float sums)


@dataclass(frozen=True)
class Optimized:
    """What `optimize` did to one component: ONNX Runtime's fusions (none: the portable graph runs), the
    optimized graph's worst rel-L2 against the portable one, and the seconds it took."""

    component: str
    fusions: dict[str, int]
    parity_rel_l2: float
    seconds: float


def _heads_and_width(source: ModelSource, name: str) -> tuple[int, int]:
    """What the optimizer's attention fusions need (0, 0 = let it detect, as for the VAE)."""
    if name == "transformer":
        c = source.transformer
        return c["num_attention_heads"], c["num_attention_heads"] * c["attention_head_dim"]
    if name == "t5":
        return source.t5["num_heads"], source.t5["d_model"]
    if name == "clip":
        return source.clip["num_attention_heads"], source.clip["hidden_size"]
    return 0, 0


@contextmanager
def quiet_optimizer() -> Iterator[None]:
    """Silence what ONNX Runtime's optimizer prints while it fuses: its `fusion` progress bars (tqdm, on stderr),
    its warnings (e.g. that fused LayerNorms need onnxruntime-gpu ≥ 1.21: the parity check below runs them here)
    and the `failed in shape inference` line it prints to stdout when its symbolic shape inference gives up (it
    then fuses without it). None of them is a failure; a real one raises."""
    ort_logger = logging.getLogger("onnxruntime.transformers")
    level = ort_logger.level
    ort_logger.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            yield
    finally:
        ort_logger.setLevel(level)


def fusion_options(name: str, provider: str):
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(MODEL_TYPES[name])
    if provider == "cpu":
        for flag in CUDA_ONLY_FUSIONS:
            setattr(options, flag, False)
    return options


def _parity(portable: Path, optimized: Path, graph: GraphRecord, spec, providers: list[str]) -> float:
    """Worst rel-L2 of the optimized graph against the portable one, at validate's three shapes per axis."""
    runs = [
        session_runner(create_session(path, providers=providers), graph, spec.name) for path in (portable, optimized)
    ]
    worst = 0.0
    for index, (sizes, _) in enumerate(validation_sizes(spec)):
        feeds = sample_inputs(spec, sizes, torch.float32, seed=index)
        expected, actual = (run(feeds) for run in runs)
        for key, value in expected.items():
            worst = max(worst, metrics(actual[key], value)[1])
    return worst


def optimize_graphs(
    source: ModelSource, engines: Path, provider: str = "cpu", components: list[str] | None = None,
    on_component: Callable[[Optimized], None] | None = None,
) -> ExportFolder:  # fmt: skip
    """Optimize the float32 graphs in `engines` for ONNX Runtime on `provider`; returns the folder. `on_component`
    hears what was done to each component."""
    from onnxruntime.transformers.optimizer import optimize_model

    from fluxexport.console import quiet_libraries

    if provider not in PROVIDERS:
        raise FluxExportError(f"unknown provider {provider!r}: choose cpu or cuda")
    engines = Path(engines)
    folder = open_export(engines)
    folder.check_made_from(source, "pass the same --model as at export")
    graphs = folder.components
    names = components or [name for name in graphs if name in MODEL_TYPES]
    unknown = [name for name in names if name not in graphs]
    if unknown:
        raise FluxExportError(f"{engines} has no {unknown[0]} graph (it has {', '.join(graphs)})")
    reduced = [name for name in names if graphs[name].dtype != "fp32"]
    if reduced:
        raise FluxExportError(
            f"{reduced[0]} in {engines} is {graphs[reduced[0]].dtype}: ONNX Runtime's optimizer takes the "
            "float32 export (export --dtype fp32)"
        )
    quiet_libraries()
    specs = component_specs(source)
    section = folder.optimized
    for name in names:
        graph = graphs[name]
        start = time.perf_counter()
        heads, width = _heads_and_width(source, name)
        with quiet_optimizer():
            model = optimize_model(
                str(engines / graph.file), model_type=MODEL_TYPES[name], num_heads=heads, hidden_size=width,
                optimization_options=fusion_options(name, provider), opt_level=0, use_gpu=provider == "cuda",
            )  # fmt: skip
        fusions = {op: count for op, count in model.get_fused_operator_statistics().items() if count}
        earlier = section.get(name)
        if not fusions:  # nothing for this provider: the portable graph runs, no copy is kept
            section.pop(name, None)
            folder.write()
            for file in earlier.files if earlier else ():
                (engines / file).unlink(missing_ok=True)
            if on_component:
                on_component(Optimized(name, {}, 0.0, round(time.perf_counter() - start, 2)))
            continue
        stale = [Path(file).name for file in earlier.files] if earlier else []
        with staged_files(engines / FOLDER, name, last=f"{name}.onnx", stale=stale) as staging:
            external = bool(graph.external_data)
            model.save_model_to_file(str(staging / f"{name}.onnx"), use_external_data_format=external,
                                     all_tensors_to_one_file=True)  # fmt: skip
            error = _parity(engines / graph.file, staging / f"{name}.onnx", graph, specs[name], PROVIDERS[provider])
            if not error <= PARITY:
                raise FluxExportError(
                    f"ONNX Runtime's optimizer changed {name}'s outputs (rel-L2 {error:.2e} > {PARITY:g}): kept the "
                    "portable graph; report it with the onnxruntime version"
                )
            files = sorted(path.name for path in staging.iterdir())
        data = next((f for f in files if f != f"{name}.onnx"), None)
        kept = {initializer.name for initializer in model.model.graph.initializer}
        seconds = round(time.perf_counter() - start, 2)
        # what survived fusion keeps its origin, so LoRAs can still be swapped in
        weights = None if graph.weights is None else {k: v for k, v in graph.weights.items() if k in kept}
        section[name] = replace(
            graph, file=f"{FOLDER}/{name}.onnx", external_data=f"{FOLDER}/{data}" if data else None,
            sha256={}, weights=weights, fusions=fusions, from_sha256=file_sha256(engines / graph.file),
            extra={"model_type": MODEL_TYPES[name], "provider": provider, "parity_rel_l2": error,
                   "optimize_seconds": seconds, "optimized_at": now()},  # for people
        )  # fmt: skip
        folder.write()
        if on_component:
            on_component(Optimized(name, fusions, error, seconds))
    return folder
