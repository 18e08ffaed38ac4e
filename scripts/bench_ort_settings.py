"""Which ONNX Runtime session settings pay on this CPU: the mid-size transformer at one denoising step's shape,
each setting alone against the runtime's defaults (`create_session`), interleaved, median of many calls.

Settings: intra-op spinning (on vs the runtime's off), intra-op threads (1 vs all cores), the CPU memory arena
and memory-pattern planning (off vs on), I/O binding with the output preallocated once (vs `session.run`),
and the graph from `fluxexport optimize`. The runtime keeps a setting only where this shows it. Also prints
ONNX Runtime's profile of the graph by op type, and one attention at the model's shape through the three
kernels ONNX Runtime has for it.

    python scripts/bench_ort_settings.py [--size 512] [--calls 20]
"""

from __future__ import annotations

import argparse
import statistics
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

    from fluxexport.export.onnx_export import export_model
    from fluxexport.models.source import load_folder
    from fluxexport.models.tiny import MID_SHAPE, write_mid
    from fluxexport.onnxruntime.backend import create_session
    from fluxexport.onnxruntime.optimize import optimize_graphs
    from fluxexport.specs import component_specs, sample_inputs

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "mid-schnell"
        console.print("building the mid-size model, exporting and optimizing its transformer …")
        source = load_folder(write_mid(root))
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
        shares = kernel_shares(graph, feeds)
    heads, head_dim = MID_SHAPE.heads, MID_SHAPE.head_dim
    attention = attention_kernels(tokens + 256, heads, head_dim, args.calls)
    base = statistics.median(times[next(iter(times))])
    rows = [
        [name, f"{statistics.median(t) * 1000:.1f}", f"{base / statistics.median(t):.3f}×"] for name, t in times.items()
    ]
    console.print(table(
        f"mid-size transformer, one step at {args.size}² ({tokens} image + 256 text tokens), median of {args.calls}",
        ["setting", "ms", "vs defaults"], rows,
    ))  # fmt: skip
    console.print(table("where the portable graph's kernel time goes (ONNX Runtime's profiler, 4 calls)",
                        ["op type", "share"], [[op, f"{share:.1%}"] for op, share in shares[:8]]))  # fmt: skip
    console.print(table(f"one attention, {tokens + 256} tokens × {heads} heads × {head_dim}, median of {args.calls}",
                        ["kernel", "ms"], [[name, f"{ms:.2f}"] for name, ms in attention.items()]))  # fmt: skip


def attention_kernels(sequence: int, heads: int, head_dim: int, calls: int) -> dict[str, float]:
    """Median ms of one attention at the transformer's shape: as exported (MatMul/Softmax/MatMul), ONNX
    Runtime's fused MultiHeadAttention (com.microsoft) and ONNX's own Attention (opset 23)."""
    import onnxruntime
    from onnx import TensorProto, helper

    split = [1, heads, sequence, head_dim]
    joined = [1, sequence, heads * head_dim]

    def model(nodes, shape, opsets, initializers=()):
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
        output = helper.make_tensor_value_info("o", TensorProto.FLOAT, shape)
        graph = helper.make_graph(nodes, "attention", inputs, [output], list(initializers))
        return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])

    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [head_dim**-0.5])
    unfused = model([helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                     helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["t"]),
                     helper.make_node("Softmax", ["t"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])],
                    split, [("", 20)], [scale])  # fmt: skip
    fused = model([helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft",
                                    num_heads=heads)], joined, [("", 20), ("com.microsoft", 1)])  # fmt: skip
    standard = model([helper.make_node("Attention", ["q", "k", "v"], ["o"])], split, [("", 23)])
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    rng = np.random.default_rng(0)
    results = {}
    for name, graph, shape in (("MatMul/Softmax/MatMul (exported)", unfused, split),
                               ("com.microsoft MultiHeadAttention", fused, joined),
                               ("ONNX Attention (opset 23)", standard, split)):  # fmt: skip
        session = onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {n: rng.standard_normal(shape, dtype=np.float32) for n in "qkv"}
        session.run(None, feeds)
        spent = []
        for _ in range(calls):
            start = time.perf_counter()
            session.run(None, feeds)
            spent.append(time.perf_counter() - start)
        results[name] = statistics.median(spent) * 1000
    return results


def kernel_shares(graph: Path, feeds: dict) -> list[tuple[str, float]]:
    """Each op type's share of the kernel time over 4 calls, from ONNX Runtime's own profiler."""
    import json
    from collections import Counter

    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    for _ in range(4):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    spent: Counter = Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
    trace.unlink()
    total = sum(spent.values())
    return [(op, duration / total) for op, duration in spent.most_common()]


if __name__ == "__main__":
    main()
