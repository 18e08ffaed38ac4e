"""Triton python-backend model: one exported FLUX component run by ONNX Runtime (written by fluxexport).

The transformer (whole and in parts) and, for FLUX.1, CLIP of a repository with per-request LoRAs read the
request's `loras` parameter (JSON [[name, scale], …], set by flux_pipeline) and swap them in: the files are read
for the model's family (component.json's `lora_family`), only the initializers the LoRAs touch are merged (from
the graph's own base weights) and handed to a new session; the last set stays until another comes. A part of
the transformer takes the deltas of the weights it holds (its siblings hold the rest).
"""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from fluxexport.artifacts.repository import ServedGraph
from fluxexport.onnxruntime.backend import PROVIDERS, create_session, lora_overrides, session_runner


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        self.path = folder / "model.onnx"
        self.served = ServedGraph.read(folder)
        self.graph = self.served.graph
        self.name = args["model_name"]
        self.upcast = self.graph.base_dtype == "bf16"
        self.providers = PROVIDERS["cuda"] if args["model_instance_kind"] == "GPU" else None
        folder_name = self.served.lora_folder
        self.loras = Path(args["model_repository"]).parent / folder_name if folder_name else None
        self.inputs = self.graph.input_names()
        self.choice, self.applied = "[]", False  # the LoRA set asked for last, and whether it changed weights
        self.run = self._runner({})

    def _runner(self, overrides):
        session = create_session(self.path, self.upcast, self.providers, overrides=overrides)
        return session_runner(session, self.graph, self.name)

    def _swap(self, choice: str) -> None:
        """Apply the LoRA set `choice` (or go back to the base weights) if it is not the one applied."""
        from fluxexport.artifacts.weights import graph_base
        from fluxexport.models.lora import LoraSet, parse_lora

        if choice == self.choice:
            return
        chosen = [parse_lora(f"{self.loras / name}.safetensors:{scale}") for name, scale in json.loads(choice)]
        module = self.served.lora_module
        loras = LoraSet(chosen, self.served.lora_family) if chosen else None
        touched = loras is not None and module in loras.layers
        if touched:
            base = graph_base(self.path, self.graph.require_weight_origins("write the repository again"))
            self.run = self._runner(lora_overrides(self.graph, module, loras, base, self.served.lora_elsewhere))
        elif self.applied:
            self.run = self._runner({})
        self.choice, self.applied = choice, touched

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                if self.loras is not None:
                    self._swap(json.loads(request.parameters() or "{}").get("loras", "[]"))
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
