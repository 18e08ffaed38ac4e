"""Triton throughput against the number of flux_pipeline instances, on this machine's CPU (a real tritonserver).

Exports tiny-dev once, writes one repository per pipeline instance count (components keep one instance each),
serves each in turn and sends the same closed-loop load: CLIENTS threads, each asking for REQUESTS images in
turn. Prints requests/s, latency p50/p95 and the speedup over one instance. On a GPU host the components'
instances are what scales (`triton --gpus`); here it shows what overlapping the pipelines' Python work buys.

    python scripts/bench_triton.py [--instances 1,2,4] [--clients 8] [--requests 4] [--size 256] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from fluxexport.console import console, quiet_libraries, table


def load(url: str, clients: int, requests: int, size: int, steps: int) -> tuple[float, list[float]]:
    """Requests/s and latencies of `clients` threads each sending `requests` requests back to back."""
    import tritonclient.http as http

    from fluxexport.triton.client import pipeline_inputs

    def inputs(seed: int):
        return pipeline_inputs(
            http, "a lighthouse at dusk", height=size, width=size, num_inference_steps=steps, seed=seed
        )

    latencies, lock, failures = [], threading.Lock(), []

    def client(number: int) -> None:
        own = http.InferenceServerClient(url, connection_timeout=600, network_timeout=600)
        for repeat in range(requests):
            start = time.perf_counter()
            try:
                own.infer("flux_pipeline", inputs(number * requests + repeat))
            except Exception as error:  # noqa: BLE001 - reported below
                failures.append(error)
            with lock:
                latencies.append(time.perf_counter() - start)

    http.InferenceServerClient(url).infer("flux_pipeline", inputs(0))  # warm: sessions created, shapes seen
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{len(failures)} requests failed: {failures[0]}")
    return clients * requests / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", default="1,2,4")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    quiet_libraries()

    from fluxexport.export.onnx_export import export_model
    from fluxexport.models.source import resolve_model
    from fluxexport.triton.repository import write_repository
    from fluxexport.triton.server import TritonServer

    counts = [int(n) for n in args.instances.split(",")]
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        root, source = Path(tmp), resolve_model("tiny-dev")
        console.print("exporting tiny-dev …")
        export_model(source, root / "onnx")
        for count in counts:
            repository = write_repository(source, root / "onnx", root / f"repository-{count}", pipeline_instances=count)
            with TritonServer(repository) as server:
                rate, latencies = load(server.http_url, args.clients, args.requests, args.size, args.steps)
            ordered = sorted(latencies)
            base = base or rate
            rows.append([str(count), f"{rate:.2f}", f"{rate / base:.2f}×", f"{statistics.median(ordered) * 1000:.0f}",
                         f"{ordered[max(int(0.95 * len(ordered)) - 1, 0)] * 1000:.0f}"])  # fmt: skip
            console.print(f"{count} pipeline instance(s): {rate:.2f} req/s")
    console.print(table(
        f"Triton on CPU, tiny-dev, {args.size}², {args.steps} steps, {args.clients} clients × {args.requests} requests",
        ["pipeline instances", "requests/s", "vs 1", "p50 ms", "p95 ms"], rows,
    ))  # fmt: skip


if __name__ == "__main__":
    main()
