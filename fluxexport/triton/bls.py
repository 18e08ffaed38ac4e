"""A Backend whose components are other models of the same Triton server, called through BLS.

Only importable inside Triton's python backend (it needs triton_python_backend_utils). CUDA tensors cross
as DLPack capsules and stay on the GPU; CPU tensors cross as numpy arrays.
"""

from __future__ import annotations

import torch

from fluxexport.artifacts.repository import ComponentIO
from fluxexport.dtypes import ELEMENT_TORCH
from fluxexport.errors import InternalError
from fluxexport.runtime.backend import Component, Feeds


class BlsBackend:
    name = "triton-bls"

    def __init__(self, components: dict[str, ComponentIO], device: str = "cpu"):
        """`components`: model name → its inputs and outputs (the repository's `PipelineSettings`)."""
        import triton_python_backend_utils as pb_utils

        self.pb_utils = pb_utils
        self.components = components
        self.device = torch.device(device)
        self.parameters: dict[str, str] = {}  # sent with every component request (the request's LoRA set)

    def _to_triton(self, name: str, tensor: torch.Tensor, dtype: torch.dtype):
        tensor = tensor.to(dtype).contiguous()
        if tensor.is_cuda:
            return self.pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor))
        return self.pb_utils.Tensor(name, tensor.numpy())

    def _from_triton(self, tensor) -> torch.Tensor:
        if tensor.is_cpu():
            return torch.from_numpy(tensor.as_numpy().copy()).to(self.device, torch.float32)
        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).to(torch.float32)

    def component(self, name: str) -> Component:
        if name not in self.components:
            raise InternalError(f"this repository has no {name} model", name)
        io = self.components[name]
        inputs = {t.name: ELEMENT_TORCH[t.dtype] for t in io.inputs}
        outputs = [t.name for t in io.outputs]

        def run(feeds: Feeds) -> Feeds:
            extra = {"parameters": dict(self.parameters)} if self.parameters else {}  # Triton ≥ 23.xx takes them
            request = self.pb_utils.InferenceRequest(
                model_name=name,
                requested_output_names=outputs,
                inputs=[self._to_triton(key, feeds[key], dtype) for key, dtype in inputs.items() if key in feeds],
                **extra,
            )
            response = request.exec()
            if response.has_error():  # a component of ours failed on what the pipeline checked: not the client's
                raise InternalError(f"{name}: {response.error().message()}", name)
            return {key: self._from_triton(self.pb_utils.get_output_tensor_by_name(response, key)) for key in outputs}

        run.output_names = outputs  # type: ignore[attr-defined]  # what a step cache checks before a run
        return run
