"""What changing LoRAs costs on ONNX Runtime: the swap (merge the touched weights, recreate the transformer's
session) against loading the base session and against exporting a merged transformer, on the mid-size model
(`bench_cpu.py`'s) with a rank-16 LoRA on every block Linear. Median of 3, 2-core machine.

    python scripts/bench_lora_swap.py [--rank 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fluxexport.console import console, quiet_libraries, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet_libraries()

    from fluxexport.export.onnx_export import export_model
    from fluxexport.models.loaders import load_transformer
    from fluxexport.models.lora import parse_lora
    from fluxexport.models.source import load_folder
    from fluxexport.models.tiny import write_mid, write_random_lora
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "mid-schnell"
        console.print("building the mid-size model and exporting its transformer …")
        source = load_folder(write_mid(root))
        export_model(source, root / "onnx", ["transformer"])
        # outside the model folder: a .safetensors file in it is part of the checkpoint (its fingerprint)
        lora = parse_lora(
            str(write_random_lora(Path(folder) / "lora.safetensors", load_transformer(source), args.rank, 0.02))
        )
        merged = source.with_loras([lora])
        layers = len(merged.lora_set.layers["transformer"])
        times: dict[str, list[float]] = {"base session": [], "swap in the LoRA": [], "swap back to the base": [],
                                         "export the merged transformer": []}  # fmt: skip
        for repeat in range(args.repeats):
            with OnnxRuntimeBackend(merged, root / "onnx") as backend:
                backend.set_loras([])
                start = time.perf_counter()
                backend.component("transformer")
                times["base session"].append(time.perf_counter() - start)
                start = time.perf_counter()
                backend.set_loras([lora])
                backend.component("transformer")
                times["swap in the LoRA"].append(time.perf_counter() - start)
                start = time.perf_counter()
                backend.set_loras([])
                backend.component("transformer")
                times["swap back to the base"].append(time.perf_counter() - start)
            start = time.perf_counter()
            export_model(merged, root / f"merged-{repeat}", ["transformer"])
            times["export the merged transformer"].append(time.perf_counter() - start)
    rows = [[name, f"{statistics.median(values):.2f}"] for name, values in times.items()]
    console.print(table(f"LoRA rank {args.rank} on {layers} Linears, mid-size transformer (s, median of {args.repeats})",
                        ["step", "s"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
