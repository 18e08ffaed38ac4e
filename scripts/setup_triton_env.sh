#!/usr/bin/env bash
# The python environment Triton's python backend runs our models in (.venv-triton): fluxexport with ONNX
# Runtime and numpy<2 (the backend stub shipped with nvidia-pytriton is built against numpy 1). In the main .venv:
# Triton's client (the `triton` extra, resolved with its dependencies) and the tritonserver binary from the
# nvidia-pytriton wheel. That wheel pins numpy<2, which the main environment cannot take, and we use only its binary
# (none of its Python), so it goes in --no-deps and last: after an install that resolves dependencies pip checks the
# packages that depend on what it installed, and one after this that touched numpy, protobuf or grpcio would print
# that pin and the wheel's unneeded Python dependencies as ERROR lines.
# (KServe's models and kubernetes-validate for `fluxexport deploy`'s checks are the `deploy` extra.)
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip install -q -e ".[triton]" tritonclient==2.73.0
.venv/bin/pip install -q --no-deps nvidia-pytriton==0.7.0
[ -x .venv-triton/bin/python ] || python3 -m venv .venv-triton
.venv-triton/bin/pip install -q torch==2.13.0 "numpy<2"
.venv-triton/bin/pip install -q -e ".[onnx]" "numpy<2"
