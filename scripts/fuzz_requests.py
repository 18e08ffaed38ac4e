"""Fuzz every request value longer than the suite does (issue 29): the properties of tests/test_request_fuzz.py —
`run` and `bench` through the CLI in-process, flux_pipeline's inputs as tensors through the Triton model
in-process — on tiny-schnell, `run`'s `--lora` lists (tiny-schnell, tiny-klein) and `--image` sets (tiny-kontext,
tiny-klein, tiny-schnell), `validate`'s request options on tiny-schnell's graphs, with random (not derandomized)
examples.

    python scripts/fuzz_requests.py --run 200 --bench 50 --pipeline 500 --lora 100 --image 100 --validate 30 \
        [--engines DIR] [--seed N]

Without --engines, tiny-schnell is exported once into a temporary folder for the pipeline and validate cases. Prints, per
target, how many cases ran and how they ended; exits non-zero on the first case that breaks the property
(Hypothesis prints it, shrunk)."""

from __future__ import annotations

import argparse
import collections
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_request_fuzz as fuzz  # noqa: E402 - the suite's strategies and properties
from hypothesis import HealthCheck, assume, given, seed, settings  # noqa: E402


def options(count: int) -> settings:
    return settings(
        max_examples=count, derandomize=False, deadline=None, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )  # fmt: skip


def fuzz_cli(target: str, count: int, root: Path, random_seed: int) -> collections.Counter:
    outcomes: collections.Counter = collections.Counter()
    numbers = itertools.count()  # a folder per case, shrinking's included
    strategy, case = (fuzz.run_options(), fuzz.fuzz_run_case) if target == "run" else (
        fuzz.bench_options(), fuzz.fuzz_bench_case)  # fmt: skip

    @seed(random_seed)
    @options(count)
    @given(strategy)
    def one(values):
        outcomes[case(values, root / target, next(numbers))] += 1

    one()
    return outcomes


def fuzz_files(target: str, count: int, root: Path, random_seed: int) -> collections.Counter:
    """`run` with fuzzed `--lora` lists or `--image` sets."""
    outcomes: collections.Counter = collections.Counter()
    numbers = itertools.count()  # a folder per case, shrinking's included
    if target == "lora":
        strategy, case = fuzz.lora_run_options(fuzz.write_lora_files(root / "loras")), fuzz.fuzz_lora_case
    else:
        strategy, case = fuzz.image_run_options(), fuzz.fuzz_image_case

    @seed(random_seed)
    @options(count)
    @given(strategy)
    def one(values):
        outcomes[case(values, root / target, next(numbers))] += 1

    one()
    return outcomes


def fuzz_validate(count: int, engines: Path | None, root: Path, random_seed: int) -> collections.Counter:
    """`validate`'s request options on tiny-schnell's exported graphs."""
    engines = exported(engines, root)
    files = fuzz.write_lora_files(root / "loras")
    outcomes: collections.Counter = collections.Counter()
    numbers = itertools.count()  # a folder per case, shrinking's included

    @seed(random_seed)
    @options(count)
    @given(fuzz.validate_options())
    def one(values):
        outcomes[fuzz.fuzz_validate_case(values, engines, files, root / "validate", next(numbers))] += 1

    one()
    return outcomes


def exported(engines: Path | None, root: Path) -> Path:
    """`engines`, or tiny-schnell exported once into root/onnx."""
    from fluxexport.export.onnx_export import export_model
    from fluxexport.models.source import resolve_model

    if engines is None:
        engines = root / "onnx"
        if not engines.is_dir():
            export_model(resolve_model("tiny-schnell"), engines)
    return engines


def fuzz_pipeline(count: int, engines: Path | None, root: Path, random_seed: int) -> collections.Counter:
    from fluxexport.models.lora import parse_lora
    from fluxexport.models.source import resolve_model
    from fluxexport.models.tiny_lora import write_tiny_lora
    from fluxexport.triton.repository import write_repository

    source = resolve_model("tiny-schnell")
    engines = exported(engines, root)
    ink = parse_lora(str(write_tiny_lora(source, root / "ink.safetensors")))  # as conftest's schnell_repository
    repository = write_repository(source, engines, root / "repository", request_loras=[ink])
    outcomes: collections.Counter = collections.Counter()
    with fuzz.in_process(repository) as (server, standin):
        config = server.configs["flux_pipeline"]

        @seed(random_seed)
        @options(count)
        @given(fuzz.pipeline_tensors(config))
        def one(tensors):
            assume(fuzz.pipeline_affordable(tensors))
            outcomes[fuzz.fuzz_pipeline_case(server, config, tensors, standin)] += 1

        one()
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=int, default=200, help="fuzzed `run` commands")
    parser.add_argument("--bench", type=int, default=50, help="fuzzed `bench` commands")
    parser.add_argument("--pipeline", type=int, default=500, help="fuzzed flux_pipeline requests")
    parser.add_argument("--lora", type=int, default=100, help="fuzzed `run --lora` lists")
    parser.add_argument("--image", type=int, default=100, help="fuzzed `run --image` sets")
    parser.add_argument("--validate", type=int, default=30, help="fuzzed `validate` commands")
    parser.add_argument("--engines", type=Path, help="tiny-schnell's exported graphs (default: export them)")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    print(f"seed {args.seed}")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        targets = (("run", args.run), ("bench", args.bench), ("pipeline", args.pipeline), ("lora", args.lora),
                   ("image", args.image), ("validate", args.validate))  # fmt: skip
        for target, count in targets:
            if count <= 0:
                continue
            started = time.perf_counter()
            if target == "pipeline":
                outcomes = fuzz_pipeline(count, args.engines, root, args.seed)
            elif target == "validate":
                outcomes = fuzz_validate(count, args.engines, root, args.seed)
            elif target in ("lora", "image"):
                outcomes = fuzz_files(target, count, root, args.seed)
            else:
                outcomes = fuzz_cli(target, count, root, args.seed)
            ran = sum(outcomes.values())
            ends = ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items()))
            print(f"{target}: {ran} cases in {time.perf_counter() - started:.0f} s, property held in all ({ends})")


if __name__ == "__main__":
    main()
