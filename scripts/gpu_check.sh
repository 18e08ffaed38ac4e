#!/usr/bin/env bash
# On a GPU host with TensorRT (e.g. inside the Dockerfile's image): export the tiny models, build BF16 and
# FP8 engines from one graph folder, validate graphs and engines, benchmark torch / TensorRT, check
# `optimize --provider cuda` and a LoRA refit, and print one summary table.
#   bash scripts/gpu_check.sh [WORKDIR]
set -euo pipefail
work=${1:-engines/gpu-check}
mkdir -p "$work"
summary="$work/summary.tsv"
printf 'model\tstep\tresult\n' > "$summary"
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$summary"; }
median_total() { python -c "import json, sys; print(round(json.load(open(sys.argv[1]))['median_ms']['total'], 1))" "$1"; }
psnr() {
  python - "$1" "$2" <<'PY'
import sys
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(path), dtype=np.float64) for path in sys.argv[1:])
mse = ((a - b) ** 2).mean()
print("inf" if mse == 0 else f"{10 * np.log10(255**2 / mse):.1f}")
PY
}

python - <<'PY'
import tensorrt, torch
print(f"TensorRT {tensorrt.__version__} · {torch.cuda.get_device_name()} · "
      f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}")
PY

for model in tiny-schnell tiny-dev tiny-kontext; do
  # one graph folder: bf16 graphs, and quantize's FP8 transformer beside the bf16 one
  onnx="$work/$model/onnx"
  fluxexport export --model "$model" --dtype bf16 --out "$onnx"
  fluxexport quantize --model "$model" --out "$onnx" --calib-size 8
  record "$model" "export bf16 + quantize fp8" ok
  fluxexport validate --model "$model" --engines "$onnx" --report "$work/$model/validation.json" \
    && record "$model" "validate graphs (ORT vs torch)" pass || record "$model" "validate graphs (ORT vs torch)" FAIL
  fluxexport run --model "$model" --backend torch --dtype bf16 --prompt "a red fox" --output "$work/$model/torch.png"
  fluxexport bench --model "$model" --backend torch --dtype bf16 --json "$work/$model/bench-torch.json"
  record "$model" "torch bf16 total (ms)" "$(median_total "$work/$model/bench-torch.json")"
  for precision in bf16 fp8; do
    engines="$work/$model/trt-$precision"
    fluxexport build --model "$model" --precision "$precision" --onnx "$onnx" --out "$engines" \
      --min-resolution 64 --opt-resolution 256 --max-resolution 1024
    fluxexport validate --model "$model" --engines "$engines" --report "$engines/validation.json" \
      && record "$model" "validate TensorRT $precision (vs ORT and torch)" pass \
      || record "$model" "validate TensorRT $precision (vs ORT and torch)" FAIL
    fluxexport run --model "$model" --backend tensorrt --engines "$engines" --prompt "a red fox" \
      --output "$work/$model/$precision.png"
    record "$model" "TensorRT $precision vs torch bf16 (PSNR dB)" "$(psnr "$work/$model/$precision.png" "$work/$model/torch.png")"
    fluxexport bench --model "$model" --backend tensorrt --engines "$engines" --json "$work/$model/bench-$precision.json"
    record "$model" "TensorRT $precision total (ms)" "$(median_total "$work/$model/bench-$precision.json")"
  done
done
# ONNX Runtime's optimizer for CUDA on fp32 graphs, validated on the GPU (onnxruntime-gpu)
model=tiny-dev
fp32="$work/$model/onnx-fp32"
fluxexport export --model "$model" --out "$fp32"
fluxexport optimize --model "$model" --engines "$fp32" --provider cuda
fluxexport validate --model "$model" --engines "$fp32" --report "$fp32/validation.json" \
  && record "$model" "validate optimize --provider cuda (ORT vs torch)" pass \
  || record "$model" "validate optimize --provider cuda (ORT vs torch)" FAIL

# LoRA refit: refittable bf16 engines, a PEFT LoRA on the first blocks, refit, image vs torch with the LoRA merged
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
refittable="$work/$model/trt-bf16-refittable"
fluxexport build --model "$model" --precision bf16 --onnx "$work/$model/onnx" --out "$refittable" --refittable \
  --min-resolution 64 --opt-resolution 256 --max-resolution 1024
fluxexport refit --model "$model" --engines "$refittable" --lora "$lora:0.8"
fluxexport run --model "$model" --backend tensorrt --engines "$refittable" --lora "$lora:0.8" --prompt "a red fox" \
  --output "$work/$model/refit.png"
fluxexport run --model "$model" --backend torch --dtype bf16 --lora "$lora:0.8" --prompt "a red fox" \
  --output "$work/$model/torch-lora.png"
record "$model" "TensorRT refit bf16 vs torch, LoRA 0.8 (PSNR dB)" "$(psnr "$work/$model/refit.png" "$work/$model/torch-lora.png")"
column -t -s $'\t' "$summary"
