"""The OpenAI images API's requests and errors, as plain data: a request body (JSON, or a multipart form's fields)
read into an `ImageRequest`, the flux_pipeline inputs it becomes, Triton's refusals as OpenAI's error JSON, and the
images encoded for the response. No model code: what the model accepts is decided by the pipeline behind Triton.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_IMAGES_PER_REQUEST = 10  # `n`, as OpenAI bounds it
MAX_JSON_BYTES = 1 << 20  # a generations body (prompts are bounded far lower by the pipeline)
MAX_MULTIPART_BYTES = 64 << 20  # an edits body: every reference image and field together
MAX_REFERENCE_IMAGES = 10  # reference images in one edit (flux_pipeline's image … image_10)
MAX_REFERENCE_PIXELS = 4096 * 4096  # one reference image's pixels, checked before it is decoded
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# OpenAI fields a FLUX pipeline has no use for: taken and left alone, so that SDK defaults pass
IGNORED_FIELDS = ("user", "quality", "style", "moderation", "input_fidelity", "partial_images")
# our extensions, under their names and the aliases other servers use (vLLM-Omni, SGLang)
ALIASES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}
EXTENSIONS = ("seed", "steps", "guidance", "negative_prompt", "lora", "cache")
FIELDS = ("model", "prompt", "n", "size", "response_format", "output_format", "output_compression", "background",
          "stream", *EXTENSIONS, *IGNORED_FIELDS, *ALIASES)  # fmt: skip
# flux_pipeline's input → the request field that carries it (what an error's `param` names)
PARAM_OF_INPUT = {"prompt": "prompt", "prompt_2": "prompt", "negative_prompt": "negative_prompt", "height": "size",
                  "width": "size", "num_inference_steps": "steps", "guidance_scale": "guidance", "seed": "seed",
                  "num_images": "n", "lora": "lora", "lora_scale": "lora", "cache": "cache", "image": "image",
                  "redux_image": "image"}  # fmt: skip


class ApiError(Exception):
    """An error answered as OpenAI's error JSON: 4xx the request's fault (`invalid_request_error`), 5xx ours."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, " ".join(message.split()), param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad_request(param: str, message: str) -> ApiError:
    return ApiError(400, message, param, "invalid_value")


@dataclass(frozen=True)
class ImageRequest:
    """One images request, every field checked for its type and range; None leaves the pipeline's default.
    `variation` (/v1/images/variations): `images` are a FLUX.1 Redux prior's (`redux_image`…), the prompt optional."""

    prompt: str | None
    n: int = 1
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    loras: tuple[str, ...] = ()
    lora_scales: tuple[float, ...] = ()
    cache: str | None = None
    output_format: str = "png"
    output_compression: int | None = None
    model: str | None = None
    images: tuple[np.ndarray, ...] = field(default=())
    variation: bool = False

    def pipeline_values(self) -> dict[str, Any]:
        """flux_pipeline's optional inputs by name (`triton.client.pipeline_inputs`); None ones are left out."""
        return {
            "height": self.height, "width": self.width, "num_inference_steps": self.steps,
            "guidance_scale": self.guidance, "seed": self.seed, "num_images": self.n,
            "negative_prompt": self.negative_prompt, "lora": list(self.loras) or None,
            "lora_scale": list(self.lora_scales) or None, "cache": self.cache,
            "redux_image" if self.variation else "image": list(self.images) or None,
        }  # fmt: skip


def parse_size(value: object) -> tuple[int, int] | None:
    """`"WIDTHxHEIGHT"` → (width, height); `"auto"` or absent → None (the pipeline's default)."""
    if value is None or value == "auto":
        return None
    found = re.fullmatch(r"\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*", value) if isinstance(value, str) else None
    if not found:
        raise bad_request("size", f"size must be WIDTHxHEIGHT in pixels (e.g. 1024x768) or auto, got {value!r}")
    return int(found[1]), int(found[2])


def _text(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_request(name, f"{name} must be a string, got {type(value).__name__}")
    return value


def _number(body: Mapping[str, Any], name: str, kind: type, form: bool) -> Any:
    """The field as `kind` (int or float): JSON numbers (never booleans; floats for an int only when whole), or a
    form's text."""
    value = body.get(name)
    if value is None:
        return None
    if form and isinstance(value, str):
        try:
            value = float(value) if kind is float or "." in value or "e" in value.lower() else int(value)
        except ValueError:
            raise bad_request(name, f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(name, f"{name} must be a number, got {type(value).__name__}")
    if kind is int:
        if not float(value).is_integer():
            raise bad_request(name, f"{name} must be a whole number, got {value!r}")
        return int(value)
    if not np.isfinite(value):
        raise bad_request(name, f"{name} must be a finite number, got {value!r}")
    return float(value)


def _in_range(name: str, value: int | None, low: int, high: int) -> int | None:
    if value is not None and not low <= value <= high:
        raise bad_request(name, f"{name} must be in {low}..{high}, got {value}")
    return value


def parse_loras(value: object, form: bool) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """`lora`: a name, `"name:scale"`, a list of either, or `{"name": scale, …}` (JSON); one or several form fields
    `lora` of `name[:scale]`. Scales are all given or none (the pipeline's default, 1)."""
    if value is None:
        return (), ()
    if isinstance(value, Mapping) and not form:
        items = list(value.items())
    else:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise bad_request("lora", 'lora must be a name, "name:scale", a list of them, or {"name": scale}')
        items = [(name, scale or None) for name, _, scale in (text.partition(":") for text in texts)]
    names, scales = [], []
    for name, scale in items:
        if not isinstance(name, str) or not name.strip():
            raise bad_request("lora", f"lora names must be non-empty text, got {name!r}")
        names.append(name.strip())
        if scale is not None:
            scales.append(_number({"lora": scale}, "lora", float, form=True))
    if scales and len(scales) != len(names):
        raise bad_request("lora", "give a scale to every LoRA or to none (each then applies at 1)")
    return tuple(names), tuple(scales)


def parse_request(
    body: Mapping[str, Any], *, form: bool = False, images: tuple[np.ndarray, ...] = (), variation: bool = False
) -> ImageRequest:
    """A generations body (JSON) or an edits or variations form's fields (`form`: values are text) as an
    `ImageRequest`; an unknown field, a wrong type or a value out of range is refused with the field as `param`
    (a variation's prompt is optional)."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise bad_request(unknown[0], f"unknown field {unknown[0]!r}; the extensions are {', '.join(EXTENSIONS)}")
    body = dict(body)
    for alias, name in ALIASES.items():
        if alias in body:
            if name in body:
                raise bad_request(alias, f"give {name} or {alias}, not both")
            body[name] = body.pop(alias)
    prompt = _text(body, "prompt")
    if prompt is None and not variation:
        raise ApiError(400, "prompt is required", "prompt", "missing_required_parameter")
    response_format = _text(body, "response_format") or "b64_json"
    if response_format != "b64_json":
        raise bad_request(
            "response_format", f"response_format {response_format!r} is not served: use b64_json (this server "
            "keeps no files, so it has no URLs to give)",
        )  # fmt: skip
    output_format = _text(body, "output_format") or "png"
    if output_format not in OUTPUT_FORMATS:
        raise bad_request("output_format", f"output_format must be {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    compression = _in_range("output_compression", _number(body, "output_compression", int, form), 0, 100)
    if compression is not None and output_format == "png":
        raise bad_request("output_compression", "output_compression applies to jpeg and webp: drop it for png")
    if (_text(body, "background") or "auto") not in ("auto", "opaque"):
        raise bad_request("background", "background must be auto or opaque: FLUX draws no transparency")
    stream = body.get("stream")
    if stream not in (None, False, "false"):
        raise bad_request("stream", "streaming is not served: drop stream (the images come in one response)")
    size = parse_size(body.get("size"))
    names, scales = parse_loras(body.get("lora"), form)
    return ImageRequest(
        prompt=prompt,
        n=_in_range("n", _number(body, "n", int, form), 1, MAX_IMAGES_PER_REQUEST) or 1,
        width=size[0] if size else None,
        height=size[1] if size else None,
        seed=_in_range("seed", _number(body, "seed", int, form), -(2**63), 2**63 - 1),
        steps=_in_range("steps", _number(body, "steps", int, form), 1, 2**31 - 1),
        guidance=_number(body, "guidance", float, form),
        negative_prompt=_text(body, "negative_prompt"),
        loras=names,
        lora_scales=scales,
        cache=_text(body, "cache"),
        output_format=output_format,
        output_compression=compression,
        model=_text(body, "model"),
        images=images,
        variation=variation,
    )


def check_served(request: ImageRequest, inputs: set[str]) -> None:
    """Refuse what flux_pipeline's `inputs` cannot take, naming the field: reference images past its count (none
    outside Kontext and FLUX.2), a negative prompt on FLUX.1, a variation where no Redux prior is served."""
    if request.variation:
        served = sum(1 for name in inputs if re.fullmatch(r"redux_image(_\d+)?", name))
        if served == 0:
            raise bad_request(
                "image", "this server has no FLUX.1 Redux prior, which makes variations: write its repository with "
                "fluxexport triton --redux PRIOR --redux-engines DIR, or use /v1/images/edits",
            )  # fmt: skip
        if len(request.images) > served:
            raise bad_request("image", f"at most {served} image(s) make one variation, got {len(request.images)}")
        return check_negative(request, inputs)
    references = sum(1 for name in inputs if re.fullmatch(r"image(_\d+)?", name))
    if len(request.images) > references:
        if references == 0:
            raise bad_request("image", "this model takes no reference image: use /v1/images/generations")
        raise bad_request(
            "image", f"this model takes at most {references} reference image(s), got {len(request.images)}"
        )
    check_negative(request, inputs)


def check_negative(request: ImageRequest, inputs: set[str]) -> None:
    if request.negative_prompt is not None and "negative_prompt" not in inputs:
        raise bad_request("negative_prompt", "this model takes no negative_prompt: drop it")


def triton_refusal(status: str | None, message: str) -> ApiError:
    """Triton's error (its HTTP status, its message) as OpenAI's: 400 the request's fault, with `param` the field
    behind the input the message names first; 503 where the pipeline is not loaded; 500 otherwise."""
    text = re.sub(r"^\[request id: [^\]]*\]\s*", "", message or "").strip()
    if status == "400" and re.search(r"unknown model|is not ready|no version is available", text):
        return ApiError(503, f"the image model is not ready: {text}", None, "model_not_ready")
    if status == "400":
        first = re.match(r"[A-Za-z_0-9]+", text)
        named = first[0] if first else ""
        param = PARAM_OF_INPUT.get(re.sub(r"_\d+$", "", named))
        if param is None and re.search(r"\bimages? exceeds? this deployment's batch limit\b", text):
            param = "n"
        return ApiError(400, text, param, "invalid_value")
    return ApiError(500, text or "the image model failed", None, "internal_error")


def decode_image(data: bytes, param: str = "image") -> np.ndarray:
    """An uploaded picture (PNG, JPEG, WebP, …) as uint8 [H, W, 3], its size checked before its pixels are read,
    then read as `run --image` reads a file: diffusers' `load_image` (EXIF orientation applied, any mode to RGB)."""
    from diffusers.utils import load_image
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_REFERENCE_PIXELS:
                raise bad_request(param, f"{param} is {width}x{height}: send at most {MAX_REFERENCE_PIXELS} pixels")
            return np.asarray(load_image(image), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise bad_request(param, f"{param} is not an image PIL can read (send PNG, JPEG or WebP)") from None


def encode_images(images: np.ndarray, output_format: str, compression: int | None = None) -> list[str]:
    """uint8 [B, H, W, 3] as base64 files of `output_format` (PNG lossless; jpeg/webp at `compression`, default
    the encoder's)."""
    from PIL import Image

    options = {} if compression is None else {"quality": compression}
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format=OUTPUT_FORMATS[output_format], **options)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded
