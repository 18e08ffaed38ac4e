# fluxexport's GPU image: NVIDIA's Triton NGC release (tritonserver with its TensorRT, ONNX Runtime and python
# backends) plus TensorRT's Python module for the image's own TensorRT, polygraphy, PyTorch (CUDA build) and
# fluxexport with its tests. One image exports, builds engines, runs them and serves them from Triton: a plan
# loads only on the TensorRT release that built it, and here the builder and the server share one TensorRT.
#
#   docker build -t fluxexport:25.10 .
#   docker run --gpus all --rm -v "$PWD/gpu-check:/out" fluxexport:25.10 bash scripts/gpu_check.sh /out
#   docker run --gpus all --rm fluxexport:25.10 python3 -m pytest -m gpu -q
#   docker run --gpus all --rm -v "$PWD/engines:/work/engines" -v "$HOME/.cache/huggingface:/root/.cache/huggingface" \
#       -w /work fluxexport:25.10 fluxexport build --model black-forest-labs/FLUX.1-dev --precision fp8
#
# Another release: --build-arg TRITON_RELEASE=YY.MM (tag the image with it: `fluxexport deploy` reads the release
# from the tag). Serving only (no TensorRT Python module, polygraphy or tests): Dockerfile.triton.
ARG TRITON_RELEASE=25.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3

# The image's python (Ubuntu 24.04's) is marked externally managed (PEP 668); this image is that environment, so
# pip installs into it (pip's documented override). Triton's python backend runs our models with the same python.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# TensorRT's Python module, pinned to exactly the TensorRT the image ships: NGC images of one release have differed
# in TensorRT's patch version (triton-inference-server/server#5975), and a plan built by another patch does not
# load. The version and the CUDA major are read from the image's libnvinfer package (e.g. `10.13.3.9-1+cuda13.0`
# gives tensorrt-cu13==10.13.3.9, whose libs and bindings wheels are on PyPI), then checked after the install.
# --build-arg TENSORRT_PIP=tensorrt-cu13==X names the package instead.
# (hadolint cannot see that pin: the version is a shell variable.)
ARG TENSORRT_PIP=
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3013
RUN set -eu; \
    deb="$(dpkg-query -W -f='${Status} ${Version}\n' 'libnvinfer[0-9]*' | awk '$3 == "installed" {print $4; exit}')"; \
    if [ -z "$deb" ]; then echo "this base image has no libnvinfer package: pick a tritonserver release with TensorRT" >&2; exit 1; fi; \
    version="${deb%%-*}"; cuda="${deb##*+cuda}"; cuda="${cuda%%.*}"; \
    package="${TENSORRT_PIP:-tensorrt-cu${cuda}==${version}}"; \
    echo "image TensorRT ${version} (CUDA ${cuda}): pip install ${package}"; \
    pip install "${package}"; \
    python3 -c "import sys, tensorrt; sys.exit(0 if tensorrt.__version__ == sys.argv[1] else f'tensorrt {tensorrt.__version__} is not the image TensorRT {sys.argv[1]}')" "${version}"

# PyTorch 2.13.0: its PyPI wheel is the CUDA 13.0 build (cuda-toolkit 13.0.3), the CUDA of the 25.10 release, and the
# torch this project's suite runs. onnxruntime-gpu 1.31.1: the CUDA 13 build (its `cuda` extra names CUDA 13
# runtimes). polygraphy 0.53.6: the version the builder is tested with (≥ 0.49.7 for weight streaming). numpy 1.26.4
# (the last 1.x): fluxexport's local Triton server refuses an environment with numpy 2 for the python backend's stub.
# tritonclient: the Triton row of scripts/gpu_check.sh sends its requests through it. pytest: `pytest -m gpu`.
RUN pip install torch==2.13.0 onnxruntime-gpu==1.31.1 polygraphy==0.53.6 numpy==1.26.4 tritonclient==2.73.0 pytest==9.2.0

WORKDIR /opt/fluxexport
COPY pyproject.toml README.md ./
COPY fluxexport ./fluxexport
COPY scripts ./scripts
COPY tests ./tests
# The `gpu` extra (onnx, onnxruntime-gpu, onnxscript, polygraphy) and the `triton` extra (the client's own
# dependencies); the pins above stay (pip keeps an installed version that satisfies). The checks fail the build
# when a module does not import or the server lacks a backend (none of them needs a GPU: docker build has none).
RUN pip install -e ".[gpu,triton]" numpy==1.26.4 \
    && python3 -c "import tensorrt, polygraphy, torch, onnxruntime, tritonclient.http, fluxexport; print('TensorRT', tensorrt.__version__, '· polygraphy', polygraphy.__version__, '· torch', torch.__version__, torch.version.cuda, '· onnxruntime', onnxruntime.__version__)" \
    && test -x /opt/tritonserver/bin/tritonserver && test -d /opt/tritonserver/backends/tensorrt \
    && test -d /opt/tritonserver/backends/python

CMD ["fluxexport", "--help"]
