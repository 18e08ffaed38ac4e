"""`fluxexport deploy`: Kubernetes manifests that serve a Triton repository written by `fluxexport triton`.

Two ways, both running NVIDIA's Triton (our serving image: `Dockerfile.triton`, the pinned tritonserver release
plus fluxexport for the python models):

* `inferenceservice.yaml`: a KServe `InferenceService` on KServe's Triton runtime, model repository from
  `--storage-uri` (s3://, gs://, pvc://…), KServe's own autoscaling between `--replicas MIN:MAX`.
* `deployment.yaml`: for clusters without KServe, a `Deployment` + `Service` + `HorizontalPodAutoscaler`
  (autoscaling/v2) scaling on Triton's queue: average queue time per flux_pipeline request, a Pods metric
  served by prometheus-adapter from Triton's own counters (`prometheus-adapter-rules.yaml`). Chosen over a
  KEDA ScaledObject because the HPA is a core resource (validated offline against Kubernetes' schema, no
  operator to install) and prometheus-adapter is what most clusters with Prometheus already run.

Readiness and liveness probe Triton's `/v2/health/ready` and `/v2/health/live`; a startup probe gives engines
up to `STARTUP_SECONDS` to load.

`openai-front.yaml`: the OpenAI-compatible front (`fluxexport serve --triton-url`) as its own Deployment +
Service + HorizontalPodAutoscaler on CPU, forwarding to the Service of `deployment.yaml`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from fluxexport.artifacts.repository import PIPELINE, PipelineSettings, read_pipeline_settings
from fluxexport.errors import FluxExportError

HTTP, GRPC, METRICS = 8000, 8001, 8002
KSERVE_HTTP = 8080  # KServe's Triton runtime serves HTTP on 8080
STARTUP_SECONDS = 1200  # FLUX engines (24 GB) can take minutes to load
QUEUE_METRIC = "flux_pipeline_queue_us_per_request"
STORAGE_SCHEMES = ("s3", "gs", "as", "pvc")


@dataclass(frozen=True)
class DeploySettings:
    name: str
    storage_uri: str
    image: str
    release: str  # the Triton release the image is built on (KServe's runtimeVersion)
    gpus_per_replica: int = 1
    min_replicas: int = 1
    max_replicas: int = 4
    namespace: str | None = None
    target_queue_ms: float = 2000.0
    cpu: str = "8"
    memory: str = "64Gi"


def parse_replicas(value: str) -> tuple[int, int]:
    """`MIN:MAX` (or one number for both) → (min, max), refused in one line unless 1 ≤ min ≤ max."""
    found = re.fullmatch(r"(\d+)(?::(\d+))?", value.strip())
    if not found:
        raise FluxExportError(f"--replicas {value}: write MIN:MAX, e.g. 1:4")
    low, high = int(found[1]), int(found[2] or found[1])
    if not 1 <= low <= high:
        raise FluxExportError(f"--replicas {value}: need 1 ≤ MIN ≤ MAX")
    return low, high


def check_storage_uri(uri: str) -> str:
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme not in STORAGE_SCHEMES or not uri.split("://", 1)[1].strip("/"):
        raise FluxExportError(
            f"--storage-uri {uri}: use s3://BUCKET/PATH, gs://BUCKET/PATH, as://ACCOUNT/CONTAINER/PATH or "
            "pvc://CLAIM/PATH, where the repository was uploaded"
        )
    return uri


def kubernetes_name(text: str) -> str:
    """A DNS-1035 label from a model name: `black-forest-labs/FLUX.1-dev` → `flux-1-dev`."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower().rsplit("/", 1)[-1]).strip("-")
    name = name if name and name[0].isalpha() else f"flux-{name}".strip("-")
    return name[:50].rstrip("-")


def _metadata(settings: DeploySettings, **extra) -> dict:
    metadata = {"name": settings.name, "labels": {"app.kubernetes.io/name": settings.name,
                                                  "app.kubernetes.io/managed-by": "fluxexport"}}  # fmt: skip
    if settings.namespace:
        metadata["namespace"] = settings.namespace
    return metadata | extra


def _resources(settings: DeploySettings) -> dict:
    limits = {"nvidia.com/gpu": str(settings.gpus_per_replica), "cpu": settings.cpu, "memory": settings.memory}
    return {"limits": limits, "requests": dict(limits)}


def _probes(port: int) -> dict:
    def probe(path: str, period: int, failures: int) -> dict:
        return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures}

    return {
        "startupProbe": probe("/v2/health/ready", 10, STARTUP_SECONDS // 10),
        "readinessProbe": probe("/v2/health/ready", 5, 3),
        "livenessProbe": probe("/v2/health/live", 10, 3),
    }


def _repository_mount(settings: DeploySettings) -> tuple[str, list[dict], list[dict]]:
    """(--model-repository value, volumes, volume mounts): object stores are read by Triton itself, a PVC is
    mounted read-only at /models."""
    scheme, rest = settings.storage_uri.split("://", 1)
    if scheme != "pvc":
        return settings.storage_uri, [], []
    claim, _, path = rest.partition("/")
    volume = {"name": "repository", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    mount = {"name": "repository", "mountPath": "/models", "readOnly": True}
    return f"/models/{path}".rstrip("/"), [volume], [mount]


SHM = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}  # python backend tensors cross in /dev/shm


def inference_service(settings: DeploySettings) -> dict:
    """KServe v1beta1 InferenceService on KServe's Triton runtime (`kserve-tritonserver`)."""
    model = {
        "modelFormat": {"name": "triton"},
        "runtime": "kserve-tritonserver",
        "runtimeVersion": f"{settings.release}-py3",
        "protocolVersion": "v2",
        "storageUri": settings.storage_uri,
        "image": settings.image,
        "args": ["--model-control-mode=none", "--allow-metrics=true", f"--metrics-port={METRICS}"],
        "resources": _resources(settings),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        **_probes(KSERVE_HTTP),
    }
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS)}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": _metadata(settings, annotations=annotations),
        "spec": {
            "predictor": {
                "minReplicas": settings.min_replicas,
                "maxReplicas": settings.max_replicas,
                "model": model,
                "volumes": [SHM],
            }
        },  # fmt: skip
    }


def deployment(settings: DeploySettings) -> list[dict]:
    """Deployment + Service + HorizontalPodAutoscaler running tritonserver on the repository."""
    repository, volumes, mounts = _repository_mount(settings)
    labels = {"app.kubernetes.io/name": settings.name}
    container = {
        "name": "tritonserver",
        "image": settings.image,
        "command": ["tritonserver"],
        "args": [
            f"--model-repository={repository}",
            "--model-control-mode=none",
            f"--http-port={HTTP}",
            f"--grpc-port={GRPC}",
            f"--metrics-port={METRICS}",
            "--allow-metrics=true",
        ],  # fmt: skip
        "ports": [
            {"name": "http", "containerPort": HTTP},
            {"name": "grpc", "containerPort": GRPC},
            {"name": "metrics", "containerPort": METRICS},
        ],  # fmt: skip
        "resources": _resources(settings),
        "volumeMounts": [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}],
        **_probes(HTTP),
    }
    pod = {
        "metadata": {
            "labels": labels,
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS)},
        },  # fmt: skip
        "spec": {
            "containers": [container],
            "volumes": [*volumes, SHM],
            "terminationGracePeriodSeconds": 60,
        },  # fmt: skip
    }
    deploy = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(settings),
        "spec": {"replicas": settings.min_replicas, "selector": {"matchLabels": labels}, "template": pod},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(settings),
        "spec": {"selector": labels, "ports": [{"name": name, "port": port, "targetPort": port}
                                               for name, port in (("http", HTTP), ("grpc", GRPC), ("metrics", METRICS))]},
    }  # fmt: skip
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(settings),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": settings.name},
            "minReplicas": settings.min_replicas,
            "maxReplicas": settings.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QUEUE_METRIC},
                        "target": {"type": "AverageValue", "averageValue": str(int(settings.target_queue_ms * 1000))},
                    },
                }
            ],  # fmt: skip
            # a new replica loads engines for minutes: scale up at most one pod a minute, down slowly
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 60,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": 600,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
                },
            },  # fmt: skip
        },
    }
    return [deploy, service, autoscaler]


OPENAI_PORT = 8080  # the OpenAI front's HTTP port
FRONT_REPLICAS = (2, 8)  # the front's replicas, scaled on its CPU apart from Triton's GPUs
FRONT_CPU_UTILIZATION = 70  # percent of the requested CPU above which the front adds a replica


def openai_front(settings: DeploySettings, model: str) -> list[dict]:
    """Deployment + Service + HorizontalPodAutoscaler for the OpenAI-compatible front (`fluxexport serve
    --triton-url`): CPU pods from the serving image, forwarding to the Triton Service of `deployment`, ready only
    while Triton is, scaled on their CPU apart from Triton's replicas."""
    name = f"{settings.name}-openai"
    front = replace(settings, name=name)
    labels = {"app.kubernetes.io/name": name}
    container = {
        "name": "openai-front",
        "image": settings.image,
        "command": ["fluxexport"],
        "args": [
            "serve",
            "--triton-url",
            f"{settings.name}:{HTTP}",
            "--openai-host",
            "0.0.0.0",
            "--openai-port",
            str(OPENAI_PORT),
            "--served-model-name",
            model,
        ],
        "ports": [{"name": "http", "containerPort": OPENAI_PORT}],
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        "startupProbe": {
            "httpGet": {"path": "/health", "port": OPENAI_PORT},
            "periodSeconds": 5,
            "failureThreshold": 24,
        },
        "readinessProbe": {
            "httpGet": {"path": "/health/ready", "port": OPENAI_PORT},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": OPENAI_PORT},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
    }
    low, high = FRONT_REPLICAS
    deploy = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(front),
        "spec": {"replicas": low, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": [container],
                                                                      "terminationGracePeriodSeconds": 30}}},
    }  # fmt: skip
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(front),
        "spec": {"selector": labels, "ports": [{"name": "http", "port": OPENAI_PORT, "targetPort": OPENAI_PORT}]},
    }
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(front),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": low,
            "maxReplicas": high,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                "type": "Utilization", "averageUtilization": FRONT_CPU_UTILIZATION}}}],
        },
    }  # fmt: skip
    return [deploy, service, autoscaler]


def adapter_rules() -> dict:
    """prometheus-adapter Helm values: Triton's cumulative queue time over its successful requests, per pod,
    as `flux_pipeline_queue_us_per_request` (µs a request waited in the queue over the last minute)."""
    matchers = f'<<.LabelMatchers>>,model="{PIPELINE}"'
    query = (
        f"sum(rate(nv_inference_queue_duration_us{{{matchers}}}[1m])) by (<<.GroupBy>>) / "
        f"clamp_min(sum(rate(nv_inference_request_success{{{matchers}}}[1m])) by (<<.GroupBy>>), 1e-3)"
    )
    rule = {
        "seriesQuery": f'nv_inference_queue_duration_us{{model="{PIPELINE}",namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": "^nv_inference_queue_duration_us$", "as": QUEUE_METRIC},
        "metricsQuery": query,
    }
    return {"rules": {"custom": [rule]}}


def to_yaml(documents: list[dict]) -> str:
    import yaml

    return "---\n".join(yaml.safe_dump(document, sort_keys=False) for document in documents)


def deploy_settings(
    repository: Path, storage_uri: str, *, name: str | None = None, image: str | None = None,
    image_tensorrt: str | None = None, gpus_per_replica: int = 1, replicas: str = "1:4",
    namespace: str | None = None, target_queue_ms: float = 2000.0,
) -> tuple[DeploySettings, PipelineSettings]:  # fmt: skip
    """Settings checked against the repository (its TensorRT, its GPU placement), and the repository's facts."""
    from fluxexport.deploy.releases import check_image, default_image

    facts = read_pipeline_settings(repository)
    tensorrt = facts.tensorrt
    image = image or default_image(tensorrt)
    release = check_image(image, tensorrt, image_tensorrt)
    placed = facts.gpus
    if placed and max(placed) >= gpus_per_replica:
        raise FluxExportError(
            f"{repository} places instances on GPUs {', '.join(map(str, placed))}, a replica has "
            f"{gpus_per_replica}: pass --gpus-per-replica {max(placed) + 1} or write the repository with fewer --gpus"
        )
    low, high = parse_replicas(replicas)
    settings = DeploySettings(
        name=name or kubernetes_name(facts.model), storage_uri=check_storage_uri(storage_uri), image=image,
        release=release, gpus_per_replica=gpus_per_replica, min_replicas=low, max_replicas=high,
        namespace=namespace, target_queue_ms=target_queue_ms,
    )  # fmt: skip
    return settings, facts


def write_deployment(repository: Path, out: Path, settings: DeploySettings, facts: PipelineSettings) -> Path:
    """`out/`: inferenceservice.yaml, deployment.yaml, prometheus-adapter-rules.yaml, openai-front.yaml and a
    README with the commands, written atomically."""
    from fluxexport.atomic import atomic_folder

    with atomic_folder(Path(out)) as staging:
        (staging / "inferenceservice.yaml").write_text(to_yaml([inference_service(settings)]))
        (staging / "deployment.yaml").write_text(to_yaml(deployment(settings)))
        (staging / "prometheus-adapter-rules.yaml").write_text(to_yaml([adapter_rules()]))
        (staging / "openai-front.yaml").write_text(to_yaml(openai_front(settings, facts.model)))
        (staging / "README.md").write_text(_readme(Path(repository), settings, facts))
    return Path(out)


def _upload(repository: Path, uri: str) -> str:
    scheme = uri.split("://", 1)[0]
    if scheme == "s3":
        return f"aws s3 sync {repository} {uri}"
    if scheme == "gs":
        return f"gcloud storage rsync --recursive {repository} {uri}"
    if scheme == "as":
        return f"azcopy sync {repository} 'https://<account>.blob.core.windows.net/{uri.split('://', 1)[1]}'"
    return f"# copy {repository} into the volume claim's {uri.split('://', 1)[1].partition('/')[2] or '/'} (e.g. kubectl cp through a pod)"


def _readme(repository: Path, settings: DeploySettings, facts: PipelineSettings) -> str:
    engines = f"TensorRT {facts.tensorrt} plans" if facts.tensorrt else "ONNX Runtime graphs"
    return f"""# Serving {facts.model} on Kubernetes

Written by `fluxexport deploy` for the repository `{repository}` ({engines}), uploaded to `{settings.storage_uri}`.
Image `{settings.image}` (Triton {settings.release}); {settings.gpus_per_replica} GPU(s) per replica,
{settings.min_replicas}..{settings.max_replicas} replicas.

1. Upload the repository: `{_upload(repository, settings.storage_uri)}`
2. Build and push the serving image (NVIDIA's tritonserver:{settings.release}-py3 plus fluxexport for the
   python models), from a fluxexport checkout:
   `docker build -f Dockerfile.triton --build-arg TRITON_RELEASE={settings.release} -t REGISTRY/{settings.image} . && docker push REGISTRY/{settings.image}`
   and run `fluxexport deploy` again with `--image REGISTRY/{settings.image}`.
3. Either, with KServe: `kubectl apply -f inferenceservice.yaml`
   or, without: install prometheus-adapter with `prometheus-adapter-rules.yaml` as Helm values
   (`helm upgrade --install prometheus-adapter prometheus-community/prometheus-adapter -f prometheus-adapter-rules.yaml`),
   then `kubectl apply -f deployment.yaml`. The HorizontalPodAutoscaler adds a replica when the average time
   a request waits in flux_pipeline's queue passes {settings.target_queue_ms:g} ms.
4. Ask: `curl -X POST http://{settings.name}:{HTTP}/v2/models/{PIPELINE}/infer -d '{{"inputs": [{{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a red fox"]}}]}}'`
   Readiness: `/v2/health/ready`; metrics: port {METRICS}, `nv_inference_count{{model="{PIPELINE}"}}`.
5. OpenAI's images API in front of it (optional): `kubectl apply -f openai-front.yaml` runs
   `fluxexport serve --triton-url {settings.name}:{HTTP} --openai-port {OPENAI_PORT}` on CPU pods
   ({FRONT_REPLICAS[0]}..{FRONT_REPLICAS[1]} replicas on their CPU, apart from Triton's), ready while Triton is
   (with KServe, change `--triton-url` to the InferenceService's predictor address). Any OpenAI SDK then works:
   `OpenAI(base_url="http://{settings.name}-openai:{OPENAI_PORT}/v1", api_key="unused").images.generate(model="{facts.model}", prompt="a red fox")`.
"""
