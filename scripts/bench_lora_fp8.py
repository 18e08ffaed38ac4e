"""What a LoRA costs an FP8 transformer when it is merged onto the base model's FP8 scales (what `fluxexport
refit` does to an FP8 engine, and the ONNX Runtime swap into an FP8 graph), against re-quantizing the merged
model (`quantize --lora`, scales calibrated on it). Measured in ONNX Runtime on CPU, on tiny-dev.

For LoRAs of growing strength (the relative change ‖ΔW‖/‖W‖ of the adapted weights), prints PSNR against the
float32 merged model (PyTorch), the transformer's rel-L2 error on that model's own step inputs and the image's
PSNR, of: the FP8 base graph with the LoRA swapped in (base scales), the FP8 graph quantized from the merged
model (its own scales), and the FP8 base without the LoRA (what ignoring the LoRA would cost); plus the share
of merged weights the base scales saturate (|w| > 448·scale).

    python scripts/bench_lora_fp8.py [--rank 4] [--steps 4] [--size 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from fluxexport.console import console, quiet_libraries, table

STRENGTHS = (0.0, 1.0, 2.0, 4.0, 8.0)  # LoRA scale applied to one file whose B·A is 2% of W at scale 1


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).double().norm() / b.double().norm()).item()


def saturated_share(folder: Path, merged_source) -> float:
    """Share of the merged FP8-quantized weights beyond the base graph's ±448·scale."""
    from fluxexport.artifacts.folders import open_export
    from fluxexport.dtypes import E4M3_MAX
    from fluxexport.models.checkpoint import CheckpointTensors

    weights = open_export(folder).fp8["transformer"].weights or {}
    tensors, loras = CheckpointTensors(merged_source.with_loras(()), "transformer"), merged_source.lora_set
    beyond = total = 0
    for origin in weights.values():
        if origin.fp8_scale is None or loras is None or not loras.touches("transformer", origin.tensor):
            continue
        merged = loras.merged("transformer", origin.tensor, tensors.load(origin.tensor, torch.float32))
        beyond += int((merged.abs() > E4M3_MAX * origin.fp8_scale).sum())
        total += merged.numel()
    return beyond / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    quiet_libraries()

    from fluxexport.compare import psnr
    from fluxexport.export.onnx_export import export_model
    from fluxexport.models.loaders import load_transformer
    from fluxexport.models.lora import parse_lora
    from fluxexport.models.source import resolve_model
    from fluxexport.models.tiny import write_random_lora
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings
    from fluxexport.quantize.qdq_export import quantize_transformer
    from fluxexport.runtime.pipeline import GenerationRequest, generate

    settings = CalibrationSettings(CALIBRATION_PROMPTS[:4], steps=args.steps, height=args.size, width=args.size)
    request = GenerationRequest("a red fox in the snow", height=args.size, width=args.size,
                                num_inference_steps=args.steps, seed=7)  # fmt: skip

    def image(backend, source):
        return generate(backend, source, request).images

    def fp8_graphs(source, folder: Path) -> Path:
        export_model(source, folder)
        quantize_transformer(source, folder, settings, base_dtype="fp32")
        return folder

    def reference(source):
        """The fp32 merged model's image, and the transformer's inputs and outputs at each step of it."""
        with TorchBackend(source, "fp32", "cpu") as backend:
            transformer, steps = backend.component("transformer"), []

            def recording(feeds):
                outputs = transformer(feeds)
                steps.append(({k: v.clone() for k, v in feeds.items()}, outputs["latent"].clone()))
                return outputs

            backend._components["transformer"] = recording
            return image(backend, source), steps

    def measured(backend, source, steps) -> tuple[float, np.ndarray]:
        """Mean rel-L2 of the FP8 transformer against fp32 on the reference's own step inputs, and the image."""
        transformer = backend.component("transformer")
        errors = [rel_l2(transformer(feeds)["latent"], expected) for feeds, expected in steps]
        return sum(errors) / len(errors), image(backend, source)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = resolve_model("tiny-dev")
        lora = write_random_lora(root / "lora.safetensors", load_transformer(base), args.rank, 0.02)
        console.print(f"exporting and quantizing tiny-dev (calibration: 4 prompts × {args.steps} steps) …")
        base_folder = fp8_graphs(base, root / "base")
        rows = []
        for strength in STRENGTHS:
            merged = base.with_loras([parse_lora(f"{lora}:{strength}")])
            expected, steps = reference(merged)
            with OnnxRuntimeBackend(merged, base_folder, fp8=True) as backend:
                swapped = measured(backend, merged, steps)
            with OnnxRuntimeBackend(base, base_folder, fp8=True) as backend:
                without = measured(backend, base, steps)
            requantized_folder = fp8_graphs(merged, root / f"merged-{strength}")
            with OnnxRuntimeBackend(merged, requantized_folder, fp8=True) as backend:
                requantized = measured(backend, merged, steps)
            cells = [
                f"{error:.2e} / {psnr(picture, expected):.1f}" for error, picture in (swapped, requantized, without)
            ]
            rows.append(
                [f"{strength:g}", f"{0.02 * strength:.0%}", *cells, f"{saturated_share(base_folder, merged):.2%}"]
            )
            console.print(f"scale {strength:g} done")
    console.print(table(
        f"LoRA on FP8, tiny-dev, rank {args.rank}, {args.size}², {args.steps} steps: transformer rel-L2 vs fp32 merged "
        "(mean over the steps) / image PSNR dB",
        ["LoRA scale", "‖ΔW‖/‖W‖", "base scales (refit, swap)", "re-quantized (quantize --lora)",
         "FP8 base without the LoRA", "saturated weights"],
        rows,
    ))  # fmt: skip


if __name__ == "__main__":
    main()
