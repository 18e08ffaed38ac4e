"""Memory and time of exporting FLUX at real width, on a host smaller than the model.

Writes a random checkpoint with FLUX.1-dev's widths (transformer 3072 = 24×128, T5 d_model 4096 / d_ff 10240,
CLIP 768, the 16-channel VAE) block by block — it never holds the model — sharded like the published repository,
then, each step in a fresh process, exports it in bf16 (streamed, and in memory), calibrates FP8 scales
(sequentially, one block at a time; and holding the whole model) and writes the FP8 transformer from the
saved calibration. It prints peak RSS and wall time per step. `--steps check` exports the transformer with
the default weight placement and with `--inline-weights`, and runs `fluxexport check` on each folder.

    python scripts/bench_scale.py                       # 1 double + 2 single blocks, 1-layer T5 (~1.3 GB bf16)
    python scripts/bench_scale.py --full --skip-memory  # the published shape: 19 + 38 blocks, 24-layer T5 (~33 GB)
    python scripts/bench_scale.py --steps check         # memory of export and check, by weight placement
"""

from __future__ import annotations

import argparse
import json
import os
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


def parameter_shapes(module: str, folder: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every parameter's shape, from the config alone (parameters on meta: no memory)."""
    from fluxexport.models.meta import module_from_config, parameters_on_meta
    from fluxexport.models.source import ModelSource

    configs = {"model_index": {}, "transformer": {}, "vae": {}, "text_encoder": {}, "text_encoder_2": {}}
    with parameters_on_meta():
        model = module_from_config(ModelSource("scale", folder, configs=configs), module)
    return {name: (p.shape, p.dtype) for name, p in model.state_dict().items() if p.is_floating_point()}


def write_random_part(folder: Path, weights_name: str, shapes: dict, seed: int, prefix: str = "") -> int:
    """Random bf16 tensors written shard by shard (≤ SHARD_BYTES each) with an index json, keys under `prefix`
    (the published CLIP-L's are `text_model.…`); returns bytes."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, _) in shapes.items():
        nbytes = shape.numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
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
        written[module] = write_random_part(root / part, weights_name, parameter_shapes(module, root), seed, prefix)
    return written


PROLOGUE = """
import sys
from pathlib import Path
from fluxexport.console import quiet_libraries
quiet_libraries()
from fluxexport.models.source import load_folder
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


def measure(root: Path, step: str, component: str, mode: str, out: Path) -> tuple[float, int, int | None]:
    """(wall seconds, peak RSS bytes, bytes written if reported) of one step in a fresh process."""
    start = time.perf_counter()
    script = PROLOGUE + STEPS[step] + EPILOGUE
    run = subprocess.run(
        [sys.executable, "-c", script, str(root), component, str(out), mode], capture_output=True, text=True
    )
    if run.returncode != 0:
        raise SystemExit(f"{step} of {component} ({mode}) failed:\n{run.stderr[-2000:]}")
    values = {
        line.split()[0]: int(line.split()[1]) for line in run.stdout.splitlines() if line[:5] in ("PEAK ", "BYTES")
    }
    return time.perf_counter() - start, values["PEAK"], values.get("BYTES")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--t5-layers", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="FLUX.1-dev's depth: 19 + 38 blocks, 24 T5 layers.")
    parser.add_argument(
        "--skip-memory",
        action="store_true",
        help="Only the streamed / sequential steps: skip "
        "the in-memory export and whole-model calibration (they need several times the model in RAM).",
    )
    parser.add_argument("--steps", default="export,calibrate,fp8,quantize",
                        help="Which steps to measure (comma-separated; fp8 needs calibrate; or check).")  # fmt: skip
    parser.add_argument("--work", type=Path, help="Folder for the checkpoint and graphs (default: a temp folder).")
    args = parser.parse_args()
    if args.full:
        args.double, args.single, args.t5_layers = 19, 38, 24
    work = Path(args.work or tempfile.mkdtemp(prefix="fluxexport-scale-"))
    root = work / "checkpoint"
    start = time.perf_counter()
    if not (root / "model_index.json").is_file():
        root.mkdir(parents=True)
        write_checkpoint(root, args.double, args.single, args.t5_layers)
    print(f"checkpoint {root} ({time.perf_counter() - start:.0f} s to write)", flush=True)
    sizes = {
        module: sum(p.stat().st_size for p in (root / part).glob("*.safetensors"))
        for module, part in (("transformer", "transformer"), ("t5", "text_encoder_2"))
    }
    rows = []

    def record(step: str, component: str, mode: str, out: Path, label: str) -> None:
        seconds, peak, written = measure(root, step, component, mode, out)
        rows.append((component, label, sizes[component], seconds, peak, written))
        print(f"{component} {label}: {seconds:.0f} s, peak RSS {peak / 1e9:.2f} GB", flush=True)

    steps = set(args.steps.split(","))
    if "export" in steps:
        for component in ("transformer", "t5"):
            for mode in ("stream",) if args.skip_memory else ("stream", "memory"):
                record("export", component, mode, work / f"onnx-{mode}", f"bf16 export ({mode})")
                shutil.rmtree(work / f"onnx-{mode}", ignore_errors=True)
    if "check" in steps:  # weights beside the graph (the default at this size) against inline in it
        for placement in ("default", "inline"):
            out = work / f"onnx-{placement}"
            record("placed", "transformer", placement, out, f"bf16 export ({placement} weights)")
            record("check", "transformer", placement, out, f"check ({placement} weights)")
            shutil.rmtree(out, ignore_errors=True)
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

    shape = f"{args.double} double + {args.single} single blocks at 3072, T5 {args.t5_layers} layers at 4096"
    print(f"\n{shape}, {os.cpu_count()} cores ({time.strftime('%Y-%m-%d')})\n")
    print("| component | step | weights GB (bf16) | wall s | peak RSS GB | peak / weights | written GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for component, label, weights, seconds, peak, written in rows:
        size = f"{written / 1e9:.2f}" if written else ""
        print(f"| {component} | {label} | {weights / 1e9:.2f} | {seconds:.0f} | {peak / 1e9:.2f} | "
              f"{peak / weights:.2f}× | {size} |")  # fmt: skip


if __name__ == "__main__":
    main()
