"""`fluxexport bench`: latency per stage and end to end for any backend, with peak GPU memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from fluxexport.models.source import ModelSource
from fluxexport.runtime.backend import Backend
from fluxexport.runtime.cache import CacheSettings
from fluxexport.runtime.pipeline import GenerationRequest, generate, resolve_request


def transformer_flop_per_step(source: ModelSource, height: int, width: int, text_tokens: int, batch: int) -> float:
    """FLOP of one transformer call: B · blocks · (c·d²·S + 4·S²·d), S = image + text tokens, d its width
    (linear layers, then attention; embedders and modulation ignored). c = 2·(4 + m·r), the MLP's `m` matrices of
    d × r·d as the family declares them (`Family.ffn_matrices`, `ffn_ratio`): FLUX.1's GELU MLP of ratio 4 makes
    c = 24 (74.4 TFLOP at 1024², 512 text tokens, ARCHITECTURE.md); FLUX.2's SwiGLU of ratio 3, c = 26."""
    config, family = source.transformer, source.family
    blocks = int(config["num_layers"]) + int(config["num_single_layers"])
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    ratio = float(config[family.ffn_ratio]) if isinstance(family.ffn_ratio, str) else family.ffn_ratio
    linear = 2 * (4 + family.ffn_matrices * ratio)  # per token, in units of d²
    patch = 2 * source.vae_scale_factor  # pixels per packed token side
    tokens = (height // patch) * (width // patch) + text_tokens
    return float(batch * blocks * (linear * d * d * tokens + 4 * tokens * tokens * d))


def run_benchmark(
    backend: Backend,
    source: ModelSource,
    request: GenerationRequest,
    warmup: int = 1,
    repeats: int = 5,
    on_run: Callable[[int, int], None] | None = None,
    cache: CacheSettings | None = None,
    prepare: Callable[[], tuple[GenerationRequest, dict[str, float]]] | None = None,
) -> dict:
    """Warm up, then time `repeats` generations; the runtime's own stage timings (synced once per stage).
    With a step `cache`, `computed_steps` says how many steps ran the transformer (the same in every run).
    `prepare`, a stage timed before each generation (FLUX.1 Redux's prior), gives the request the pipeline then
    takes (in `request`'s shapes) and its own stages' seconds: rows before the pipeline's, counted in `total`."""
    resolved = resolve_request(source, request)
    cuda = backend.device.type == "cuda"
    runs: list[dict[str, float]] = []
    for index in range(warmup + repeats):
        if cuda and index == warmup:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        given, before = (request, {}) if prepare is None else prepare()
        result = generate(backend, source, given, cache=cache)
        total = sum(before.values()) + result.timings["total"]
        timings = before | dict(result.timings, total=total, wall=time.perf_counter() - start)
        if index >= warmup:
            runs.append(timings)
        if on_run:
            on_run(index + 1, warmup + repeats)
    stages = [stage for stage in runs[0] if stage != "total"] + ["total"]
    median_ms = {stage: 1000 * statistics.median(run[stage] for run in runs) for stage in stages}
    # the text tokens: the prompt embeddings' own length where given (Redux: 512 + the image tokens), else T5's
    embeds = resolved.prompt_embeds
    text_tokens = resolved.max_sequence_length if embeds is None else int(embeds.shape[1])
    flop = transformer_flop_per_step(source, resolved.height, resolved.width, text_tokens, resolved.batch)
    return {
        "backend": backend.name,
        "device": str(torch.cuda.get_device_name() if cuda else "cpu"),
        "model": source.name,
        "height": resolved.height,
        "width": resolved.width,
        "steps": resolved.steps,
        "batch": resolved.batch,
        "repeats": repeats,
        "cache": result.cache,
        "computed_steps": result.computed_steps,
        "median_ms": median_ms,
        # the transformer's arithmetic per computed step, and the rate the run achieved: the computed steps'
        # arithmetic over the denoising time (a step a cache skips or predicts does none of it)
        "transformer_tflop_per_step": flop / 1e12,
        "transformer_tflops": flop * result.computed_steps / 1e12 / (median_ms["denoise"] / 1000),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
