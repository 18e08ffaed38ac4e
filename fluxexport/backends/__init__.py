"""The PyTorch and ONNX Runtime backends behind the runtime's `Backend` interface (TensorRT's is in
`fluxexport.tensorrt`); a backend by name: `fluxexport.backend_factory.create_backend`."""
