"""Which ONNX Runtime session settings pay on this CPU: the mid-size transformer at one denoising step's shape,
each setting alone against the runtime's defaults (`create_session`), interleaved, median of many calls.

Settings: intra-op spinning (on vs the runtime's off), intra-op threads (1 vs all cores), the CPU memory arena
and memory-pattern planning (off vs on), I/O binding with the output preallocated once (vs `session.run`),
and the graph from `fluxexport optimize`. The runtime keeps a setting only where this shows it.

    python scripts/bench_ort_settings.py [--size 512] [--calls 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fluxexport.console import console, quiet_libraries, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    quiet_libraries()

    import onnxruntime

    from fluxexport.backends.onnxruntime_backend import create_session
    from fluxexport.export.onnx_export import export_model
    from fluxexport.export.ort_optimize import optimize_graphs
    from fluxexport.models.source import load_folder
    from fluxexport.models.tiny import ModelShape, build_tiny_pipeline
    from fluxexport.specs import component_specs, sample_inputs

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_cpu import MID_SHAPE

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "mid-schnell"
        console.print("building the mid-size model, exporting and optimizing its transformer …")
        build_tiny_pipeline("tiny-schnell", ModelShape(**MID_SHAPE)).save_pretrained(root)
        source = load_folder(root)
        export_model(source, root / "onnx", ["transformer"])
        optimize_graphs(source, root / "onnx", components=["transformer"])
        graph = root / "onnx" / "transformer.onnx"
        spec = component_specs(source)["transformer"]
        tokens = (args.size // 16) ** 2
        feeds = {k: v.numpy() for k, v in sample_inputs(spec, {"B": 1, "N": tokens, "L": 256}, torch.float32).items()}

        def session(**changes):
            """The runtime's session, then one setting changed (rebuilt through SessionOptions)."""
            if not changes:
                return create_session(graph)
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            options.add_session_config_entry("session.intra_op.allow_spinning", changes.get("spinning", "0"))
            options.intra_op_num_threads = changes.get("threads", 0)
            options.enable_cpu_mem_arena = changes.get("arena", True)
            options.enable_mem_pattern = changes.get("pattern", True)
            return onnxruntime.InferenceSession(str(changes.get("graph", graph)), options,
                                                providers=["CPUExecutionProvider"])  # fmt: skip

        def plain(s):
            return lambda: s.run(None, feeds)

        def bound(s):
            """Inputs and the output bound once as OrtValues (the output preallocated at its shape): the most
            a denoising loop could save by binding instead of passing arrays."""
            binding, held = s.io_binding(), []
            for name, value in feeds.items():
                held.append(onnxruntime.OrtValue.ortvalue_from_numpy(value))
                binding.bind_ortvalue_input(name, held[-1])
            shape = list(s.run(None, feeds)[0].shape)
            held.append(onnxruntime.OrtValue.ortvalue_from_shape_and_type(shape, np.float32))
            binding.bind_ortvalue_output(s.get_outputs()[0].name, held[-1])
            return lambda: (s.run_with_iobinding(binding), held)

        variants = {
            "runtime defaults (spinning off, all cores, arena + pattern on)": plain(session()),
            "intra-op spinning on": plain(session(spinning="1")),
            "1 intra-op thread": plain(session(threads=1)),
            "CPU memory arena off": plain(session(arena=False)),
            "memory pattern off": plain(session(pattern=False)),
            "I/O binding, output preallocated": bound(session()),
            "fluxexport optimize's graph": plain(session(graph=root / "onnx" / "ort" / "transformer.onnx")),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for run in variants.values():
            run()  # warm
        for _ in range(args.calls):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times[next(iter(times))])
    rows = [
        [name, f"{statistics.median(t) * 1000:.1f}", f"{base / statistics.median(t):.3f}×"] for name, t in times.items()
    ]
    console.print(table(
        f"mid-size transformer, one step at {args.size}² ({tokens} image + 256 text tokens), median of {args.calls}",
        ["setting", "ms", "vs defaults"], rows,
    ))  # fmt: skip


if __name__ == "__main__":
    main()
