"""Triton python-backend model: text (and reference images) in, uint8 images out (written by fluxexport).

Tokenization and the runtime are `fluxexport run`'s own, for the checkpoint's family (FLUX.1, FLUX.2); the
components are this server's models, called through BLS. A request never makes the server read a file of its
choosing: magcache's `ratios` in the `cache` input may only be `flux-dev` or a .json file inside this model
repository, named relative to it.
"""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from fluxexport.artifacts.repository import PipelineSettings
from fluxexport.errors import FluxExportError, RequestError, Terms
from fluxexport.models.lora import MAX_LORA_SCALE
from fluxexport.models.redux import load_redux
from fluxexport.models.source import load_folder
from fluxexport.runtime.cache import CacheSettings, parse_cache
from fluxexport.runtime.magcache import NAMED_RATIOS
from fluxexport.runtime.pipeline import GenerationRequest, generate, resolve_request
from fluxexport.runtime.redux import (
    ReduxRequest,
    check_redux_request,
    placeholder_conditioning,
    redux_conditioning,
    with_conditioning,
)
from fluxexport.specs import ExportBounds, check_request_within
from fluxexport.triton.bls import BlsBackend
from fluxexport.triton.config import REDUX_INPUTS, REDUX_SCALES, REFERENCE_INPUTS

# A request's field (the runtime's vocabulary, RequestError.field) → this model's input that carries it, where the
# two differ; a refusal names the input, and points at no command-line flag
REQUEST_INPUTS = {
    "num_images_per_prompt": "num_images",
    "prompt_embeds_scale": "redux_scale",
    "pooled_prompt_embeds_scale": "redux_pooled_scale",
}
TRITON_TERMS = Terms(REQUEST_INPUTS, option="{name}", given="in the {name} input", drop="drop the {name} input")
MAX_TEXT_BYTES = 64 * 1024  # a text input's bytes (prompts are checked in characters after decoding)
MAX_LORAS = 16  # LoRA names in one request (a repository offers a handful)
MAX_REFERENCE_PIXELS = 4096 * 4096  # a reference image's pixels as sent (the pipelines scale them to ~1 MP)


def _optional(request, name, cast):
    """The one value of the optional input `name` as `cast` (str, int, float), or None if it is not given."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise RequestError(name, f"{name} must hold one value, got {value.size}", pointer=False, literal=True)
    return _cast(name, value[0], cast)


def _cast(name: str, value, cast):
    """One element of input `name` as `cast`: text from UTF-8 bytes, whole numbers only for int (a float input
    giving an int is refused rather than rounded)."""
    if cast is str:
        if not isinstance(value, bytes | str):
            raise RequestError(name, f"{name} must be text (BYTES), got {type(value).__name__}", literal=True)
        if len(value) > MAX_TEXT_BYTES:
            raise RequestError(name, f"{name} holds {len(value)} bytes, at most {MAX_TEXT_BYTES}", literal=True)
        try:
            return value.decode("utf-8") if isinstance(value, bytes) else value
        except UnicodeDecodeError:
            raise RequestError(name, f"{name} is not UTF-8 text", literal=True) from None
    if isinstance(value, bytes | str | np.bool_):
        raise RequestError(name, f"{name} must be a number, got {type(value).__name__}", literal=True)
    if cast is int and not float(value).is_integer():
        raise RequestError(name, f"{name} must be a whole number, got {value!r}", literal=True)
    return cast(value)


def _values(request, name, cast) -> list | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size > MAX_LORAS:
        raise RequestError(name, f"{name} holds {values.size} values, at most {MAX_LORAS}", literal=True)
    return [_cast(name, value, cast) for value in values.tolist()]


def lora_choice(names: list[str] | None, scales: list[float] | None, placed: dict) -> str:
    """The request's LoRA set as the components' `loras` parameter (JSON [[name, scale], …]; "[]" = none)."""
    if not names:
        if scales:
            raise RequestError("lora_scale", "lora_scale was given without a lora input", "name the LoRAs to apply")
        return "[]"
    unknown = [name for name in names if name not in placed]
    if unknown:
        have = ", ".join(sorted(placed)) if placed else "none (write the repository with --request-lora FILE)"
        raise RequestError("lora", f"lora {unknown[0]!r} is not in this repository; it has: {have}", literal=True)
    if len(set(names)) != len(names):
        raise RequestError("lora", f"lora names a LoRA twice: {', '.join(names)}", literal=True)
    scales = scales or [1.0]
    if len(scales) not in (1, len(names)):
        raise RequestError(
            "lora_scale", f"lora_scale holds {len(scales)} values for {len(names)} LoRAs", "give one, or one each"
        )
    if not all(np.isfinite(scales)) or max(abs(scale) for scale in scales) > MAX_LORA_SCALE:
        raise RequestError(
            "lora_scale",
            f"lora_scale must be in -{MAX_LORA_SCALE:g}..{MAX_LORA_SCALE:g}, got {', '.join(map(str, scales))}",
        )
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
    try:
        return parse_cache(name + colon + ",".join(items))
    except FluxExportError as error:  # the ratios file it names, read and refused: still the request's
        raise RequestError.of(error, "cache") from None


def served_ratios(value: str, repository: Path) -> str:
    """`value` if it names published ratios, else the path of the repository's file it names; anything outside
    the repository (absolute, `..`, a symlink out) or not .json is refused in one line, without reading it."""
    if value in NAMED_RATIOS:
        return value
    root = repository.resolve()
    try:
        path: Path | None = (root / value).resolve()
    except (OSError, ValueError):  # a NUL byte, a loop of links
        path = None
    if path is None or Path(value).is_absolute() or not path.is_relative_to(root) or path.suffix != ".json":
        raise RequestError(
            "cache", f"cache ratios must be {' or '.join(NAMED_RATIOS)} or a .json file in this model repository, "
            f"named relative to it (flux_pipeline/1/magcache/NAME.json), got {value!r}", literal=True,
        )  # fmt: skip
    try:
        found = path.is_file()
    except OSError:  # a name too long for the file system
        found = False
    if not found:
        raise RequestError("cache", f"cache ratios file {value} is not in this model repository", literal=True)
    return str(path)


def _reference_images(request) -> list:
    """The request's reference images, `image` first: each uint8 [H, W, 3], numbered without gaps."""
    return _numbered_images(request, REFERENCE_INPUTS, "reference images")


def _numbered_images(request, names: tuple[str, ...], what: str) -> list:
    """The images of numbered inputs (`image`, `image_2`, …), numbered without gaps; each uint8 [H, W, 3]."""
    tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in names}
    given = [name for name, tensor in tensors.items() if tensor is not None]
    expected = list(names[: len(given)])
    if given != expected:
        missing = next(name for name in expected if name not in given)
        raise RequestError(given[-1], f"{given[-1]} was given without {missing}", f"number {what} from {names[0]} up")
    return [_picture(name, tensors[name].as_numpy()) for name in given]


def _picture(name: str, array: np.ndarray):
    """An image input (a reference, Fill's `mask`, a `control_image`) as a PIL image: uint8 [H, W, 3], at most
    MAX_REFERENCE_PIXELS."""
    from PIL import Image

    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise RequestError(name, f"{name} must be uint8 [H, W, 3], got {array.dtype} {list(array.shape)}")
    if array.shape[0] * array.shape[1] > MAX_REFERENCE_PIXELS:
        raise RequestError(
            name, f"{name} is {array.shape[1]}×{array.shape[0]}", f"send at most {MAX_REFERENCE_PIXELS} pixels"
        )
    return Image.fromarray(np.ascontiguousarray(array))


def redux_request(request, redux, max_images: int | None = None) -> ReduxRequest | None:
    """The request's Redux images (`redux_image`, …, at most `max_images`: the prior's plans' batch), its optional
    prompt and per-image scales, checked as `run --redux` checks them; None where it sends no Redux image (then it
    needs a prompt)."""
    if redux is None:  # a repository without a prior: Triton takes no Redux input, and the prompt is required
        return None
    images = _numbered_images(request, REDUX_INPUTS, "Redux images")
    scales = {name: _values(request, name, float) for name in REDUX_SCALES}
    prompt = _optional(request, "prompt", str)
    if not images:
        given = next((name for name, values in scales.items() if values is not None), None)
        if given is not None:
            raise RequestError(given, f"{given} scales Redux images, and there is none", "send redux_image or drop it")
        if prompt is None:
            raise RequestError("prompt", "prompt is missing", "send a prompt, or a redux_image to vary")
        return None
    if max_images is not None and len(images) > max_images:
        raise RequestError(
            "redux_image", f"{len(images)} Redux images exceed this deployment's {max_images} (its prior's engines' "
            "batch)", "send fewer, or serve engines built with `build --redux --batch` over more", literal=True,
        )  # fmt: skip
    for name, values in scales.items():
        if values is not None and (not values or not all(np.isfinite(values))):
            raise RequestError(name, f"{name} must hold finite numbers, got {values}", literal=True)
    prior = ReduxRequest(
        tuple(images), prompt, _optional(request, "prompt_2", str), tuple(scales["redux_scale"] or (1.0,)),
        tuple(scales["redux_pooled_scale"] or (1.0,)),
    )  # fmt: skip
    check_redux_request(redux, prior)
    return prior


def _condition_image(request, name: str):
    """FLUX.1 Fill's `mask` or Canny/Depth's `control_image`, None where the request sends none."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else _picture(name, tensor.as_numpy())


def served_bounds(settings: PipelineSettings) -> ExportBounds:
    """The bounds the repository records; one written before they were all recorded (sides and batch only) serves
    the rest as its folder was made for (engines: one 1 MP reference at 1:1)."""
    return ExportBounds.from_json(settings.bounds, built=settings.kind == "tensorrt")


def check_sides_served(settings: PipelineSettings, generation: GenerationRequest) -> None:
    """Refuse a side the request gives past the deployment's largest, naming the deployment's range (before the
    request is resolved against the model's own, larger, limit)."""
    bounds = served_bounds(settings)
    low, high = bounds.min_resolution, bounds.max_resolution
    for name, value in (("height", generation.height), ("width", generation.width)):
        if isinstance(value, int) and value > high:
            raise RequestError(name, f"{{name}} {value} is outside this deployment's {low}..{high} px")


def check_deployment_serves(source, settings: PipelineSettings, resolved) -> None:
    """Refuse, in one line and before any component runs, a request past the deployment's bounds: target sides,
    batch, and FLUX.2's reference budget (the references' tokens beside the target, their longest side)."""
    bounds = served_bounds(settings)
    low, high = bounds.min_resolution, bounds.max_resolution
    for name, value in (("height", resolved.height), ("width", resolved.width)):
        if not low <= value <= high:
            raise RequestError(name, f"{{name}} {value} is outside this deployment's {low}..{high} px")
    if resolved.batch > bounds.max_batch:
        raise RequestError(
            "num_images_per_prompt", f"{resolved.batch} images exceed this deployment's batch limit {bounds.max_batch}"
        )
    made = "engines built" if settings.kind == "tensorrt" else "graphs exported"
    fix = f"send fewer or smaller references, or serve {made} using"  # `with --` would read as a request input
    try:
        check_request_within(source, bounds, resolved, "this deployment serves", fix)
    except FluxExportError as error:  # references past the deployment's budget
        raise RequestError.of(error, "image") from None


class TritonPythonModel:
    def initialize(self, args):
        self.repository = Path(args["model_repository"]).parent  # args name this model's own folder
        folder = Path(args["model_repository"]) / args["model_version"]
        self.settings = PipelineSettings.read(folder)
        self.source = load_folder(folder / "checkpoint", name=self.settings.model)
        device = "cuda" if self.settings.kind == "tensorrt" and torch.cuda.is_available() else "cpu"
        self.backend = BlsBackend(self.settings.components, device)
        prior = json.loads((folder / "redux.json").read_text()) if (folder / "redux.json").is_file() else None
        self.redux = None if prior is None else load_redux(folder / prior["folder"], name=prior["redux"])
        self.redux_max_images = None if prior is None else prior["max_images"]  # the prior's plans' batch

    def _request(self, request) -> GenerationRequest:
        prompt = _optional(request, "prompt", str)
        references = _reference_images(request)
        image = references[0] if len(references) == 1 else references or None  # FLUX.1 Kontext takes one
        seed, count = _optional(request, "seed", int), _optional(request, "num_images", int)
        return GenerationRequest(
            prompt=prompt if prompt is not None else "",
            prompt_2=_optional(request, "prompt_2", str),
            height=_optional(request, "height", int),
            width=_optional(request, "width", int),
            num_inference_steps=_optional(request, "num_inference_steps", int),
            guidance_scale=_optional(request, "guidance_scale", float),
            seed=0 if seed is None else seed,
            num_images_per_prompt=1 if count is None else count,
            image=image,
            negative_prompt=_optional(request, "negative_prompt", str),
            mask=_condition_image(request, "mask"),
            control_image=_condition_image(request, "control_image"),
        )

    def _checked(self, request) -> tuple[GenerationRequest, str, CacheSettings, ReduxRequest | None]:
        """The request, its LoRA choice, its step cache and its Redux prior's part, every value checked before any
        component runs (the base's request with the prior's output shapes in place of a prompt)."""
        generation, prior = self._request(request), redux_request(request, self.redux, self.redux_max_images)
        check_sides_served(self.settings, generation)  # this deployment's limit first: tighter than the model's
        base = generation if prior is None else with_conditioning(generation, self._placeholder())
        check_deployment_serves(self.source, self.settings, resolve_request(self.source, base))
        loras = lora_choice(_values(request, "lora", str), _values(request, "lora_scale", float), self.settings.loras)
        return generation, loras, served_cache(_optional(request, "cache", str), self.repository), prior

    def _placeholder(self):
        return placeholder_conditioning(self.redux, self.source)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                generation, loras, cache, prior = self._checked(request)
                self.backend.parameters = {"loras": loras} if self.settings.loras else {}
                if prior is not None:  # the prior's images on its components, its prompt on the base's encoders
                    conditioning = redux_conditioning(self.backend, self.backend, self.source, self.redux, prior)
                    generation = with_conditioning(generation, conditioning)
                images = generate(self.backend, self.source, generation, cache=cache).images
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("images", images)]))
            except RequestError as error:  # the request's fault: INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT)
                responses.append(pb_utils.InferenceResponse(error=invalid_argument(error.render(TRITON_TERMS))))
            except Exception as error:  # ours, a component's failure included: an internal error (HTTP 500)
                responses.append(pb_utils.InferenceResponse(error=internal_error(error)))
        return responses


def invalid_argument(message: str):
    """A TritonError with the INVALID_ARG code where the python backend has codes (Triton ≥ 23.04)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def internal_error(error: Exception):
    """A TritonError with the INTERNAL code (HTTP 500, gRPC INTERNAL), its message on one line."""
    text = str(error) if isinstance(error, FluxExportError) else repr(error)
    message = "internal error: " + " ".join(text.splitlines())
    code = getattr(pb_utils.TritonError, "INTERNAL", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
