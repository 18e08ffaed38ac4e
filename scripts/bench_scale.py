"""Memory and time of exporting FLUX at real width, on a host smaller than the model.

Writes a random checkpoint with FLUX.1-dev's widths (transformer 3072 = 24×128, T5 d_model 4096 / d_ff 10240,
CLIP 768, the 16-channel VAE) block by block — it never holds the model — sharded like the published repository,
then, each step in a fresh process, exports it in bf16 (streamed, and in memory), calibrates FP8 scales
(sequentially, one block at a time; and holding the whole model) and writes the FP8 transformer from the
saved calibration. It prints peak RSS and wall time per step. `--steps check` exports the transformer with
the default weight placement and with `--inline-weights`, and runs `fluxexport check` on each folder.
`--steps trace-cache` exports the transformer twice with `FLUXEXPORT_TRACE_CACHE` set to a fresh folder (the
first export traces and keeps the trace, the second reads it) and says whether the two graphs are the same bytes.

    python scripts/bench_scale.py                       # 1 double + 2 single blocks, 1-layer T5 (~1.3 GB bf16)
    python scripts/bench_scale.py --full --skip-memory  # the published shape: 19 + 38 blocks, 24-layer T5 (~33 GB)
    python scripts/bench_scale.py --steps check         # memory of export and check, by weight placement
    python scripts/bench_scale.py --steps export,trace-cache --skip-memory   # FLUXEXPORT_TRACE_CACHE's effect

`--model flux2-dev` does the same for FLUX.2 [dev] at its published widths: the transformer 6144 = 48×128 wide
(128 latent channels, joint width 15360, 4-axis RoPE, guidance embedding) and Mistral-Small-3.2-24B as text
encoder (5120 wide, MLP 32768, 32 query / 8 key-value heads, vocabulary 131072, a Pixtral vision tower), written
under the names `Mistral3ForConditionalGeneration.save_pretrained` gives them (`language_model.model.layers.…`)
in ≤ 5 GB shards with an index json, like the published repository; the VAE, tokenizer and scheduler are
tiny-flux2-dev's. The published depth (8 + 48 blocks, ~64 GB bf16; a 40-layer text encoder, ~48 GB) does not
fit beside its own ONNX output on a 60 GB disk, so by default the depth is reduced — 2 + 8 blocks, 8 text
layers — and every table says so; run two depths (`--double 1 --single 2 --text-layers 4`) to see whether the
peak grows with depth.

FLUX.2 [dev] reads the text encoder's hidden states 10, 20 and 30 (`ModelSource.text_encoder_layers`) and the
toolchain refuses a stack shallower than 30 layers; only a tiny model's marker file names other layers, and it
would also make the checkpoint "tiny" (other export bounds). A text stack of 30 layers or fewer is therefore read
at the same fractions of its depth, layers n/4, n/2 and 3n/4 (2, 4, 6 of 8), by overriding that one property
in each measured process: the graph stacks three hidden states of a 5120-wide stack cut after the deepest one,
as at the published depth, only with fewer layers before the cut. With more than 30 layers nothing is overridden.

    python scripts/bench_scale.py --model flux2-dev --skip-memory --steps export   # 2 + 8 blocks, 8 text layers
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FLUX_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "out_channels": None,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}  # fmt: skip
T5_XXL = {
    "architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 4096, "d_ff": 10240, "d_kv": 64,
    "num_heads": 64, "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "is_gated_act": True,
    "dense_act_fn": "gelu_new", "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}  # fmt: skip
CLIP_L = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 768, "intermediate_size": 3072,
    "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu",
    "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}  # fmt: skip
SHARD_BYTES = 10 * 2**30  # the published FLUX.1-dev transformer: 3 shards of ≤ 10 GB

# FLUX.2 [dev]'s published transformer (diffusers' Flux2Transformer2DModel defaults): 8 double + 48 single blocks
FLUX2_TRANSFORMER = {
    "_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128, "out_channels": None,
    "num_layers": 8, "num_single_layers": 48, "attention_head_dim": 128, "num_attention_heads": 48,
    "joint_attention_dim": 15360, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True,
}  # fmt: skip
# its text encoder, Mistral-Small-3.2-24B: a 40-layer Mistral text stack, a Pixtral vision tower, a projector
MISTRAL_SMALL_3_2 = {
    "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "image_token_index": 10,
    "projector_hidden_act": "gelu", "multimodal_projector_bias": False, "spatial_merge_size": 2,
    "vision_feature_layer": -1, "tie_word_embeddings": False,
    "text_config": {
        "model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "vocab_size": 131072, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e9}, "sliding_window": None,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_channels": 3, "patch_size": 14, "image_size": 1540, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
    },
}  # fmt: skip
FLUX2_TEXT_LAYERS = (10, 20, 30)  # the hidden states FLUX.2 [dev] stacks (`ModelSource.text_encoder_layers`)
TEXT_SHARD_BYTES = 5 * 10**9  # the published Mistral-Small-3.2-24B: 10 shards of ≤ 5 GB


def parameter_shapes(
    module: str, folder: Path, model_index: dict | None = None
) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every parameter's shape, from the config alone (parameters on meta: no memory), under the names the
    library saves it with (`model_index` names the pipeline, hence the family: FLUX.1 without one)."""
    from fluxexport.models.meta import module_from_config, parameters_on_meta
    from fluxexport.models.source import ModelSource

    configs = {"model_index": model_index or {}, "transformer": {}, "vae": {}, "text_encoder": {},
               "text_encoder_2": {}}  # fmt: skip
    with parameters_on_meta():
        model = module_from_config(ModelSource("scale", folder, configs=configs), module)
    state = model.state_dict()
    if module == "text_encoder":  # FLUX.2's LM: save_pretrained's names (Mistral3's legacy `language_model.…`)
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    return {name: (p.shape, p.dtype) for name, p in state.items() if p.is_floating_point()}


def write_random_part(
    folder: Path, weights_name: str, shapes: dict, seed: int, prefix: str = "", shard_bytes: int = SHARD_BYTES
) -> int:
    """Random bf16 tensors written shard by shard (≤ `shard_bytes` each) with an index json, keys under `prefix`
    (the published CLIP-L's are `text_model.…`); returns bytes."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, _) in shapes.items():
        nbytes = shape.numel() * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    stem, weight_map, total = weights_name.removesuffix(".safetensors"), {}, 0
    for index, names in enumerate(shards):
        file = f"{stem}-{index + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else weights_name
        tensors = {}
        for name in names:
            shape = shapes[name][0]
            scale = 1.0 if "norm" in name else 0.02  # norms near 1, weights small
            tensors[prefix + name] = (torch.randn(shape, generator=generator, dtype=torch.float32) * scale).to(
                torch.bfloat16
            )
        save_file(tensors, str(folder / file))
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map |= dict.fromkeys((prefix + name for name in names), file)
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{weights_name}.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_checkpoint(root: Path, double: int, single: int, t5_layers: int) -> dict[str, int]:
    """A diffusers FLUX.1-dev-shaped folder: random transformer, T5 and CLIP at full width; tiny-dev's VAE,
    tokenizers and scheduler (the export reads widths only from configs)."""
    from fluxexport.models.source import resolve_model

    tiny = resolve_model("tiny-dev").root
    for part in ("vae", "tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(tiny / part, root / part)
    index = json.loads((tiny / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps(index))
    parts = {
        "transformer": (FLUX_TRANSFORMER | {"num_layers": double, "num_single_layers": single},
                        "config.json", "diffusion_pytorch_model.safetensors", "transformer"),
        "text_encoder_2": (T5_XXL | {"num_layers": t5_layers}, "config.json", "model.safetensors", "t5"),
        "text_encoder": (CLIP_L | {"num_hidden_layers": 12}, "config.json", "model.safetensors", "clip"),
    }  # fmt: skip
    written = {}
    for seed, (part, (config, config_name, weights_name, module)) in enumerate(parts.items()):
        (root / part).mkdir()
        (root / part / config_name).write_text(json.dumps(config, indent=2))
        prefix = "text_model." if module == "clip" else ""
        shapes = parameter_shapes(module, root)
        if module == "t5":
            shapes = without_tied_aliases(shapes)
        written[module] = write_random_part(root / part, weights_name, shapes, seed, prefix)
    return written


def without_tied_aliases(shapes: dict) -> dict:
    """T5's parameters less those transformers ties to another (`encoder.embed_tokens.weight` is `shared.weight`):
    one tensor for both, as `save_pretrained` and the published T5 write it. Two random tensors would be untied
    differently by transformers and by the export (T5's validate at 1.43 rel-L2 on the random checkpoint)."""
    from transformers import T5EncoderModel

    return {name: shape for name, shape in shapes.items() if name not in T5EncoderModel._tied_weights_keys}


def write_flux2_checkpoint(root: Path, double: int, single: int, text_layers: int) -> dict[str, int]:
    """A diffusers FLUX.2 [dev]-shaped folder: random transformer and Mistral3 text encoder at full width, both
    sharded; tiny-flux2-dev's VAE, tokenizer (Mistral's special tokens, a chat template) and scheduler."""
    from fluxexport.models.source import resolve_model

    tiny = resolve_model("tiny-flux2-dev").root
    for part in ("vae", "tokenizer", "scheduler"):
        shutil.copytree(tiny / part, root / part)
    index = json.loads((tiny / "model_index.json").read_text())
    language = MISTRAL_SMALL_3_2["text_config"] | {"num_hidden_layers": text_layers}
    parts = {
        "transformer": (FLUX2_TRANSFORMER | {"num_layers": double, "num_single_layers": single},
                        "diffusion_pytorch_model.safetensors", SHARD_BYTES),
        "text_encoder": (MISTRAL_SMALL_3_2 | {"text_config": language}, "model.safetensors", TEXT_SHARD_BYTES),
    }  # fmt: skip
    written = {}
    for seed, (part, (config, weights_name, shard_bytes)) in enumerate(parts.items()):
        (root / part).mkdir()
        (root / part / "config.json").write_text(json.dumps(config, indent=2))
        shapes = parameter_shapes(part, root, index)
        written[part] = write_random_part(root / part, weights_name, shapes, seed, shard_bytes=shard_bytes)
    (root / "model_index.json").write_text(json.dumps(index))  # last: a folder without it is partial
    return written


def read_layers(text_layers: int) -> tuple[int, ...]:
    """The hidden states a FLUX.2 [dev] text stack of `text_layers` layers is read at: the published ones when it
    is deep enough, else the same fractions of its depth (the module docstring says why)."""
    if text_layers > max(FLUX2_TEXT_LAYERS):
        return FLUX2_TEXT_LAYERS
    if text_layers < 4:
        raise SystemExit("--text-layers must be at least 4: FLUX.2 stacks three distinct hidden states")
    return text_layers // 4, text_layers // 2, 3 * text_layers // 4


PROLOGUE = """
import sys
from pathlib import Path
from fluxexport.console import quiet_libraries
quiet_libraries()
from fluxexport.models.source import ModelSource, load_folder
if len(sys.argv) > 5:  # a FLUX.2 text stack shallower than the layers FLUX.2 reads: read at the script's layers
    read = tuple(int(layer) for layer in sys.argv[5].split(","))
    ModelSource.text_encoder_layers = property(lambda _source: read)
source = load_folder(Path(sys.argv[1]))
out = Path(sys.argv[3])
"""
EPILOGUE = """
# VmHWM: this process's own peak RSS (ru_maxrss of a child starts at its parent's RSS at fork)
peak = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
print("PEAK", int(peak.split()[1]) * 1024)
"""
STEPS = {
    "export": """
from fluxexport.export.onnx_export import export_component
from fluxexport.specs import component_specs
spec = component_specs(source)[sys.argv[2]]
export_component(source, spec, out, "bf16", external_data=True, streaming=sys.argv[4] == "stream")
print("BYTES", sum(path.stat().st_size for path in out.glob(f"{sys.argv[2]}.onnx*")))
""",
    "placed": """
from fluxexport.export.onnx_export import export_component
from fluxexport.specs import component_specs
spec = component_specs(source)[sys.argv[2]]
placement = {"default": None, "inline": False, "external": True}[sys.argv[4]]
exported = export_component(source, spec, out, "bf16", external_data=placement)
print("BYTES", sum(path.stat().st_size for path in out.glob(f"{sys.argv[2]}.onnx*")))
""",
    "check": """
from fluxexport.export.check import check_folder
reports = check_folder(out)
assert all(report.ok for report in reports), [report.problems for report in reports]
""",
    "calibrate": """
from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings
from fluxexport.quantize.qdq_export import calibrate_transformer, write_calibration
settings = CalibrationSettings(CALIBRATION_PROMPTS[:1], steps=1, height=256, width=256)
calibration = calibrate_transformer(source, settings, "cpu", sequential=sys.argv[4] == "sequential")
write_calibration(out, source, settings, calibration)
""",
    "quantize": """
from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings
from fluxexport.quantize.qdq_export import quantize_transformer
settings = CalibrationSettings(CALIBRATION_PROMPTS[:1], steps=1, height=256, width=256)
quantize_transformer(source, out, settings, "bf16", external_data=True, sequential=True)
""",
    "fp8": """
from fluxexport.quantize.qdq_export import export_quantized, read_calibration
calibration, _ = read_calibration(out / "calibration.json", source)
export_quantized(source, out, calibration, out / "calibration.json", "bf16", external_data=True)
print("BYTES", sum(path.stat().st_size for path in out.glob("transformer.fp8.onnx*")))
""",
}


def measure(
    root: Path, step: str, component: str, mode: str, out: Path, text_layers: tuple[int, ...] = ()
) -> tuple[float, int, int | None]:
    """(wall seconds, peak RSS bytes, bytes written if reported) of one step in a fresh process; `text_layers`
    overrides the hidden states FLUX.2's text encoder is read at."""
    start = time.perf_counter()
    script = PROLOGUE + STEPS[step] + EPILOGUE
    override = [",".join(map(str, text_layers))] if text_layers else []
    run = subprocess.run(
        [sys.executable, "-c", script, str(root), component, str(out), mode, *override], capture_output=True, text=True
    )
    if run.returncode != 0:
        raise SystemExit(f"{step} of {component} ({mode}) failed:\n{run.stderr[-2000:]}")
    values = {
        line.split()[0]: int(line.split()[1]) for line in run.stdout.splitlines() if line[:5] in ("PEAK ", "BYTES")
    }
    return time.perf_counter() - start, values["PEAK"], values.get("BYTES")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("flux1-dev", "flux2-dev"), default="flux1-dev",
                        help="Whose widths the random checkpoint has (default: flux1-dev).")  # fmt: skip
    parser.add_argument("--double", type=int, help="Double blocks (default: 1; flux2-dev: 2).")
    parser.add_argument("--single", type=int, help="Single blocks (default: 2; flux2-dev: 8).")
    parser.add_argument("--t5-layers", type=int, default=1, help="FLUX.1: T5 layers (default: 1).")
    parser.add_argument("--text-layers", type=int, default=8,
                        help="FLUX.2 [dev]: Mistral text layers (default: 8; ≥ 31 reads the published 10, 20, 30).")  # fmt: skip
    parser.add_argument("--full", action="store_true",
                        help="The published depth: FLUX.1-dev 19 + 38 blocks, 24 T5 layers; FLUX.2 [dev] 8 + 48 "
                        "blocks, 40 text layers (~112 GB bf16).")  # fmt: skip
    parser.add_argument(
        "--skip-memory",
        action="store_true",
        help="Only the streamed / sequential steps: skip "
        "the in-memory export and whole-model calibration (they need several times the model in RAM).",
    )
    parser.add_argument("--steps", default="export,calibrate,fp8,quantize",
                        help="Which steps to measure (comma-separated; fp8 needs calibrate; or check; "
                        "trace-cache: the transformer exported twice with FLUXEXPORT_TRACE_CACHE).")  # fmt: skip
    parser.add_argument("--work", type=Path, help="Folder for the checkpoint and graphs (default: a temp folder).")
    args = parser.parse_args()
    flux2 = args.model == "flux2-dev"
    if args.full:
        args.double, args.single = (8, 48) if flux2 else (19, 38)
        args.t5_layers, args.text_layers = 24, 40
    args.double = args.double if args.double is not None else 2 if flux2 else 1
    args.single = args.single if args.single is not None else 8 if flux2 else 2
    work = Path(args.work or tempfile.mkdtemp(prefix="fluxexport-scale-"))
    root = work / "checkpoint"
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    disk_free = shutil.disk_usage(work).free
    if not (root / "model_index.json").is_file():
        if flux2:  # FLUX.2's index is written last: a folder without it is partial
            shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        if flux2:
            write_flux2_checkpoint(root, args.double, args.single, args.text_layers)
        else:
            write_checkpoint(root, args.double, args.single, args.t5_layers)
    print(f"checkpoint {root} ({time.perf_counter() - start:.0f} s to write)", flush=True)
    components = {"transformer": "transformer", "text_encoder": "text_encoder"} if flux2 else {
        "transformer": "transformer", "t5": "text_encoder_2"}  # fmt: skip
    sizes = {
        component: sum(p.stat().st_size for p in (root / part).glob("*.safetensors"))
        for component, part in components.items()
    }
    text_read = read_layers(args.text_layers) if flux2 else ()
    override = text_read if text_read != FLUX2_TEXT_LAYERS else ()
    rows, loads = [], []

    def record(step: str, component: str, mode: str, out: Path, label: str) -> None:
        cpu = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
        seconds, peak, written = measure(root, step, component, mode, out, override)
        cpu = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]) - cpu
        loads.append(os.getloadavg()[0])
        rows.append((component, label, sizes[component], seconds, peak, written))
        print(f"{component} {label}: {seconds:.0f} s, peak RSS {peak / 1e9:.2f} GB, {cpu:.0f} CPU s, "
              f"1-min load {loads[-1]:.1f}", flush=True)  # fmt: skip

    steps = set(args.steps.split(","))
    if "export" in steps:
        for component in components:
            for mode in ("stream",) if args.skip_memory else ("stream", "memory"):
                record("export", component, mode, work / f"onnx-{mode}", f"bf16 export ({mode})")
                shutil.rmtree(work / f"onnx-{mode}", ignore_errors=True)
    if "check" in steps:  # weights beside the graph (the default at this size) against inline in it (≤ 2 GB)
        for placement in ("default", "inline") if sizes["transformer"] < 2 * 10**9 else ("default",):
            out = work / f"onnx-{placement}"
            record("placed", "transformer", placement, out, f"bf16 export ({placement} weights)")
            record("check", "transformer", placement, out, f"check ({placement} weights)")
            shutil.rmtree(out, ignore_errors=True)
    if "trace-cache" in steps:  # FLUXEXPORT_TRACE_CACHE: a second export of the architecture reads the trace
        from fluxexport.export.trace_cache import ENVIRONMENT_VARIABLE

        cache, outs = work / "trace-cache", {"traced, trace kept": work / "onnx-miss",
                                             "trace read from the cache": work / "onnx-hit"}
        shutil.rmtree(cache, ignore_errors=True)
        os.environ[ENVIRONMENT_VARIABLE] = str(cache)
        try:
            for label, out in outs.items():
                record("export", "transformer", "stream", out, f"bf16 export ({label})")
        finally:
            os.environ.pop(ENVIRONMENT_VARIABLE)
        graphs = [(out / "transformer.onnx").read_bytes() for out in outs.values()]
        print(f"trace cache: {sum(p.stat().st_size for p in cache.iterdir()) / 1e6:.1f} MB; the two graphs are "
              f"{'byte for byte equal' if graphs[0] == graphs[1] else 'DIFFERENT'}", flush=True)  # fmt: skip
        for folder in (cache, *outs.values()):
            shutil.rmtree(folder, ignore_errors=True)
    fp8 = work / "onnx-fp8"
    if "calibrate" in steps:
        for mode in ("sequential",) if args.skip_memory else ("whole", "sequential"):
            record("calibrate", "transformer", mode, fp8, f"calibrate ({mode}; 1 prompt, 1 step, 256²)")
    if "fp8" in steps:
        record("fp8", "transformer", "stream", fp8, "FP8 export (bf16 base, from calibration.json)")
    shutil.rmtree(fp8, ignore_errors=True)
    if "quantize" in steps and not args.skip_memory:  # `fluxexport quantize --sequential`: both in one process
        record("quantize", "transformer", "sequential", fp8, "quantize --sequential (one process)")
        shutil.rmtree(fp8, ignore_errors=True)

    if flux2:
        shape = (f"FLUX.2 [dev]: {args.double} double + {args.single} single blocks at 6144, Mistral text stack "
                 f"{args.text_layers} layers at 5120 read at layers {', '.join(map(str, text_read))}")  # fmt: skip
        if (args.double, args.single, args.text_layers) != (8, 48, 40):
            shape += (f" — depth reduced from the published 8 + 48 blocks and 40 text layers (~64 GB and ~48 GB "
                      f"bf16, each exported beside its checkpoint): {disk_free / 1e9:.0f} GB of disk were free")  # fmt: skip
    else:
        shape = f"{args.double} double + {args.single} single blocks at 3072, T5 {args.t5_layers} layers at 4096"
    print(f"\n{shape}, {os.cpu_count()} cores ({time.strftime('%Y-%m-%d')})")
    if loads:
        print(f"1-min load average after each step: {min(loads):.1f}–{max(loads):.1f} (the measured step is ~1–2 "
              "of it; more is other work on the same cores)")  # fmt: skip
    print("\n| component | step | weights GB (bf16) | wall s | peak RSS GB | peak / weights | written GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for component, label, weights, seconds, peak, written in rows:
        size = f"{written / 1e9:.2f}" if written else ""
        print(f"| {component} | {label} | {weights / 1e9:.2f} | {seconds:.0f} | {peak / 1e9:.2f} | "
              f"{peak / weights:.2f}× | {size} |")  # fmt: skip


if __name__ == "__main__":
    main()
