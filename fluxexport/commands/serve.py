"""`fluxexport triton`, `serve` and `deploy`: a Triton model repository, a server on it, Kubernetes manifests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxexport.commands.common import ModelOptions, open_source


@dataclass(frozen=True)
class TritonOptions:
    """`fluxexport triton`'s options."""

    engines: Path
    model: ModelOptions = field(default_factory=ModelOptions)
    out: Path | None = None
    instance_kind: str = "KIND_CPU"
    pipeline_instances: int = 1
    request_loras: tuple[str, ...] = ()
    gpus: tuple[int, ...] = ()
    fp8: bool | None = None
    redux: str | None = None  # a FLUX.1 Redux prior served beside the model, from its graphs or engines
    redux_engines: Path | None = None


@dataclass(frozen=True)
class TritonResult:
    """The repository written, the model it serves and the Triton models it holds (sorted)."""

    folder: Path
    model: str
    models: list[str]


def write_triton_repository(options: TritonOptions) -> TritonResult:
    """A Triton repository (default engines/<model>/triton) serving `options.engines` plus the flux_pipeline
    model, with the LoRAs clients may pick per request."""
    from fluxexport.artifacts.files import default_folder
    from fluxexport.models.lora import parse_lora
    from fluxexport.models.redux import resolve_redux
    from fluxexport.triton.repository import write_repository

    source = open_source(options.model)
    out = options.out or default_folder(source.name, "triton")
    offered = [parse_lora(path) for path in options.request_loras]
    redux = None if options.redux is None else resolve_redux(options.redux)
    folder = write_repository(
        source, options.engines, out, options.instance_kind, options.pipeline_instances, options.fp8, offered,
        gpus=options.gpus, redux=redux, redux_engines=options.redux_engines,
    )  # fmt: skip
    models = sorted(path.parent.name for path in folder.glob("*/config.pbtxt"))
    return TritonResult(folder, source.name, models)


def open_server(repository: Path, binary: str | None = None, python_env: str | None = None):
    """A `triton.server.TritonServer` (not started) for `repository`, refused in one line when the repository,
    the binary or the python models' environment is missing, the cheapest mistake first."""
    from fluxexport.triton.server import TritonServer, check_repository, find_tritonserver, python_environment

    check_repository(repository)
    return TritonServer(repository, find_tritonserver(binary), python_environment(python_env))


@dataclass(frozen=True)
class FrontOptions:
    """`serve`'s OpenAI front: where it listens, the Triton it forwards to (None: the one `serve` starts on
    `repository`), the model id clients send (None: the repository's model)."""

    port: int
    host: str = "127.0.0.1"
    triton_url: str | None = None
    repository: Path | None = None
    model: str | None = None
    max_in_flight: int = 64


def open_front(options: FrontOptions, triton_url: str | None = None):
    """An `openai_api.server.FrontServer` (not started) forwarding to `options.triton_url`, else `triton_url` (the
    server `serve` started); refused in one line when it has no model id to serve."""
    from fluxexport.artifacts.repository import read_pipeline_settings
    from fluxexport.errors import FluxExportError
    from fluxexport.openai_api.app import FrontSettings
    from fluxexport.openai_api.server import FrontServer

    url = options.triton_url or triton_url
    if url is None:
        raise FluxExportError("the OpenAI front needs a Triton: give REPOSITORY to start one, or --triton-url URL")
    model = options.model or (read_pipeline_settings(options.repository).model if options.repository else None)
    if model is None:
        raise FluxExportError(
            "--triton-url without REPOSITORY: pass --served-model-name NAME (the model id clients send), or the "
            "repository Triton serves"
        )
    return FrontServer(FrontSettings(url, model, options.max_in_flight), options.host, options.port)


@dataclass(frozen=True)
class DeployOptions:
    """`fluxexport deploy`'s options; None means the default (from the repository's model, kubectl's namespace,
    the pinned image)."""

    repository: Path
    storage_uri: str
    out: Path | None = None
    name: str | None = None
    namespace: str | None = None
    image: str | None = None
    image_tensorrt: str | None = None
    gpus_per_replica: int = 1
    replicas: str = "1:4"
    target_queue_ms: float = 2000.0


@dataclass(frozen=True)
class DeployResult:
    folder: Path
    settings: Any  # deploy.kubernetes.DeploySettings


def write_manifests(options: DeployOptions) -> DeployResult:
    """Kubernetes manifests serving `options.repository` (default folder engines/<model>/k8s), written
    atomically."""
    from fluxexport.artifacts.files import default_folder
    from fluxexport.deploy.kubernetes import deploy_settings, write_deployment

    settings, facts = deploy_settings(
        options.repository, options.storage_uri, name=options.name, image=options.image,
        image_tensorrt=options.image_tensorrt, gpus_per_replica=options.gpus_per_replica, replicas=options.replicas,
        namespace=options.namespace, target_queue_ms=options.target_queue_ms,
    )  # fmt: skip
    out = options.out or default_folder(facts.model, "k8s")
    return DeployResult(write_deployment(options.repository, out, settings, facts), settings)
