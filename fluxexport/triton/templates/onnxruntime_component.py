"""Triton python-backend model: one exported FLUX component run by ONNX Runtime (written by fluxexport)."""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from fluxexport.backends.onnxruntime_backend import create_session, session_runner


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        self.entry = json.loads((folder / "component.json").read_text())
        upcast = self.entry.get("base_dtype", self.entry["dtype"]) == "bf16"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args["model_instance_kind"] == "GPU" else None
        session = create_session(folder / "model.onnx", upcast, providers)
        self.run = session_runner(session, self.entry, args["model_name"])
        self.inputs = [t["name"] for t in self.entry["inputs"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feeds = {}
                for name in self.inputs:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        feeds[name] = torch.from_numpy(np.ascontiguousarray(tensor.as_numpy()))
                outputs = self.run(feeds)
                tensors = [pb_utils.Tensor(name, value.numpy()) for name, value in outputs.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as error:  # the server answers this request with the error and keeps serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))))
        return responses
