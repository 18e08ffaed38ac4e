"""The whole user path at real width, each step a separate `fluxexport` process: wall time and peak RSS.

Writes a random diffusers folder at full width (block by block, as `bench_scale.py` does; few blocks), then runs
what a user runs, in order: export (bf16, with the transformer's parts), validate the graphs, quantize (FP8),
build bf16 engines (refittable) over the stand-in TensorRT, validate --engines, refit with a LoRA, write a Triton
repository from the engines, and run --cache first-block on the engines. Each step is one CLI process under
`/usr/bin/time` (its peak RSS); the steps that need TensorRT run the same CLI with `tests/standin_tensorrt.py`
installed as `tensorrt` and its host device in place of CUDA (the stand-in replaces only what TensorRT and CUDA
do: its engines run with ONNX Runtime on the host, so their memory is host memory here, not GPU memory).

    python scripts/bench_user_path.py                      # FLUX.1-dev width and FLUX.2 [klein] 4B width
    python scripts/bench_user_path.py --model flux1-dev    # one of them

FLUX.1-dev: transformer 3072 = 24 × 128 wide, T5-XXL (4096 / 10240), CLIP-L, tiny-dev's VAE, tokenizers and
scheduler; by default 1 double + 2 single blocks and 1 T5 layer (~2.5 GB bf16 in all). FLUX.2 [klein] 4B:
transformer 3072 = 24 × 128 wide, 128 latent channels, joint width 7680 (three Qwen3 hidden states of 2560),
no guidance embedding; Qwen3-4B's text stack (2560 wide, MLP 9728, 32 query / 8 key-value heads, vocabulary
151936, tied embeddings) at 4 layers read at layers 1, 2, 3 (`--text-encoder-layers`: the published 9, 18, 27
need 27 layers); tiny-klein's VAE, tokenizer and scheduler. The table's "weights GB" is the largest component's
bf16 weights (the transformer's), the bound of issue 27 being peak ≤ 3× that.
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
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import parameter_shapes, write_checkpoint, write_random_part  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# FLUX.2 [klein] 4B's published transformer (5 double + 20 single blocks; depth reduced by --double/--single)
KLEIN_4B_TRANSFORMER = {
    "_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128, "out_channels": None,
    "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128, "num_attention_heads": 24,
    "joint_attention_dim": 7680, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False,
}  # fmt: skip
# its text encoder, Qwen3-4B (36 layers published)
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": True,
    "attention_bias": False, "pad_token_id": 151643,
}  # fmt: skip

# Run the CLI with the stand-in TensorRT as `tensorrt` and its host device as the GPU (an H100's 80 GiB)
STANDIN = """
import sys
sys.path.insert(0, {tests!r})
from standin_tensorrt import HostDevice, make_tensorrt
trt = make_tensorrt()
import importlib.machinery
trt.__spec__ = trt.__spec__ or importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec("tensorrt") reads it
sys.modules["tensorrt"] = trt
import fluxexport.tensorrt.cuda as cuda
import fluxexport.tensorrt.environment as environment
cuda.CudaDevice = lambda: HostDevice(trt)
environment.current_gpu = lambda index=0: HostDevice(trt).gpu()
for name, module in list(sys.modules.items()):
    if name.startswith("fluxexport.") and getattr(module, "current_gpu", None) is not None:
        module.current_gpu = environment.current_gpu

def session(engine):  # the stand-in upcasts its plan's graph in memory: past 2 GB of float32, through a file
    if engine._session is None:
        import tempfile
        from pathlib import Path
        import onnx_ir as ir
        from fluxexport.onnxruntime.backend import create_session
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "plan.onnx"
            ir.save(ir.from_proto(engine.model), path, external_data="plan.onnx_data")
            engine._session = create_session(path, True, ["CPUExecutionProvider"])
    return engine._session

trt.ICudaEngine.session = session
from fluxexport.cli import main
main(sys.argv[1:], prog_name="fluxexport")
"""


@dataclass
class Step:
    command: str
    seconds: float
    peak: int  # bytes
    ok: bool
    error: str = ""


def write_klein_checkpoint(root: Path, double: int, single: int, text_layers: int) -> dict[str, int]:
    """A diffusers FLUX.2 [klein] 4B-shaped folder: random transformer and Qwen3 text stack at full width;
    tiny-klein's VAE, tokenizer and scheduler."""
    from fluxexport.models.source import resolve_model

    tiny = resolve_model("tiny-klein").root
    for part in ("vae", "tokenizer", "scheduler"):
        shutil.copytree(tiny / part, root / part)
    index = json.loads((tiny / "model_index.json").read_text())
    parts = {
        "transformer": (KLEIN_4B_TRANSFORMER | {"num_layers": double, "num_single_layers": single},
                        "diffusion_pytorch_model.safetensors"),
        "text_encoder": (QWEN3_4B | {"num_hidden_layers": text_layers}, "model.safetensors"),
    }  # fmt: skip
    written = {}
    for seed, (part, (config, weights_name)) in enumerate(parts.items()):
        (root / part).mkdir()
        (root / part / "config.json").write_text(json.dumps(config, indent=2))
        written[part] = write_random_part(root / part, weights_name, parameter_shapes(part, root, index), seed)
    (root / "model_index.json").write_text(json.dumps(index))  # last: a folder without it is partial
    return written


def write_lora(path: Path, checkpoint: Path, model_index: dict | None, rank: int = 16) -> Path:
    """A random diffusers/PEFT LoRA on the first double block's attention projections of the transformer."""
    from safetensors.torch import save_file

    shapes = parameter_shapes("transformer", checkpoint, model_index)
    generator, state = torch.Generator().manual_seed(0), {}
    for name, (shape, _) in shapes.items():
        if name.startswith("transformer_blocks.0.attn.to_") and name.endswith(".weight") and len(shape) == 2:
            layer = name.removesuffix(".weight")
            out, inp = shape
            state[f"transformer.{layer}.lora_A.weight"] = torch.randn(rank, inp, generator=generator) * 0.01
            state[f"transformer.{layer}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * 0.01
    save_file(state, str(path))
    return path


def measure(args: list[str], standin: bool, log: Path) -> Step:
    """One `fluxexport` process under /usr/bin/time: (wall s, peak RSS) and whether it exited 0."""
    python = sys.executable
    program = [python, "-c", STANDIN.format(tests=str(ROOT / "tests"))] if standin else [
        str(Path(python).parent / "fluxexport")]  # fmt: skip
    timing = log.with_suffix(".time")
    start = time.perf_counter()
    with log.open("w") as output:
        run = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(timing), *program, *args], stdout=output,
                             stderr=subprocess.STDOUT, cwd=log.parent)  # fmt: skip
    seconds = time.perf_counter() - start
    peak = int(timing.read_text().split()[-1]) * 1024
    error = "" if run.returncode == 0 else _error_head(log)
    return Step("fluxexport " + " ".join(args), seconds, peak, run.returncode == 0, error)


def _error_head(log: Path) -> str:
    """The first lines of a traceback, or the one-line error."""
    lines = log.read_text(errors="replace").splitlines()
    for index, line in enumerate(lines):
        if line.startswith("Traceback"):
            return " | ".join(lines[index : index + 3] + lines[-2:])
    return " | ".join(line for line in lines[-3:] if line.strip())


def user_path(checkpoint: Path, work: Path, lora: Path, layers: list[str]) -> list[tuple[str, list[str], bool]]:
    """(label, CLI arguments, needs the stand-in) of each step, in the order a user runs them (paths without
    spaces: the arguments are split on them)."""
    onnx, engines, repo = work / "onnx", work / "engines", work / "triton-repo"
    source = ["--model", str(checkpoint), *layers]
    steps = [
        ("export", f"export --dtype bf16 --transformer-parts --out {onnx}", False),
        ("validate (graphs)", f"validate --engines {onnx} --steps 2", False),
        ("quantize", f"quantize --dtype bf16 --out {onnx} --calib-size 1 --calib-steps 1 --calib-resolution 256", False),
        ("build", f"build --precision bf16 --onnx {onnx} --out {engines} --refittable --batch 1:1:1 "
                  "--min-resolution 256 --opt-resolution 256 --max-resolution 512", True),
        ("validate --engines", f"validate --engines {engines} --steps 2", True),
        ("refit", f"refit --lora {lora} --engines {engines}", True),
        ("triton", f"triton --lora {lora} --engines {engines} --out {repo}", True),
        ("run --cache first-block", f"run --lora {lora} --backend tensorrt --engines {engines} --cache first-block "
                                    f"--prompt fox --steps 4 --height 256 --width 256 --output {work / 'fox.png'}", True),
    ]  # fmt: skip
    return [(label, [text.split()[0], *source, *text.split()[1:]], standin) for label, text, standin in steps]


def bench(
    model: str, work: Path, double: int, single: int, text_layers: int, first: str = "export"
) -> tuple[list[Step], int, str]:
    """Write the checkpoint, run every step from `first` on (the earlier ones' output kept in `work`); (steps,
    largest component's bf16 bytes, shape in words)."""
    checkpoint = work / "checkpoint"
    if not (checkpoint / "model_index.json").is_file():
        shutil.rmtree(checkpoint, ignore_errors=True)
        checkpoint.mkdir(parents=True)
        if model == "flux1-dev":
            written = write_checkpoint(checkpoint, double, single, t5_layers=1)
        else:
            written = write_klein_checkpoint(checkpoint, double, single, text_layers)
        (work / "written.json").write_text(json.dumps(written))
    written = json.loads((work / "written.json").read_text())
    index = json.loads((checkpoint / "model_index.json").read_text()) if model != "flux1-dev" else None
    lora = write_lora(work / "lora.safetensors", checkpoint, index)
    layers = ["--text-encoder-layers", "1,2,3"] if model != "flux1-dev" else []
    steps: list[Step] = []
    path = user_path(checkpoint, work, lora, layers)
    labels = [label for label, _, _ in path]
    if first not in labels:
        raise SystemExit(f"--from must be one of: {', '.join(labels)}")
    for label, args, standin in path[labels.index(first) :]:
        step = measure(args, standin, work / f"{label.split()[0]}-{len(steps)}.log")
        steps.append(step)
        state = "ok" if step.ok else f"FAILED: {step.error}"
        print(f"{label}: {step.seconds:.0f} s, peak RSS {step.peak / 1e9:.2f} GB, {state}", flush=True)
    if model == "flux1-dev":
        shape = f"FLUX.1-dev width: {double} double + {single} single blocks at 3072, T5 1 layer at 4096, CLIP-L"
    else:
        shape = (f"FLUX.2 [klein] 4B width: {double} double + {single} single blocks at 3072, Qwen3-4B text stack "
                 f"{text_layers} layers at 2560")  # fmt: skip
    return steps, max(written.values()), shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("flux1-dev", "klein-4b", "both"), default="both")
    parser.add_argument("--double", type=int, default=1, help="Double blocks (default: 1).")
    parser.add_argument("--single", type=int, default=2, help="Single blocks (default: 2).")
    parser.add_argument("--text-layers", type=int, default=4, help="klein: Qwen3 layers (default: 4, read at 1,2,3).")
    parser.add_argument("--work", type=Path, help="Folder for checkpoints, graphs and engines (default: temp).")
    parser.add_argument("--from", dest="first", default="export",
                        help="Start at this step, reusing the earlier steps' output in --work (e.g. 'quantize').")  # fmt: skip
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fluxexport-user-path-"))
    models = ("flux1-dev", "klein-4b") if args.model == "both" else (args.model,)
    tables = []
    for model in models:
        folder = work / model
        folder.mkdir(parents=True, exist_ok=True)
        print(f"== {model} in {folder}", flush=True)
        tables.append(bench(model, folder, args.double, args.single, args.text_layers, args.first))
    print(f"\n{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; TensorRT steps over tests/standin_tensorrt.py")
    for steps, weights, shape in tables:
        print(f"\n{shape}; largest component {weights / 1e9:.2f} GB bf16\n")
        print("| command | weights GB | wall s | peak RSS GB | peak / weights |")
        print("|---|---:|---:|---:|---:|")
        for step in steps:
            command = step.command.split(" --model")[0] + ("" if step.ok else " (failed)")
            print(f"| `{command}` | {weights / 1e9:.2f} | {step.seconds:.0f} | {step.peak / 1e9:.2f} | "
                  f"{step.peak / weights:.2f}× |")  # fmt: skip
        for step in steps:
            if not step.ok:
                print(f"\n`{step.command}` failed: {step.error}")


if __name__ == "__main__":
    main()
