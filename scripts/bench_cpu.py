"""CPU benchmark: our runtime on ONNX Runtime (portable and `optimize`d graphs) against diffusers' FluxPipeline,
eager and under torch.compile (inductor), same model, one run, all four interleaved.

A mid-size random FLUX (hidden 512 = 4×128, 2 double + 4 single blocks, T5/CLIP widths 512/256) is big
enough that the engines dominate. Prints per-stage medians, the end-to-end ratio and the runtime's own
per-step overhead (denoise time outside transformer calls) as a share of engine time.

    python scripts/bench_cpu.py [--repeats 5] [--size 512] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from fluxexport.console import console, quiet_libraries, table


class StageTimer:
    """Accumulates wall time per named callable; used to wrap engines and modules alike."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        return timed


class Timed:
    """A pipeline component behind a timer: calls are timed, attributes (config, dtype) come from the module."""

    def __init__(self, module, call):
        self.__dict__.update(module=module, call=call)

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


def bench_diffusers(pipeline, prompt: str, size: int, steps: int) -> dict[str, float]:
    """One image from a diffusers pipeline (eager or compiled), each component's calls timed from outside (a
    timer inside a compiled module would break its graph)."""
    timer = StageTimer()
    names = {"text_encoder": "clip", "text_encoder_2": "t5", "transformer": "transformer"}
    modules = {name: getattr(pipeline, name) for name in names}
    decode = pipeline.vae.decode
    for name, stage in names.items():
        pipeline.__dict__[name] = Timed(modules[name], timer.wrap(stage, modules[name]))
    pipeline.vae.decode = timer.wrap("vae_decoder", decode)
    try:
        start = time.perf_counter()
        pipeline(prompt, height=size, width=size, num_inference_steps=steps, max_sequence_length=256,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
        total = time.perf_counter() - start
    finally:
        pipeline.__dict__.update(modules)
        pipeline.vae.decode = decode
    return {**timer.seconds, "total": total}


def compiled_pipeline(pipeline):
    """What a PyTorch user tries first: torch.compile (inductor, CPU) on the text encoders, the transformer and
    the VAE decoder, fixed shapes."""
    for name in ("text_encoder", "text_encoder_2", "transformer"):
        pipeline.__dict__[name] = torch.compile(getattr(pipeline, name))
    pipeline.vae.decode = torch.compile(pipeline.vae.decode)
    return pipeline


def bench_runtime(backend, source, prompt: str, size: int, steps: int) -> dict[str, float]:
    from fluxexport.runtime.pipeline import GenerationRequest, generate

    timer = StageTimer()
    component = backend.component
    backend.component = lambda name: timer.wrap(name, component(name))
    try:
        result = generate(backend, source, GenerationRequest(prompt, height=size, width=size, num_inference_steps=steps,
                                                             max_sequence_length=256))  # fmt: skip
    finally:
        backend.component = component
    overhead = result.timings["denoise"] - timer.seconds["transformer"]
    return {**timer.seconds, "total": result.timings["total"], "runtime_overhead": overhead}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)

    from diffusers import FluxPipeline

    from fluxexport.export.onnx_export import export_model
    from fluxexport.models.source import load_folder
    from fluxexport.models.tiny import write_mid
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.onnxruntime.optimize import optimize_graphs

    prompt = "an astronaut riding a horse on the moon"
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "mid-schnell"
        console.print("building the mid-size model, exporting and optimizing it …")
        source = load_folder(write_mid(root))
        export_model(source, root / "onnx", ["clip", "t5", "transformer", "vae_decoder"])
        optimize_graphs(source, root / "onnx")

        def loaded():
            pipeline = FluxPipeline.from_pretrained(root)
            pipeline.set_progress_bar_config(disable=True)
            return pipeline

        eager, compiled = loaded(), compiled_pipeline(loaded())
        portable = OnnxRuntimeBackend(source, root / "onnx", optimized=False)
        optimized = OnnxRuntimeBackend(source, root / "onnx", optimized=True)
        contenders = {
            "diffusers eager": lambda: bench_diffusers(eager, prompt, args.size, args.steps),
            "torch.compile": lambda: bench_diffusers(compiled, prompt, args.size, args.steps),
            "ORT portable": lambda: bench_runtime(portable, source, prompt, args.size, args.steps),
            "ORT optimized": lambda: bench_runtime(optimized, source, prompt, args.size, args.steps),
        }
        first = {}
        for name, run in contenders.items():  # warm-up: sessions, allocators, and torch.compile's compilation
            start = time.perf_counter()
            run()
            first[name] = time.perf_counter() - start
            console.print(f"{name}: first run {first[name]:.1f} s")
        runs = {name: [] for name in contenders}
        for _ in range(args.repeats):  # interleaved, so that drift hits all alike
            for name, run in contenders.items():
                runs[name].append(run())

    def median(name, stage):
        return statistics.median(run.get(stage, 0.0) for run in runs[name])

    names = list(contenders)
    rows = []
    for stage in ["clip", "t5", "transformer", "vae_decoder", "total"]:
        eager = median("diffusers eager", stage)
        label = f"{stage} ({args.steps} steps)" if stage == "transformer" else stage
        rows.append([label, *(f"{median(n, stage) * 1000:.1f}" for n in names),
                     *(f"{eager / median(n, stage):.2f}×" for n in names[1:])])  # fmt: skip
    console.print(table(
        f"CPU ({torch.get_num_threads()} threads), {args.size}², {args.steps} steps, median of {args.repeats} (ms); "
        "speed-up vs diffusers eager",
        ["stage", *names, *(f"{n} ×" for n in names[1:])], rows,
    ))  # fmt: skip
    compile_seconds = first["torch.compile"] - median("torch.compile", "total")
    console.print(f"torch.compile's compilation (first run minus a warm one): {compile_seconds:.1f} s")
    for name in ("ORT portable", "ORT optimized"):
        overhead = median(name, "runtime_overhead") / args.steps
        engine = median(name, "transformer") / args.steps
        console.print(
            f"{name}: runtime overhead per step {overhead * 1000:.2f} ms = {100 * overhead / engine:.2f}% of the "
            f"transformer's {engine * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
