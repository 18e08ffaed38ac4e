"""CPU benchmark: our runtime on ONNX Runtime against diffusers' eager FluxPipeline, same model, one run.

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

MID_SHAPE = dict(
    heads=4, head_dim=128, rope_axes=(16, 56, 56), double_blocks=2, single_blocks=4, text_width=512,
    clip_width=256, text_layers=4, vae_channels=(32, 64, 128, 128), vae_groups=32,
)  # fmt: skip


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


def bench_diffusers(pipeline, prompt: str, size: int, steps: int) -> dict[str, float]:
    timer = StageTimer()
    patched = [(pipeline.text_encoder, "forward", "clip"), (pipeline.text_encoder_2, "forward", "t5"),
               (pipeline.transformer, "forward", "transformer"), (pipeline.vae, "decode", "vae_decoder")]  # fmt: skip
    originals = [getattr(target, attribute) for target, attribute, _ in patched]
    for (target, attribute, stage), original in zip(patched, originals, strict=True):
        setattr(target, attribute, timer.wrap(stage, original))
    try:
        start = time.perf_counter()
        pipeline(prompt, height=size, width=size, num_inference_steps=steps, max_sequence_length=256,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
        total = time.perf_counter() - start
    finally:
        for (target, attribute, _), original in zip(patched, originals, strict=True):
            setattr(target, attribute, original)
    return {**timer.seconds, "total": total}


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

    from fluxexport.backends.onnxruntime_backend import OnnxRuntimeBackend
    from fluxexport.export.onnx_export import export_model
    from fluxexport.models.source import load_folder
    from fluxexport.models.tiny import ModelShape, build_tiny_pipeline

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "mid-schnell"
        console.print("building the mid-size model and exporting it …")
        build_tiny_pipeline("tiny-schnell", ModelShape(**MID_SHAPE)).save_pretrained(root)
        source = load_folder(root)
        export_model(source, root / "onnx", ["clip", "t5", "transformer", "vae_decoder"])
        pipeline = FluxPipeline.from_pretrained(root)
        pipeline.set_progress_bar_config(disable=True)
        backend = OnnxRuntimeBackend(source, root / "onnx")
        prompt = "an astronaut riding a horse on the moon"
        bench_runtime(backend, source, prompt, args.size, args.steps)  # warm-up: sessions, allocators
        bench_diffusers(pipeline, prompt, args.size, args.steps)
        runs = {"diffusers": [], "fluxexport": []}
        for _ in range(args.repeats):  # interleaved, so that drift hits both alike
            runs["diffusers"].append(bench_diffusers(pipeline, prompt, args.size, args.steps))
            runs["fluxexport"].append(bench_runtime(backend, source, prompt, args.size, args.steps))

    def median(name, stage):
        return statistics.median(run.get(stage, 0.0) for run in runs[name])

    stages = ["clip", "t5", "transformer", "vae_decoder", "total"]
    rows = []
    for stage in stages:
        d, f = median("diffusers", stage), median("fluxexport", stage)
        label = f"{stage} ({args.steps} steps)" if stage == "transformer" else stage
        rows.append([label, f"{d * 1000:.1f}", f"{f * 1000:.1f}", f"{d / f:.2f}×"])
    console.print(table(f"CPU, {args.size}², {args.steps} steps, median of {args.repeats} (ms)",
                        ["stage", "diffusers eager", "fluxexport + ORT", "speed-up"], rows))  # fmt: skip
    overhead = median("fluxexport", "runtime_overhead") / args.steps
    engine = median("fluxexport", "transformer") / args.steps
    console.print(
        f"runtime overhead per step: {overhead * 1000:.2f} ms = {100 * overhead / engine:.2f}% of the transformer's {engine * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
