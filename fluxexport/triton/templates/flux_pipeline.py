"""Triton python-backend model: text (and reference images) in, uint8 images out (written by fluxexport).

Tokenization and the runtime are `fluxexport run`'s own, for the checkpoint's family (FLUX.1, FLUX.2); the
components are this server's models, called through BLS. A request never makes the server read a file of its
choosing: magcache's `ratios` in the `cache` input may only be `flux-dev` or a .json file inside this model
repository, named relative to it.
"""

import json
import re
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from fluxexport.artifacts.repository import PipelineSettings
from fluxexport.errors import FluxExportError
from fluxexport.models.source import load_folder
from fluxexport.runtime.cache import CacheSettings, parse_cache
from fluxexport.runtime.magcache import NAMED_RATIOS
from fluxexport.runtime.pipeline import GenerationRequest, generate, resolve_request
from fluxexport.specs import ExportBounds, check_request_within
from fluxexport.triton.bls import BlsBackend
from fluxexport.triton.config import REFERENCE_INPUTS


def _optional(request, name, cast):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise FluxExportError(f"{name} must hold one value, got {value.size}")
    value = value[0]
    return cast(value.decode("utf-8") if isinstance(value, bytes) else value)


def _values(request, name) -> list | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return [v.decode("utf-8") if isinstance(v, bytes) else v for v in tensor.as_numpy().reshape(-1).tolist()]


def lora_choice(names: list[str] | None, scales: list[float] | None, placed: dict) -> str:
    """The request's LoRA set as the components' `loras` parameter (JSON [[name, scale], …]; "[]" = none)."""
    if not names:
        if scales:
            raise FluxExportError("lora_scale was given without a lora input: name the LoRAs to apply")
        return "[]"
    unknown = [name for name in names if name not in placed]
    if unknown:
        have = ", ".join(sorted(placed)) if placed else "none (write the repository with --request-lora FILE)"
        raise FluxExportError(f"lora {unknown[0]!r} is not in this repository; it has: {have}")
    if len(set(names)) != len(names):
        raise FluxExportError(f"lora names a LoRA twice: {', '.join(names)}")
    scales = scales or [1.0]
    if len(scales) not in (1, len(names)):
        raise FluxExportError(f"lora_scale holds {len(scales)} values for {len(names)} LoRAs: give one, or one each")
    if not all(np.isfinite(scales)):
        raise FluxExportError("lora_scale must be finite")
    scales = scales * len(names) if len(scales) == 1 else scales
    return json.dumps([[name, float(scale)] for name, scale in zip(names, scales, strict=True)])


def served_cache(text: str | None, repository: Path) -> CacheSettings:
    """The `cache` input parsed as `run --cache` is, with magcache's `ratios` checked before anything is read:
    `flux-dev`, or a .json file inside `repository` named relative to it (passed on as its full path)."""
    if not text:
        return parse_cache(text)
    name, colon, rest = text.strip().partition(":")
    items = []
    for item in rest.split(","):
        key, equals, value = item.partition("=")
        if equals and key.strip() == "ratios" and value.strip():
            item = f"ratios={served_ratios(value.strip(), repository)}"
        items.append(item)
    return parse_cache(name + colon + ",".join(items))


def served_ratios(value: str, repository: Path) -> str:
    """`value` if it names published ratios, else the path of the repository's file it names; anything outside
    the repository (absolute, `..`, a symlink out) or not .json is refused in one line, without reading it."""
    if value in NAMED_RATIOS:
        return value
    root = repository.resolve()
    path = (root / value).resolve()
    if Path(value).is_absolute() or not path.is_relative_to(root) or path.suffix != ".json":
        raise FluxExportError(
            f"cache ratios must be {' or '.join(NAMED_RATIOS)} or a .json file in this model repository, named "
            f"relative to it (flux_pipeline/1/magcache/NAME.json), got {value!r}"
        )
    if not path.is_file():
        raise FluxExportError(f"cache ratios file {value} is not in this model repository")
    return str(path)


def _reference_images(request) -> list:
    """The request's reference images, `image` first: each uint8 [H, W, 3], numbered without gaps."""
    from PIL import Image

    tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in REFERENCE_INPUTS}
    given = [name for name, tensor in tensors.items() if tensor is not None]
    expected = list(REFERENCE_INPUTS[: len(given)])
    if given != expected:
        missing = next(name for name in expected if name not in given)
        raise FluxExportError(f"{given[-1]} was given without {missing}: number reference images from image up")
    images = []
    for name in given:
        array = tensors[name].as_numpy()
        if array.ndim != 3 or array.shape[2] != 3:
            raise FluxExportError(f"{name} must be uint8 [H, W, 3], got shape {list(array.shape)}")
        images.append(Image.fromarray(np.ascontiguousarray(array)))
    return images


def served_bounds(settings: PipelineSettings) -> ExportBounds:
    """The bounds the repository records; one written before they were all recorded (sides and batch only) serves
    the rest as its folder was made for (engines: one 1 MP reference at 1:1)."""
    return ExportBounds.from_json(settings.bounds, built=settings.kind == "tensorrt")


def check_deployment_serves(source, settings: PipelineSettings, resolved) -> None:
    """Refuse, in one line and before any component runs, a request past the deployment's bounds: target sides,
    batch, and FLUX.2's reference budget (the references' tokens beside the target, their longest side)."""
    bounds = served_bounds(settings)
    low, high = bounds.min_resolution, bounds.max_resolution
    for name, value in (("height", resolved.height), ("width", resolved.width)):
        if not low <= value <= high:
            raise FluxExportError(f"{name} {value} is outside this deployment's {low}..{high} px")
    if resolved.batch > bounds.max_batch:
        raise FluxExportError(f"{resolved.batch} images exceed this deployment's batch limit {bounds.max_batch}")
    made = "engines built" if settings.kind == "tensorrt" else "graphs exported"
    fix = f"send fewer or smaller references, or serve {made} using"  # `with --` would read as a request input
    check_request_within(source, bounds, resolved, "this deployment serves", fix)


class TritonPythonModel:
    def initialize(self, args):
        self.repository = Path(args["model_repository"]).parent  # args name this model's own folder
        folder = Path(args["model_repository"]) / args["model_version"]
        self.settings = PipelineSettings.read(folder)
        self.source = load_folder(folder / "checkpoint", name=self.settings.model)
        device = "cuda" if self.settings.kind == "tensorrt" and torch.cuda.is_available() else "cpu"
        self.backend = BlsBackend(self.settings.components, device)

    def _request(self, request) -> GenerationRequest:
        prompt = _optional(request, "prompt", str)
        references = _reference_images(request)
        image = references[0] if len(references) == 1 else references or None  # FLUX.1 Kontext takes one
        return GenerationRequest(
            prompt=prompt if prompt is not None else "",
            prompt_2=_optional(request, "prompt_2", str),
            height=_optional(request, "height", int),
            width=_optional(request, "width", int),
            num_inference_steps=_optional(request, "num_inference_steps", int),
            guidance_scale=_optional(request, "guidance_scale", float),
            seed=_optional(request, "seed", int) or 0,
            num_images_per_prompt=_optional(request, "num_images", int) or 1,
            image=image,
            negative_prompt=_optional(request, "negative_prompt", str),
        )

    def _check_bounds(self, generation: GenerationRequest) -> None:
        check_deployment_serves(self.source, self.settings, resolve_request(self.source, generation))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                generation = self._request(request)
                self._check_bounds(generation)
                loras = lora_choice(_values(request, "lora"), _values(request, "lora_scale"), self.settings.loras)
                self.backend.parameters = {"loras": loras} if self.settings.loras else {}
                cache = served_cache(_optional(request, "cache", str), self.repository)
                images = generate(self.backend, self.source, generation, cache=cache).images
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("images", images)]))
            except FluxExportError as error:  # the request's fault: INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT)
                message = in_request_terms(str(error))
                responses.append(pb_utils.InferenceResponse(error=invalid_argument(message)))
            except Exception as error:  # ours: an internal error (HTTP 500); keep serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {error!r}")))
        return responses


# The runtime's messages name command-line flags; a client sends inputs of these names instead.
REQUEST_INPUTS = {"prompt": "prompt", "num-images": "num_images", "steps": "num_inference_steps",
                  "guidance": "guidance_scale", "image": "image", "max-sequence-length": "max_sequence_length",
                  "negative-prompt": "negative_prompt", "prompt-2": "prompt_2"}  # fmt: skip


def in_request_terms(message: str) -> str:
    """A runtime message for a request: ` (--height)`-style pointers dropped, other flags named as the request
    inputs they stand for (`num-images must be …` → `num_images must be …`, `with --prompt` → `in the prompt
    input`, `drop --negative-prompt` → `drop the negative_prompt input`)."""
    message = re.sub(r" \(--[a-z0-9-]+\)", "", message)
    message = re.sub(r"with --([a-z0-9-]+)", lambda m: f"in the {REQUEST_INPUTS.get(m[1], m[1])} input", message)
    message = re.sub(r"drop --([a-z0-9-]+)", lambda m: f"drop the {REQUEST_INPUTS.get(m[1], m[1])} input", message)
    for flag, name in REQUEST_INPUTS.items():
        message = re.sub(rf"(?<![a-z_-]){flag}(?![a-z0-9_-])", name, message)
    return message


def invalid_argument(message: str):
    """A TritonError with the INVALID_ARG code where the python backend has codes (Triton ≥ 23.04)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
