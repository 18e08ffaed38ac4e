#!/usr/bin/env bash
# The TensorRT path as a GPU user runs it, every row in one command, inside the Dockerfile's image on a GPU host:
#   docker build -t fluxexport:25.10 .
#   docker run --gpus all --rm -v "$PWD/gpu-check:/out" fluxexport:25.10 bash scripts/gpu_check.sh /out
# (or `bash scripts/gpu_check.sh [WORKDIR]` anywhere with a CUDA GPU, TensorRT's Python module, polygraphy and a
# tritonserver with the TensorRT backend). Without a GPU or TensorRT it refuses in one line (exit 2) and writes
# nothing.
#
# Per tiny model (FLUX.1 schnell, dev, Kontext; FLUX.2 klein and dev): bf16 graphs with the transformer's parts,
# quantize's FP8 transformer; validate the graphs; bf16 engines in two resolution buckets, able to stream weights;
# validate --engines; images at sizes in both buckets against PyTorch on the GPU, alternating sizes with CUDA graphs
# equal to CUDA graphs off; weight streaming at 50%; --low-vram; step caches on the engines (computed steps
# and the image against PyTorch with the same cache; --low-vram with a cache); FP8 engines. On tiny-dev: ONNX
# Runtime's CUDA optimizer, bf16 and FP8 refit of a LoRA (against PyTorch with the LoRA merged, and against engines
# built from the graph exported with the LoRA merged), and a Triton repository from the engine folder served by
# tritonserver, requests sent through tritonclient in both buckets. Every row prints PASS or FAIL with its reason
# (the numbers it measured, or the last line of its log in WORKDIR/logs); FP8 rows below compute capability 8.9
# print SKIP. Then (issue 30) the transformer's variants at 1024² on one model (VARIANT_MODEL, default tiny-dev):
# BF16, FP8 Linears, FP8 with attention, NVFP4 (compute 10.0, else SKIP and build --precision nvfp4 refused),
# native Attention vs portable (TensorRT 10.15, else SKIP): step time and PSNR against BF16.
# The script exits 1 when any row failed.
set -uo pipefail
py=${PYTHON:-python3}

# ---- refuse in one line, before anything is written, where the check cannot run
missing=$("$py" - <<'PY' 2>&1
missing = []
try:
    import torch
except ImportError:
    missing.append("no torch")
else:
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU visible to torch")
try:
    import tensorrt

    tensorrt.__version__  # a stubs-only or half-installed package imports without it
except (ImportError, AttributeError, OSError):
    missing.append("no TensorRT Python module")
print(" and ".join(missing))
PY
) || missing="$py cannot run: $missing"
if [ -n "$missing" ]; then
  echo "gpu_check.sh needs an NVIDIA GPU and TensorRT ($missing): run it in the Dockerfile's image on a GPU host," \
    "docker run --gpus all --rm -v \"\$PWD/gpu-check:/out\" fluxexport:25.10 bash scripts/gpu_check.sh /out" >&2
  exit 2
fi

work=${1:-engines/gpu-check}
mkdir -p "$work/logs"
summary="$work/summary.tsv"
printf 'result\tmodel\trow\treason\n' > "$summary"

# row RESULT MODEL NAME REASON: one line on stdout and in the summary
row() {
  printf '%-4s  %-14s  %s%s\n' "$1" "$2" "$3" "${4:+: $4}"
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$summary"
}
# step MODEL NAME COMMAND…: PASS or FAIL; the reason is the last line the command printed (its numbers)
step() {
  local model=$1 name=$2 log last status; shift 2
  log="$work/logs/$(printf '%s-%s' "$model" "$name" | tr -c 'A-Za-z0-9_.-' '_').log"
  "$@" >"$log" 2>&1
  status=$?
  last=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-200)
  if [ "$status" = 0 ]; then
    row PASS "$model" "$name" "$last"
    return 0
  fi
  row FAIL "$model" "$name" "${last:-exit status $status} (log: $log)"
  return 1
}
# psnr_at_least MIN A.png B.png: prints the PSNR, fails below MIN
psnr_at_least() {
  "$py" - "$@" <<'PY'
import sys
import numpy as np
from PIL import Image
low, a, b = float(sys.argv[1]), *(np.asarray(Image.open(p), dtype=np.float64) for p in sys.argv[2:])
mse = ((a - b) ** 2).mean()
value = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
print(f"{value:.1f} dB (needs ≥ {low:g})")
sys.exit(0 if value >= low else 1)
PY
}
# refused_with TEXT COMMAND…: the command exits 1 with one "Error:" line holding TEXT and no traceback
refused_with() {
  local text=$1 output status; shift
  output=$("$@" 2>&1)
  status=$?
  if [ "$status" = 1 ] && [ "$(grep -c '^Error:' <<<"$output")" = 1 ] && grep -qF "$text" <<<"$output" \
    && ! grep -q 'Traceback' <<<"$output"; then
    grep '^Error:' <<<"$output" | cut -c1-160
    return 0
  fi
  printf 'expected a one-line refusal with "%s", got exit %s: %s\n' "$text" "$status" "$(tail -n 1 <<<"$output")"
  return 1
}
# same_image A.png B.png: bit for bit
same_image() {
  "$py" -c "import sys, numpy as np; from PIL import Image; a, b = (np.asarray(Image.open(p)) for p in sys.argv[1:]); print('bit for bit' if np.array_equal(a, b) else 'images differ'); sys.exit(0 if np.array_equal(a, b) else 1)" "$@"
}
# run_image MODEL OUT.png ARGS…: `fluxexport run` with the common prompt
run_image() {
  local model=$1 out=$2; shift 2
  fluxexport run --model "$model" --prompt "a red fox" --seed 3 --output "$out" "$@"
}

"$py" - <<'PY'
import tensorrt, torch
print(f"TensorRT {tensorrt.__version__} · {torch.cuda.get_device_name()} · "
      f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}")
PY
fp8_ok=$("$py" -c "import torch; print(int(torch.cuda.get_device_capability() >= (8, 9)))")
bounds=(--min-resolution 64 --opt-resolution 256 --max-resolution 1024 --resolution-buckets 2)

for model in tiny-schnell tiny-dev tiny-kontext tiny-klein tiny-flux2-dev; do
  dir="$work/$model"
  onnx="$dir/onnx"
  step "$model" "export bf16 with the transformer's parts" \
    fluxexport export --model "$model" --dtype bf16 --transformer-parts --out "$onnx" || continue
  if [ "$fp8_ok" = 1 ]; then
    step "$model" "quantize fp8" fluxexport quantize --model "$model" --out "$onnx" --calib-size 4 --transformer-parts
  else
    row SKIP "$model" "quantize fp8" "needs compute capability 8.9"
  fi
  step "$model" "validate graphs (ONNX Runtime vs PyTorch)" \
    fluxexport validate --model "$model" --engines "$onnx" --report "$dir/validation.json"
  run_image "$model" "$dir/torch.png" --backend torch --dtype bf16 >/dev/null 2>&1

  engines="$dir/trt-bf16"
  if step "$model" "build bf16, 2 buckets, weight streaming" fluxexport build --model "$model" --precision bf16 \
      --onnx "$onnx" --out "$engines" "${bounds[@]}" --weight-streaming; then
    step "$model" "validate --engines bf16 (vs ONNX Runtime and PyTorch, both buckets)" \
      fluxexport validate --model "$model" --engines "$engines" --report "$engines/validation.json"
    step "$model" "TensorRT bf16 in both buckets vs PyTorch bf16 on the GPU; sizes A,B,A,C: CUDA graphs = none" \
      "$py" - "$model" "$engines" <<'PY'
import sys
import numpy as np
from fluxexport.compare import psnr
from fluxexport.models.source import resolve_model
from fluxexport.pytorch.backend import TorchBackend
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.tensorrt.backend import TensorRTBackend
source = resolve_model(sys.argv[1])
sizes = [(256, 256), (640, 640), (256, 256), (576, 768), (144, 272), (640, 640)]  # both sides ≥ 544: bucket 2
def images(backend):
    return [generate(backend, source, GenerationRequest("a red fox", height=h, width=w, num_inference_steps=4,
                                                        seed=i)).images for i, (h, w) in enumerate(sizes)]
with TensorRTBackend(source, sys.argv[2]) as backend:
    graphs = images(backend)
    captured = len(backend.runners["transformer"].captured) if "transformer" in backend.runners else 0
with TensorRTBackend(source, sys.argv[2], cuda_graphs=False) as backend:
    plain = images(backend)
torch_images = images(TorchBackend(source, "bf16", "cuda"))
bad = [size for size, a, b in zip(sizes, graphs, plain) if not np.array_equal(a, b)]
low = min(psnr(a, b) for a, b in zip(graphs, torch_images))
print(f"{captured} transformer graphs captured; graphs = no graphs at every size: {not bad}; "
      f"min PSNR vs PyTorch {low:.1f} dB (needs ≥ 30)")
sys.exit(f"CUDA-graph images differ at {bad}" if bad else 0 if low >= 30 and captured >= 4 else 1)
PY
    run_image "$model" "$dir/bf16.png" --backend tensorrt --engines "$engines" >/dev/null 2>&1
    step "$model" "TensorRT bf16 weight streaming 50%" run_image "$model" "$dir/streamed.png" --backend tensorrt \
      --engines "$engines" --weight-streaming-budget 50% \
      && step "$model" "weight streaming 50% image vs no streaming" psnr_at_least 40 "$dir/streamed.png" "$dir/bf16.png"
    step "$model" "TensorRT bf16 --low-vram" run_image "$model" "$dir/lowvram.png" --backend tensorrt \
      --engines "$engines" --low-vram \
      && step "$model" "--low-vram image = default" same_image "$dir/lowvram.png" "$dir/bf16.png"
    caches="first-block:threshold=0.2 taylorseer:interval=3,warmup=2"
    [ "$model" = tiny-dev ] && caches="$caches magcache:ratios=flux-dev"  # FLUX.1 [dev]'s published ratios
    for cache in $caches; do
      step "$model" "--cache $cache on the engines (and with --low-vram) vs PyTorch with the cache" \
        "$py" - "$model" "$engines" "$cache" <<'PY'
import sys
import numpy as np
from fluxexport.compare import psnr
from fluxexport.models.source import resolve_model
from fluxexport.pytorch.backend import TorchBackend
from fluxexport.runtime.cache import parse_cache
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.tensorrt.backend import TensorRTBackend
source, engines, cache = resolve_model(sys.argv[1]), sys.argv[2], parse_cache(sys.argv[3])
request = GenerationRequest("a red fox", height=256, width=256, num_inference_steps=12, seed=1)
with TensorRTBackend(source, engines) as backend:
    ours = generate(backend, source, request, cache=cache)
with TensorRTBackend(source, engines, low_vram=True) as backend:
    low = generate(backend, source, request, cache=cache)
theirs = generate(TorchBackend(source, "bf16", "cuda"), source, request, cache=cache)
value = psnr(ours.images, theirs.images)
print(f"computed {ours.computed_steps} of 12 steps (PyTorch {theirs.computed_steps}, --low-vram "
      f"{low.computed_steps}); {value:.1f} dB vs PyTorch (needs ≥ 25); --low-vram bit for bit: "
      f"{np.array_equal(low.images, ours.images)}")
ok = ours.computed_steps < 12 and value >= 25 and np.array_equal(low.images, ours.images)
sys.exit(0 if ok and low.computed_steps == ours.computed_steps else 1)
PY
    done
    step "$model" "bench TensorRT bf16" fluxexport bench --model "$model" --backend tensorrt --engines "$engines" \
      --json "$dir/bench-bf16.json"
  fi

  if [ "$fp8_ok" = 1 ]; then
    fp8="$dir/trt-fp8"
    step "$model" "build fp8, 2 buckets" fluxexport build --model "$model" --precision fp8 --onnx "$onnx" \
      --out "$fp8" "${bounds[@]}" \
      && step "$model" "validate --engines fp8" fluxexport validate --model "$model" --engines "$fp8" \
        --report "$fp8/validation.json" \
      && step "$model" "TensorRT fp8 run" run_image "$model" "$dir/fp8.png" --backend tensorrt --engines "$fp8" \
      && step "$model" "TensorRT fp8 image vs PyTorch bf16" psnr_at_least 22 "$dir/fp8.png" "$dir/torch.png"
  else
    row SKIP "$model" "TensorRT fp8 engines" "needs compute capability 8.9"
  fi
done

model=tiny-dev
dir="$work/$model"
# ONNX Runtime's optimizer for CUDA on fp32 graphs, validated on the GPU (onnxruntime-gpu)
fp32="$dir/onnx-fp32"
step "$model" "export fp32" fluxexport export --model "$model" --out "$fp32" \
  && step "$model" "optimize --provider cuda" fluxexport optimize --model "$model" --engines "$fp32" --provider cuda \
  && step "$model" "validate optimize --provider cuda (ONNX Runtime vs PyTorch)" \
       fluxexport validate --model "$model" --engines "$fp32" --report "$fp32/validation.json"

# LoRA refit: refittable engines, a PEFT LoRA on the first blocks, refit; the image against PyTorch with the LoRA
# merged, and against engines built from the graphs exported with the LoRA merged
lora="$dir/lora.safetensors"
"$py" - "$model" "$lora" <<'PY'
import sys, torch
from safetensors.torch import save_file
from fluxexport.models.loaders import load_transformer
from fluxexport.models.source import resolve_model
transformer, state = load_transformer(resolve_model(sys.argv[1])), {}
generator = torch.Generator().manual_seed(0)
for name, module in transformer.named_modules():
    if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks.0.", "single_transformer_blocks.0.")):
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.3
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.3
save_file(state, sys.argv[2])
PY
run_image "$model" "$dir/torch-lora.png" --backend torch --dtype bf16 --lora "$lora:0.8" >/dev/null 2>&1
merged="$dir/trt-bf16-merged"
step "$model" "export bf16 with the LoRA merged (export --lora)" fluxexport export --model "$model" --dtype bf16 \
  --lora "$lora:0.8" --out "$dir/onnx-merged" \
  && step "$model" "build bf16 from the merged graphs" fluxexport build --model "$model" --lora "$lora:0.8" \
    --precision bf16 --onnx "$dir/onnx-merged" --out "$merged" "${bounds[@]}" \
  && run_image "$model" "$dir/merged.png" --backend tensorrt --engines "$merged" --lora "$lora:0.8" >/dev/null 2>&1
for precision in bf16 fp8; do
  if [ "$precision" = fp8 ] && [ "$fp8_ok" != 1 ]; then row SKIP "$model" "TensorRT fp8 refit" "needs compute capability 8.9"; continue; fi
  refittable="$dir/trt-$precision-refittable"
  step "$model" "build $precision --refittable" fluxexport build --model "$model" --precision "$precision" \
    --onnx "$dir/onnx" --out "$refittable" --refittable "${bounds[@]}" || continue
  if [ "$precision" = fp8 ]; then  # a LoRA on FP8 block weights is refused (fuse, then quantize), nothing written
    step "$model" "refit fp8 with a block LoRA refused in one line" refused_with "in FP8: a refit would quantize" \
      fluxexport refit --model "$model" --engines "$refittable" --lora "$lora:0.8"
    continue
  fi
  step "$model" "refit $precision, LoRA 0.8" fluxexport refit --model "$model" --engines "$refittable" \
    --lora "$lora:0.8" || continue
  step "$model" "validate refitted $precision (vs the graphs with the LoRA)" fluxexport validate --model "$model" \
    --lora "$lora:0.8" --engines "$refittable" --report "$refittable/validation.json"
  step "$model" "run refitted $precision" run_image "$model" "$dir/refit-$precision.png" --backend tensorrt \
    --engines "$refittable" --lora "$lora:0.8" || continue
  floor=30; [ "$precision" = fp8 ] && floor=22
  step "$model" "refitted $precision vs PyTorch with the LoRA merged" \
    psnr_at_least "$floor" "$dir/refit-$precision.png" "$dir/torch-lora.png"
  [ "$precision" = bf16 ] && step "$model" "refitted bf16 vs engines built with the LoRA merged" \
    psnr_at_least 35 "$dir/refit-bf16.png" "$dir/merged.png"
done

# Triton from the bf16 engine folder: tritonserver with the TensorRT backend, requests through tritonclient in
# both buckets, each image against `run --backend tensorrt` on the same engines
repository="$dir/triton"
if [ -x /opt/tritonserver/bin/tritonserver ] && [ -d /opt/tritonserver/backends/tensorrt ]; then
  rm -rf "$repository"
  step "$model" "triton repository from the engines" fluxexport triton --model "$model" --engines "$dir/trt-bf16" \
    --out "$repository" \
  && step "$model" "tritonserver: requests in both buckets = run --backend tensorrt" \
    "$py" - "$model" "$dir/trt-bf16" "$repository" <<'PY'
import sys
import tritonclient.http as http
from fluxexport.compare import psnr
from fluxexport.models.source import resolve_model
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.tensorrt.backend import TensorRTBackend
from fluxexport.triton.client import pipeline_inputs
from fluxexport.triton.server import TritonServer, find_tritonserver
source, engines, repository = resolve_model(sys.argv[1]), sys.argv[2], sys.argv[3]
values = {}
with TritonServer(repository, find_tritonserver()) as server:
    client = http.InferenceServerClient(server.http_url.removeprefix("http://"))
    served = {size: client.infer("flux_pipeline", pipeline_inputs(http, "a red fox", height=size[0], width=size[1],
                                 num_inference_steps=4, seed=7)).as_numpy("images") for size in [(256, 256), (640, 640)]}
with TensorRTBackend(source, engines) as backend:
    for (height, width), images in served.items():
        local = generate(backend, source, GenerationRequest("a red fox", height=height, width=width,
                                                            num_inference_steps=4, seed=7)).images
        values[f"{width}×{height}"] = psnr(images, local)
print(", ".join(f"{size}: {value:.1f} dB" for size, value in values.items()) + " (needs ≥ 40)")
sys.exit(0 if min(values.values()) >= 40 else 1)
PY
else
  row FAIL "$model" "triton from engines" "no /opt/tritonserver with the TensorRT backend: run in the Dockerfile's image"
fi

# ---- issue 30: the transformer's variants side by side at 1024² on one model: BF16, FP8 on the Linears, FP8 with
# the attention matmuls too (quantize --fp8-attention), NVFP4 (Blackwell only), and ONNX's native Attention /
# RMSNormalization (export --native-attention, TensorRT ≥ 10.15) against the portable graph. Each: engines at
# 1024² only, `bench` (transformer step time = the denoising median over the steps), one image, its PSNR against
# the BF16 engines' image. VARIANT_MODEL picks the model (default tiny-dev; a FLUX.1 [dev] checkpoint gives the
# numbers to set beside the README's paper estimate per variant).
vmodel=${VARIANT_MODEL:-tiny-dev}
vdir="$work/variants-$(printf '%s' "$vmodel" | tr -c 'A-Za-z0-9_.-' '_')"
side=(--min-resolution 1024 --opt-resolution 1024 --max-resolution 1024)
mkdir -p "$vdir"
# variant NAME PRECISION ONNX: engines at 1024², bench, the image (vdir/NAME.png)
variant() {
  local name=$1 precision=$2 onnx=$3 engines="$vdir/trt-$1"
  step "$vmodel" "variant $name: build $precision at 1024²" fluxexport build --model "$vmodel" \
    --precision "$precision" --onnx "$onnx" --out "$engines" "${side[@]}" || return 1
  step "$vmodel" "variant $name: bench at 1024²" fluxexport bench --model "$vmodel" --backend tensorrt \
    --engines "$engines" --height 1024 --width 1024 --json "$vdir/bench-$name.json" || return 1
  step "$vmodel" "variant $name: image at 1024²" run_image "$vmodel" "$vdir/$name.png" --backend tensorrt \
    --engines "$engines" --height 1024 --width 1024
}
compute=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
nvfp4_ok=$("$py" -c "import torch; print(int(torch.cuda.get_device_capability() >= (10, 0)))")
native_ok=$("$py" -c "import tensorrt; print(int(tuple(map(int, tensorrt.__version__.split('.')[:2])) >= (10, 15)))")
if step "$vmodel" "variants: export bf16" fluxexport export --model "$vmodel" --dtype bf16 --out "$vdir/onnx"; then
  variant bf16 bf16 "$vdir/onnx"
  if [ "$fp8_ok" = 1 ]; then
    step "$vmodel" "variant fp8: quantize the Linears" fluxexport quantize --model "$vmodel" --out "$vdir/onnx" \
      --calib-size 4 && variant fp8 fp8 "$vdir/onnx"
    rm -rf "$vdir/onnx-fp8-attention" && cp -r "$vdir/onnx" "$vdir/onnx-fp8-attention" \
      && step "$vmodel" "variant fp8-attention: quantize --fp8-attention" fluxexport quantize --model "$vmodel" \
        --out "$vdir/onnx-fp8-attention" --calib-size 4 --fp8-attention \
      && variant fp8-attention fp8 "$vdir/onnx-fp8-attention"
  else
    row SKIP "$vmodel" "variants fp8, fp8-attention" "skipped (needs compute 8.9, this GPU is $compute)"
  fi
  if [ "$nvfp4_ok" = 1 ]; then
    step "$vmodel" "variant nvfp4: quantize --precision nvfp4" fluxexport quantize --model "$vmodel" \
      --out "$vdir/onnx" --calib-size 4 --precision nvfp4 && variant nvfp4 nvfp4 "$vdir/onnx"
  else
    row SKIP "$vmodel" "variant nvfp4" "skipped (needs compute 10.0, this GPU is $compute)"
    step "$vmodel" "build --precision nvfp4 refused in one line below compute 10.0" \
      refused_with "NVFP4 needs compute capability 10.0" fluxexport build --model "$vmodel" --precision nvfp4 \
      --onnx "$vdir/onnx" --out "$vdir/trt-nvfp4" "${side[@]}"
  fi
  if [ "$native_ok" = 1 ]; then
    step "$vmodel" "variant native: export --native-attention" fluxexport export --model "$vmodel" --dtype bf16 \
      --native-attention --out "$vdir/onnx-native" && variant native bf16 "$vdir/onnx-native"
  else
    row SKIP "$vmodel" "variant native attention" "skipped (needs TensorRT 10.15 to parse Attention)"
  fi
  # each variant's image against the bf16 engines' (native: the same math, fused differently)
  for pair in fp8:22 fp8-attention:22 nvfp4:18 native:40; do
    name=${pair%%:*}
    [ -f "$vdir/$name.png" ] && [ -f "$vdir/bf16.png" ] \
      && step "$vmodel" "variant $name image vs bf16" psnr_at_least "${pair##*:}" "$vdir/$name.png" "$vdir/bf16.png"
  done
  step "$vmodel" "variants: transformer step time at 1024²" "$py" - "$vdir" <<'PY'
import json, sys
from pathlib import Path
rows = []
for name in ("bf16", "fp8", "fp8-attention", "nvfp4", "native"):
    path = Path(sys.argv[1]) / f"bench-{name}.json"
    if path.is_file():
        bench = json.loads(path.read_text())
        rows.append(f"{name} {bench['median_ms']['denoise'] / bench['computed_steps']:.1f} ms")
print("; ".join(rows) + " per step (denoising median / steps)")
sys.exit(0 if rows else 1)
PY
fi

failed=$(grep -c '^FAIL' "$summary")
passed=$(grep -c '^PASS' "$summary")
skipped=$(grep -c '^SKIP' "$summary")
echo "$passed passed, $failed failed, $skipped skipped (table: $summary)"
[ "$failed" = 0 ]
