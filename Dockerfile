# fluxexport on NVIDIA's PyTorch NGC image: CUDA, cuDNN, PyTorch and TensorRT come with the image.
#   docker build -t fluxexport .
#   docker run --gpus all -v $PWD/engines:/work/engines -v ~/.cache/huggingface:/root/.cache/huggingface \
#       fluxexport build --model black-forest-labs/FLUX.1-dev --precision fp8
# Pick the image tag whose TensorRT you want engines for: plans only run on the TensorRT that built them.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/fluxexport
COPY pyproject.toml README.md ./
COPY fluxexport ./fluxexport
COPY scripts ./scripts
# The image's torch and tensorrt stay; onnxruntime-gpu runs exported graphs on CUDA too.
RUN pip install --no-cache-dir -e ".[gpu]" && python -c "import tensorrt, polygraphy, fluxexport; print('TensorRT', tensorrt.__version__, 'polygraphy', polygraphy.__version__)"

WORKDIR /work
ENTRYPOINT ["fluxexport"]
CMD ["--help"]
