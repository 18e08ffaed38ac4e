#!/usr/bin/env bash
# The TensorRT path as a GPU user runs it, on a GPU host with TensorRT (inside the Dockerfile's image; the
# Triton step needs a tritonserver with the TensorRT backend, as in Dockerfile.triton's image):
#   bash scripts/gpu_check.sh [WORKDIR]
# Per tiny model (FLUX.1 schnell, dev, Kontext; FLUX.2 klein and dev): bf16 graphs + quantize's FP8 transformer; engines in two resolution buckets (bf16 and FP8);
# validate; images at alternating sizes in both buckets with CUDA graphs on equal to CUDA graphs off; weight
# streaming at 50%; --low-vram; torch/TensorRT benchmarks. On tiny-dev: bf16 and FP8 refit against torch with
# the LoRA merged, `optimize --provider cuda`, and a Triton repository from the engine folder served by a real
# tritonserver with requests in both buckets. Every step is a row of one table; a step that fails is a FAIL
# row (the script goes on), an FP8 step below compute capability 8.9 a "skipped (needs compute 8.9)" row.
set -uo pipefail
work=${1:-engines/gpu-check}
mkdir -p "$work"
summary="$work/summary.tsv"
printf 'model\tstep\tresult\n' > "$summary"
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$summary"; }
# step MODEL NAME COMMAND…: a pass/FAIL row (its log in $work/logs/)
mkdir -p "$work/logs"
step() {
  local model=$1 name=$2; shift 2
  local log="$work/logs/$(printf '%s-%s' "$model" "$name" | tr -c 'A-Za-z0-9_.-' '_').log"
  if "$@" >"$log" 2>&1; then record "$model" "$name" pass; return 0; fi
  record "$model" "$name" "FAIL (see $log)"; return 1
}
median_total() { python -c "import json, sys; print(round(json.load(open(sys.argv[1]))['median_ms']['total'], 1))" "$1" 2>/dev/null || echo n/a; }
psnr() {
  python - "$1" "$2" <<'PY' 2>/dev/null || echo n/a
import sys
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(path), dtype=np.float64) for path in sys.argv[1:])
mse = ((a - b) ** 2).mean()
print("inf" if mse == 0 else f"{10 * np.log10(255**2 / mse):.1f}")
PY
}
same() { python -c "import sys, numpy as np; from PIL import Image; a, b = (np.asarray(Image.open(p)) for p in sys.argv[1:]); sys.exit(0 if np.array_equal(a, b) else 1)" "$1" "$2"; }

python - <<'PY'
import tensorrt, torch
print(f"TensorRT {tensorrt.__version__} · {torch.cuda.get_device_name()} · "
      f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}")
PY
fp8_ok=$(python -c "import torch; print(int(torch.cuda.get_device_capability() >= (8, 9)))")
precisions="bf16"; [ "$fp8_ok" = 1 ] && precisions="bf16 fp8"
bounds=(--min-resolution 64 --opt-resolution 256 --max-resolution 1024 --resolution-buckets 2)

for model in tiny-schnell tiny-dev tiny-kontext tiny-klein tiny-flux2-dev; do
  onnx="$work/$model/onnx"
  flux2=0; case "$model" in tiny-klein|tiny-flux2-dev) flux2=1 ;; esac  # FLUX.2: no transformer parts, no step caches yet
  parts=(--transformer-parts); [ "$flux2" = 1 ] && parts=()
  step "$model" "export bf16" fluxexport export --model "$model" --dtype bf16 "${parts[@]}" --out "$onnx" || continue
  if [ "$fp8_ok" = 1 ]; then
    step "$model" "quantize fp8" fluxexport quantize --model "$model" --out "$onnx" --calib-size 8
  else
    record "$model" "quantize fp8" "skipped (needs compute 8.9)"
  fi
  step "$model" "validate graphs (ORT vs torch)" \
    fluxexport validate --model "$model" --engines "$onnx" --report "$work/$model/validation.json"
  fluxexport run --model "$model" --backend torch --dtype bf16 --prompt "a red fox" --output "$work/$model/torch.png" \
    >/dev/null 2>&1
  fluxexport bench --model "$model" --backend torch --dtype bf16 --json "$work/$model/bench-torch.json" >/dev/null 2>&1
  record "$model" "torch bf16 total (ms)" "$(median_total "$work/$model/bench-torch.json")"
  for precision in bf16 fp8; do
    engines="$work/$model/trt-$precision"
    if [ "$precision" = fp8 ] && [ "$fp8_ok" != 1 ]; then
      record "$model" "TensorRT fp8 engines" "skipped (needs compute 8.9)"; continue
    fi
    extra=(); [ "$precision" = bf16 ] && extra=(--weight-streaming)
    step "$model" "build $precision, 2 buckets" fluxexport build --model "$model" --precision "$precision" \
      --onnx "$onnx" --out "$engines" "${bounds[@]}" "${extra[@]}" || continue
    step "$model" "validate TensorRT $precision (vs ORT and torch, both buckets)" \
      fluxexport validate --model "$model" --engines "$engines" --report "$engines/validation.json"
    # alternating sizes in one process, CUDA graphs on and off: every image equal
    step "$model" "TensorRT $precision: sizes A,B,A across buckets, CUDA graphs = no graphs" python - "$model" "$engines" <<'PY'
import sys, numpy as np
from fluxexport.models.source import resolve_model
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.tensorrt.backend import TensorRTBackend
source = resolve_model(sys.argv[1])
sizes = [(256, 256), (640, 640), (144, 272), (256, 256), (768, 512), (640, 640)]
def images(backend):
    return [generate(backend, source, GenerationRequest("a red fox", height=h, width=w, num_inference_steps=4,
                                                        seed=i)).images for i, (h, w) in enumerate(sizes)]
graphs, plain = images(TensorRTBackend(source, sys.argv[2])), images(TensorRTBackend(source, sys.argv[2], cuda_graphs=False))
bad = [size for size, a, b in zip(sizes, graphs, plain) if not np.array_equal(a, b)]
sys.exit(f"CUDA-graph images differ at {bad}" if bad else 0)
PY
    fluxexport run --model "$model" --backend tensorrt --engines "$engines" --prompt "a red fox" \
      --output "$work/$model/$precision.png" >/dev/null 2>&1
    record "$model" "TensorRT $precision vs torch bf16 (PSNR dB)" "$(psnr "$work/$model/$precision.png" "$work/$model/torch.png")"
    step "$model" "TensorRT $precision --low-vram = default" fluxexport run --model "$model" --backend tensorrt \
      --engines "$engines" --low-vram --prompt "a red fox" --output "$work/$model/$precision-lowvram.png" \
      && { same "$work/$model/$precision-lowvram.png" "$work/$model/$precision.png" \
           || record "$model" "TensorRT $precision --low-vram = default" "FAIL (images differ)"; }
    if [ "$precision" = bf16 ]; then
      # step caches around the engines: how many steps ran, and the image against the same steps without a cache
      fluxexport run --model "$model" --backend tensorrt --engines "$engines" --prompt "a red fox" --steps 12 \
        --output "$work/$model/steps12.png" >/dev/null 2>&1
      caches="taylorseer:interval=3,warmup=2 first-block:threshold=0.2 magcache:ratios=flux-dev"
      [ "$flux2" = 1 ] && caches=""
      for cache in $caches; do
        step "$model" "TensorRT bf16 --cache $cache" fluxexport run --model "$model" --backend tensorrt \
          --engines "$engines" --prompt "a red fox" --steps 12 --cache "$cache" --output "$work/$model/${cache%%:*}.png"
        record "$model" "--cache $cache vs none, 12 steps (PSNR dB)" \
          "$(psnr "$work/$model/${cache%%:*}.png" "$work/$model/steps12.png")"
      done
      step "$model" "TensorRT bf16 weight streaming 50%" fluxexport run --model "$model" --backend tensorrt \
        --engines "$engines" --weight-streaming-budget 50% --prompt "a red fox" --output "$work/$model/streamed.png"
      record "$model" "weight streaming 50% vs no streaming (PSNR dB)" "$(psnr "$work/$model/streamed.png" "$work/$model/bf16.png")"
      fluxexport bench --model "$model" --backend tensorrt --engines "$engines" --weight-streaming-budget 50% \
        --json "$work/$model/bench-streamed.json" >/dev/null 2>&1
      record "$model" "TensorRT bf16 streaming 50% total (ms)" "$(median_total "$work/$model/bench-streamed.json")"
    fi
    fluxexport bench --model "$model" --backend tensorrt --engines "$engines" --json "$work/$model/bench-$precision.json" \
      >/dev/null 2>&1
    record "$model" "TensorRT $precision total (ms)" "$(median_total "$work/$model/bench-$precision.json")"
  done
done

model=tiny-dev
# ONNX Runtime's optimizer for CUDA on fp32 graphs, validated on the GPU (onnxruntime-gpu)
fp32="$work/$model/onnx-fp32"
step "$model" "export fp32" fluxexport export --model "$model" --out "$fp32" \
  && step "$model" "optimize --provider cuda" fluxexport optimize --model "$model" --engines "$fp32" --provider cuda \
  && step "$model" "validate optimize --provider cuda (ORT vs torch)" \
       fluxexport validate --model "$model" --engines "$fp32" --report "$fp32/validation.json"

# LoRA refit: refittable engines, a PEFT LoRA on the first blocks, refit, validate, image vs torch with the LoRA merged
lora="$work/$model/lora.safetensors"
python - "$model" "$lora" <<'PY'
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
fluxexport run --model "$model" --backend torch --dtype bf16 --lora "$lora:0.8" --prompt "a red fox" \
  --output "$work/$model/torch-lora.png" >/dev/null 2>&1
for precision in bf16 fp8; do
  if [ "$precision" = fp8 ] && [ "$fp8_ok" != 1 ]; then record "$model" "TensorRT fp8 refit" "skipped (needs compute 8.9)"; continue; fi
  refittable="$work/$model/trt-$precision-refittable"
  step "$model" "build $precision --refittable" fluxexport build --model "$model" --precision "$precision" \
    --onnx "$work/$model/onnx" --out "$refittable" --refittable "${bounds[@]}" || continue
  step "$model" "refit $precision LoRA 0.8" fluxexport refit --model "$model" --engines "$refittable" --lora "$lora:0.8" \
    || continue
  step "$model" "validate refitted $precision (vs the graph with the LoRA)" fluxexport validate --model "$model" \
    --lora "$lora:0.8" --engines "$refittable" --report "$refittable/validation.json"
  fluxexport run --model "$model" --backend tensorrt --engines "$refittable" --lora "$lora:0.8" --prompt "a red fox" \
    --output "$work/$model/refit-$precision.png" >/dev/null 2>&1
  record "$model" "TensorRT refit $precision vs torch, LoRA 0.8 (PSNR dB)" \
    "$(psnr "$work/$model/refit-$precision.png" "$work/$model/torch-lora.png")"
done

# Triton from the bf16 engine folder, requests in both buckets, each image against `run --backend tensorrt`
repository="$work/$model/triton"
if [ -d /opt/tritonserver/backends/tensorrt ] && command -v tritonserver >/dev/null; then
  rm -rf "$repository"
  step "$model" "triton repository from engines" fluxexport triton --model "$model" --engines "$work/$model/trt-bf16" \
    --out "$repository" \
  && step "$model" "tritonserver: requests in both buckets = run --backend tensorrt" python - "$model" "$work/$model/trt-bf16" "$repository" <<'PY'
import sys, numpy as np, tritonclient.http as http
from fluxexport.models.source import resolve_model
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.tensorrt.backend import TensorRTBackend
from fluxexport.triton.client import pipeline_inputs
from fluxexport.triton.server import TritonServer, find_tritonserver
from fluxexport.compare import psnr
source, engines, repository = resolve_model(sys.argv[1]), sys.argv[2], sys.argv[3]
backend = TensorRTBackend(source, engines)
with TritonServer(repository, find_tritonserver()) as server:
    client = http.InferenceServerClient(server.http_url.removeprefix("http://"))
    for height, width in [(256, 256), (640, 640)]:
        inputs = pipeline_inputs(http, "a red fox", height=height, width=width, num_inference_steps=4, seed=7)
        served = client.infer("flux_pipeline", inputs).as_numpy("images")
        local = generate(backend, source, GenerationRequest("a red fox", height=height, width=width,
                                                            num_inference_steps=4, seed=7)).images
        value = psnr(served, local)
        print(f"{width}×{height}: {value:.1f} dB")
        if value < 40:
            sys.exit(f"Triton's {width}×{height} image differs from run --backend tensorrt ({value:.1f} dB)")
PY
else
  record "$model" "triton from engines" "skipped (no tritonserver with the TensorRT backend: run in Dockerfile.triton's image)"
fi

python - "$summary" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1]), delimiter="\t"))
widths = [max(len(row[i]) for row in rows) for i in range(3)]
for row in rows:
    print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
failed = sum(row[2].startswith("FAIL") for row in rows[1:])
print(f"{len(rows) - 1 - failed} passed, {failed} failed")
PY
! grep -q $'\tFAIL' "$summary"
