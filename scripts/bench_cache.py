"""What step caching buys: wall time, computed transformer steps and image PSNR against no cache, per setting.

The mid-size random model of `bench_cpu.py` with FLUX.1-dev's kind (guidance, resolution-shifted schedule) on
ONNX Runtime (the portable graphs and the transformer in parts), FLUX.1-dev's 28 steps. All settings run in one
process, interleaved, median of the repeats. MagCache's ratios are calibrated first on the same graphs (two other
prompts, every step computed), as a user calibrates a checkpoint once. Random weights make the quality column
indicative only: a trained model's steps change differently, so thresholds compute other step counts there.

Beside it, a paper estimate for FLUX.1-dev at 1024² on an H100 from ARCHITECTURE.md's FLOP model: 74.4 TFLOP
per transformer step, 75 ms at dense BF16 peak; a step First Block Cache skips still runs the head (the embedders
and one of 57 blocks), as does one MagCache or TeaCache skips; one TaylorSeer predicts costs nothing. The caches
that run the transformer in parts pay the parts' overhead over the single graph on every step: measured here on
the PyTorch backend on CPU (the same model, every step through the parts against the single transformer), and
applied to their estimate as a fraction of the step.

    COLUMNS=200 python scripts/bench_cache.py [--repeats 5] [--size 256] [--steps 28] [--backend onnxruntime|torch]

`--backend torch` runs everything on the PyTorch backend on CPU instead (no export: the quality column and the
parts' overhead in minutes where exporting the mid-size model is slow).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from fluxexport.console import console, quiet_libraries, table

# first-block:threshold=0 computes every step through the three parts: what the parts cost over the single graph
SETTINGS = ("none", "first-block:threshold=0", "taylorseer", "taylorseer:interval=3,warmup=2",
            "first-block:threshold=0.2", "first-block:threshold=0.5", "first-block:threshold=1",
            "magcache", "magcache:threshold=0.2", "magcache:threshold=0.5,max_skip_steps=5",
            "teacache", "teacache:threshold=0.6", "teacache:threshold=1")  # fmt: skip
PARTS_CACHES = ("first-block", "magcache", "teacache")  # what runs the transformer in parts
H100_STEP_MS = 75.0  # FLUX.1 at 1024², 512 text tokens: 74.4 TFLOP at ~990 TFLOP/s dense BF16
HEAD_SHARE = 1 / 57  # a skipped First Block Cache or MagCache step runs one of FLUX.1's 57 blocks (embedders aside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime")
    args = parser.parse_args()
    quiet_libraries()

    from fluxexport.compare import psnr
    from fluxexport.export.onnx_export import export_model
    from fluxexport.models.source import load_folder
    from fluxexport.models.tiny import write_mid
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS
    from fluxexport.runtime.magcache import write_ratios
    from fluxexport.runtime.pipeline import GenerationRequest, calibrate_mag_ratios, generate
    from fluxexport.specs import COMPONENTS, TRANSFORMER_PARTS

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "mid-dev"
        source = load_folder(write_mid(root, "tiny-dev"))
        if args.backend == "torch":
            from fluxexport.pytorch.backend import TorchBackend

            backend = TorchBackend(source, device="cpu")
        else:
            console.print("exporting the mid-size dev model and its transformer in parts …")
            export_model(source, root / "onnx", [*COMPONENTS, *TRANSFORMER_PARTS])
            backend = OnnxRuntimeBackend(source, root / "onnx")
        request = GenerationRequest("a red fox in the snow", height=args.size, width=args.size,
                                    num_inference_steps=args.steps, seed=0)  # fmt: skip
        calibration = GenerationRequest(list(CALIBRATION_PROMPTS[:2]), height=args.size, width=args.size,
                                        num_inference_steps=args.steps, seed=1)  # fmt: skip
        ratios = write_ratios(root / "magcache.json", calibrate_mag_ratios(backend, source, calibration))
        caches = {text: _settings(text, ratios, args.steps) for text in SETTINGS}
        generate(backend, source, request, cache=caches["first-block:threshold=0.2"])  # load every session
        runs: dict[str, list] = {text: [] for text in SETTINGS}
        for _ in range(args.repeats):
            for text, cache in caches.items():
                runs[text].append(generate(backend, source, request, cache=cache))
        overhead = parts_overhead(source, request, args.repeats)

    def median(text: str, stage: str) -> float:
        return 1000 * statistics.median(result.timings[stage] for result in runs[text])

    console.print(f"the parts' overhead over the single transformer, PyTorch on CPU: {100 * overhead:.1f}% per step")
    rows, base = [], median("none", "denoise")
    reference = runs["none"][0].images
    for text in SETTINGS:
        computed = runs[text][0].computed_steps
        skipped = args.steps - computed
        parts = text.startswith(PARTS_CACHES)
        head = HEAD_SHARE if parts else 0.0
        estimate = H100_STEP_MS * (computed + skipped * head + (args.steps * overhead if parts else 0.0))
        quality = psnr(runs[text][0].images, reference)
        rows.append([
            text, f"{computed}/{args.steps}", f"{median(text, 'denoise'):.0f}", f"{median(text, 'total'):.0f}",
            f"{base / median(text, 'denoise'):.2f}×", "same" if quality == float("inf") else f"{quality:.1f}",
            f"{estimate:.0f}", f"{H100_STEP_MS * args.steps / estimate:.2f}×",
        ])  # fmt: skip
    runner = "PyTorch" if args.backend == "torch" else "ONNX Runtime"
    title = f"step caches · mid-size dev model · {args.size}² · {args.steps} steps · {runner} CPU"
    columns = ["--cache", "computed", "denoise ms", "total ms", "denoise ×", "PSNR vs none dB",
               "H100 est. denoise ms", "H100 est. ×"]  # fmt: skip
    console.print(table(title, columns, rows))


def parts_overhead(source, request, repeats: int) -> float:
    """(denoise time through the three parts, every step computed) / (through the single transformer) − 1, on the
    PyTorch backend on CPU, median of `repeats` interleaved pairs."""
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.runtime.cache import parse_cache
    from fluxexport.runtime.pipeline import generate

    backend = TorchBackend(source, device="cpu")
    every_step = parse_cache("first-block:threshold=0")
    generate(backend, source, request, cache=every_step)  # load the parts and the transformer
    generate(backend, source, request)
    parts, whole = [], []
    for _ in range(repeats):
        parts.append(generate(backend, source, request, cache=every_step).timings["denoise"])
        whole.append(generate(backend, source, request).timings["denoise"])
    return statistics.median(parts) / statistics.median(whole) - 1


def _settings(text: str, ratios: Path, steps: int):
    """A row's cache; magcache's with the calibrated ratios and the run's step count."""
    from dataclasses import replace

    from fluxexport.runtime.cache import parse_cache

    if not text.startswith("magcache"):
        return parse_cache(text)
    return replace(parse_cache(f"{text}{',' if ':' in text else ':'}ratios={ratios}"), steps=steps)


if __name__ == "__main__":
    main()
