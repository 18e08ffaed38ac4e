"""PyTorch → ONNX: per-component wrappers, dynamo export, graph clean-up, TensorRT lint, manifest."""
