"""The OpenAI-compatible front: a Starlette app that forwards each images request to Triton's flux_pipeline over
Triton's HTTP protocol (`tritonclient.http.aio`), and answers in OpenAI's shapes.

Stateless: it holds only the Triton client and the pipeline's input names (read from Triton, once it answers), so
any number of fronts can stand before one Triton. Bounded: a generations body ≤ 1 MiB, an edits body ≤ 64 MiB (both
refused with 413 before they are read past the bound), `n` ≤ 10, ≤ 10 reference images of ≤ 16 MP each, and at most
`max_in_flight` requests forwarded at once (429 past it, which the SDK retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxexport.artifacts.repository import PIPELINE  # the Triton model every request goes to
from fluxexport.openai_api.protocol import (
    MAX_JSON_BYTES,
    MAX_MULTIPART_BYTES,
    MAX_REFERENCE_IMAGES,
    ApiError,
    ImageRequest,
    check_served,
    decode_image,
    encode_images,
    parse_request,
    triton_refusal,
)

IMAGE_FIELD = re.compile(r"image(\[\d*\])?")  # `image`, the SDK's `image[]`, or `image[0]`, `image[1]`, …
LORA_FIELD = re.compile(r"lora\[([^\]]+)\]")  # `lora[ink]=0.5`: a JSON object {"ink": 0.5} sent as a form


@dataclass(frozen=True)
class FrontSettings:
    """Where Triton is (`host:port` of its HTTP endpoint), the model id clients name, and the front's bounds."""

    triton_url: str
    model: str
    max_in_flight: int = 64
    timeout_s: float = 600.0  # one request's wait for Triton (queue and generation)


def triton_address(url: str) -> str:
    """`http://host:port/` or `host:port` → `host:port` (what tritonclient takes)."""
    return re.sub(r"^https?://", "", url.strip()).rstrip("/")


class BodyLimit:
    """ASGI middleware: a body past its route's bound is refused with 413, by Content-Length before any of it is
    read, or once the bytes streamed (chunked) pass it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = MAX_MULTIPART_BYTES if scope["path"].endswith(("/edits", "/variations")) else MAX_JSON_BYTES
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await error_response(too_large(limit))(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large(limit)
            return message

        await self.app(scope, limited, send)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over {limit >> 20} MiB: send fewer or smaller images", None,
                    "request_too_large")  # fmt: skip


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class Front:
    """The routes' state: the Triton client (made on startup, in the server's event loop), the pipeline's inputs,
    the number of requests in flight."""

    def __init__(self, settings: FrontSettings):
        self.settings = settings
        self.client: Any = None
        self.inputs: set[str] | None = None
        self.in_flight = 0

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        import tritonclient.http.aio as triton

        self.client = triton.InferenceServerClient(
            triton_address(self.settings.triton_url), conn_limit=self.settings.max_in_flight,
            conn_timeout=self.settings.timeout_s,
        )  # fmt: skip
        try:
            yield
        finally:
            await self.client.close()

    async def ready(self) -> bool:
        """Triton is up and flux_pipeline is loaded."""
        try:
            return bool(await self.client.is_server_ready()) and bool(await self.client.is_model_ready(PIPELINE))
        except Exception:  # connection refused, reset, timed out: not ready
            return False

    async def pipeline_inputs(self) -> set[str]:
        """flux_pipeline's input names, from Triton's model metadata (kept once read)."""
        if self.inputs is None:
            metadata = await self.triton(self.client.get_model_metadata(PIPELINE))
            self.inputs = {tensor["name"] for tensor in metadata["inputs"]}
        return self.inputs

    async def triton(self, call: Any) -> Any:
        """Await a Triton client call; its refusals as OpenAI errors, no answer as 503."""
        from tritonclient.utils import InferenceServerException

        try:
            return await asyncio.wait_for(call, self.settings.timeout_s)
        except InferenceServerException as error:
            raise triton_refusal(error.status(), error.message()) from None
        except (OSError, asyncio.TimeoutError) as error:
            raise unavailable(error) from None
        except Exception as error:  # aiohttp's ClientError family: the connection, not the request
            if type(error).__module__.startswith("aiohttp"):
                raise unavailable(error) from None
            raise

    async def generate(self, request: ImageRequest) -> dict[str, Any]:
        """Forward one request to flux_pipeline; OpenAI's ImagesResponse."""
        import tritonclient.http.aio as triton

        from fluxexport.triton.client import pipeline_inputs

        if request.model not in (None, self.settings.model):
            raise ApiError(404, f"model {request.model!r} is not served here; it serves {self.settings.model!r}",
                           "model", "model_not_found")  # fmt: skip
        if self.in_flight >= self.settings.max_in_flight:
            raise ApiError(429, f"{self.in_flight} requests are in flight, the most this server takes: retry",
                           None, "rate_limit_exceeded")  # fmt: skip
        self.in_flight += 1
        try:
            check_served(request, await self.pipeline_inputs())
            inputs = pipeline_inputs(triton, request.prompt, **request.pipeline_values())
            outputs = [triton.InferRequestedOutput("images", binary_data=True)]
            result = await self.triton(self.client.infer(PIPELINE, inputs, outputs=outputs))
        finally:
            self.in_flight -= 1
        images = result.as_numpy("images")
        encoded = await asyncio.to_thread(encode_images, images, request.output_format, request.output_compression)
        return {
            "created": int(time.time()),
            "data": [{"b64_json": text} for text in encoded],
            "output_format": request.output_format,
            "size": f"{images.shape[2]}x{images.shape[1]}",
        }


def unavailable(error: BaseException) -> ApiError:
    return ApiError(503, f"the image model's server does not answer ({type(error).__name__}): retry later", None,
                    "service_unavailable")  # fmt: skip


async def json_body(request: Request) -> dict[str, Any]:
    import json

    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(
            400, "the body is not JSON: send the request as application/json", None, "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
    return body


async def form_request(request: Request, variation: bool = False) -> ImageRequest:
    """An edits (or variations) form: its images (`image`, `image[]`, in order) decoded, its other fields as
    text."""
    from starlette.datastructures import UploadFile

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        call = "images.create_variation" if variation else "images.edit"
        raise ApiError(400, f"send {request.url.path} as multipart/form-data (the SDK's {call} does)", None,
                       "invalid_content_type")  # fmt: skip
    async with request.form(max_files=MAX_REFERENCE_IMAGES + 1, max_fields=64) as form:
        files: list[UploadFile] = []
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key == "mask":
                    raise ApiError(400, "mask is not served: FLUX edits follow the prompt, drop the mask", "mask",
                                   "invalid_value")  # fmt: skip
                if not IMAGE_FIELD.fullmatch(key):
                    raise ApiError(400, f"unexpected file field {key!r}: send images as image or image[]", key,
                                   "invalid_value")  # fmt: skip
                files.append(value)
            elif key in ("lora", "lora[]"):
                fields.setdefault("lora", []).append(value)
            elif LORA_FIELD.fullmatch(key):  # the SDK's form of {"lora": {"name": scale}}
                fields.setdefault("lora", []).append(f"{LORA_FIELD.fullmatch(key)[1]}:{value}")
            else:
                fields[key] = value
        if not files:
            raise ApiError(400, "image is required: send one or several image[] files", "image",
                           "missing_required_parameter")  # fmt: skip
        if len(files) > MAX_REFERENCE_IMAGES:
            raise ApiError(400, f"at most {MAX_REFERENCE_IMAGES} images, got {len(files)}", "image", "invalid_value")
        datas = [await file.read() for file in files]
    images = tuple([await asyncio.to_thread(decode_image, data) for data in datas])
    return parse_request(fields, form=True, images=images, variation=variation)


def create_app(settings: FrontSettings) -> ASGIApp:
    """The ASGI app: POST /v1/images/generations and /v1/images/edits, GET /v1/models, /health (the front is up)
    and /health/ready (Triton and flux_pipeline are ready; 503 until they are)."""
    front = Front(settings)
    model = {"id": settings.model, "object": "model", "created": 0, "owned_by": "fluxexport"}

    async def generations(request: Request) -> JSONResponse:
        return JSONResponse(await front.generate(parse_request(await json_body(request))))

    async def edits(request: Request) -> JSONResponse:
        return JSONResponse(await front.generate(await form_request(request)))

    async def variations(request: Request) -> JSONResponse:  # a FLUX.1 Redux prior's, where the repository has one
        return JSONResponse(await front.generate(await form_request(request, variation=True)))

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model]})

    async def one_model(request: Request) -> JSONResponse:
        if request.path_params["name"] != settings.model:
            raise ApiError(404, f"model {request.path_params['name']!r} is not served here", "model", "model_not_found")
        return JSONResponse(model)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> JSONResponse:
        if not await front.ready():
            raise ApiError(503, f"Triton at {settings.triton_url} is not ready to serve {PIPELINE}", None,
                           "service_unavailable")  # fmt: skip
        return JSONResponse({"status": "ready"})

    async def api_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ApiError)
        return error_response(error)

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        return error_response(ApiError(error.status_code, str(error.detail), None, None))

    routes = [
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/v1/images/variations", variations, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", one_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=front.lifespan,
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal_error},
    )  # fmt: skip
    return BodyLimit(app)


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    """Anything unforeseen: a 500 in OpenAI's shape, on one line."""
    return error_response(ApiError(500, f"internal error: {type(error).__name__}: {error}", None, "internal_error"))
