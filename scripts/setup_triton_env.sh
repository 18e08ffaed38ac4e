#!/usr/bin/env bash
# The python environment Triton's python backend runs our models in (.venv-triton): fluxexport with ONNX
# Runtime and numpy<2 (the backend stub shipped with nvidia-pytriton is built against numpy 1), plus the
# tritonserver binary from the nvidia-pytriton wheel and Triton's client in the main .venv, both --no-deps:
# the wheel pins numpy<2 and the client's grpc extra protobuf<7, neither of which the main environment can take.
# KServe's python models and kubernetes-validate check `fluxexport deploy`'s manifests offline; kserve pins
# protobuf<7 (its models run on 7; transformers' tokenizer conversion needs 7), so protobuf goes back to 7.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip install -q --no-deps nvidia-pytriton==0.7.0 "tritonclient[http,grpc]==2.73.0"
.venv/bin/pip install -q python-rapidjson geventhttpclient grpcio aiohttp
protobuf=$(.venv/bin/python -c 'import google.protobuf as p; print(p.__version__)')
.venv/bin/pip install -q kserve==0.21.0 kubernetes-validate==1.37.0 2>/dev/null
.venv/bin/pip install -q "protobuf==$protobuf" 2>/dev/null
[ -x .venv-triton/bin/python ] || python3 -m venv .venv-triton
.venv-triton/bin/pip install -q torch==2.13.0 "numpy<2"
.venv-triton/bin/pip install -q -e ".[onnx]" "numpy<2"
