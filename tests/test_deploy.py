"""`fluxexport deploy` and `triton --gpus`: manifests validated offline against Kubernetes' schemas and KServe's
own models, image releases checked against the engines' TensorRT, GPU placement checked at the config level."""

import importlib.util
import json
import shutil

import pytest
import yaml
from click.testing import CliRunner
from helpers import build_folder

from fluxexport.cli import main
from fluxexport.deploy.kubernetes import deploy_settings, write_deployment
from fluxexport.errors import FluxExportError
from fluxexport.triton.config import check_config
from fluxexport.triton.repository import write_repository

KUBERNETES = "1.33"  # a version kubernetes-validate carries schemas for


def needs(*packages: str):
    """Skip where the checkers of the `deploy` extra are not installed (looked up, not imported: KServe's protobuf
    messages must stay out of this interpreter, see kserve_problems)."""
    missing = [name for name in packages if importlib.util.find_spec(name.replace("-", "_")) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"{', '.join(missing)} not installed (the deploy extra): pip install -e .[deploy]"
    )


@pytest.fixture(scope="module")
def plan_repository(sources, exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    engines = build_folder(sources["tiny-dev"], exports["tiny-dev"], root / "engines", "10.13.0.35")
    return write_repository(sources["tiny-dev"], engines, root / "repository", pipeline_instances=2, gpus=(0, 1))


def documents(path):
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


KSERVE_CHECK = """
import json, re, sys
import kserve.models, kubernetes.client.models

PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
              "datetime": str, "date": str}


def model_class(name):
    return getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name)


def check(value, kind, where, problems):
    inner = re.fullmatch(r"(?:list|List)\\[(.+)\\]", kind)
    mapping = re.fullmatch(r"(?:dict\\(str, ?|Dict\\[str, ?)(.+)[)\\]]", kind)
    if inner:
        if not isinstance(value, list):
            return problems.append(f"{where}: not a list")
        return [check(item, inner[1], f"{where}[{i}]", problems) for i, item in enumerate(value)]
    if mapping:
        if not isinstance(value, dict):
            return problems.append(f"{where}: not a map")
        return [check(item, mapping[1], f"{where}.{key}", problems) for key, item in value.items()]
    if kind in PRIMITIVES:
        if not isinstance(value, PRIMITIVES[kind]) or (kind != "bool" and isinstance(value, bool) and kind != "object"):
            problems.append(f"{where}: {value!r} is not {kind}")
        return
    klass = model_class(kind)
    if not isinstance(value, dict):
        return problems.append(f"{where}: not an object ({kind})")
    fields = {json_name: attribute for attribute, json_name in klass.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{where}.{key}: {kind} has no such field")
        else:
            check(item, klass.openapi_types[fields[key]], f"{where}.{key}", problems)


problems = []
check(json.load(sys.stdin), "V1beta1InferenceService", "InferenceService", problems)
print(json.dumps(problems))
"""


def kserve_problems(document: dict) -> list[str]:
    """Every field of the InferenceService checked against KServe's own python models (and the Kubernetes
    models they nest): unknown fields and values of the wrong type. In its own process: KServe's and Triton's
    clients register the same protobuf messages (`inference.ServerLiveRequest`), which cannot share one
    interpreter."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", KSERVE_CHECK], input=json.dumps(document), text=True,
                          capture_output=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_triton_gpus_spread_instances_over_the_gpus(plan_repository):
    for name in ("clip", "t5", "transformer", "vae_decoder"):
        config = check_config((plan_repository / name / "config.pbtxt").read_text(), name)
        (group,) = config.instance_group
        assert list(group.gpus) == [0, 1] and group.count == 1 and group.kind == group.KIND_GPU
    pipeline = check_config((plan_repository / "flux_pipeline" / "config.pbtxt").read_text(), "flux_pipeline")
    (group,) = pipeline.instance_group
    assert group.kind == group.KIND_CPU and group.count == 4 and list(group.gpus) == []  # 2 per GPU
    settings = json.loads((plan_repository / "flux_pipeline" / "1" / "pipeline.json").read_text())
    assert settings["gpus"] == [0, 1] and settings["tensorrt"] == "10.13.0.35"


@needs("kubernetes-validate", "kserve")
def test_manifests_validate_against_kubernetes_and_kserve(plan_repository, tmp_path):
    import kubernetes_validate

    settings, facts = deploy_settings(plan_repository, "s3://models/flux/tiny-dev", gpus_per_replica=2,
                                      replicas="2:6", namespace="imaging")  # fmt: skip
    out = write_deployment(plan_repository, tmp_path / "k8s", settings, facts)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "deployment.yaml", "inferenceservice.yaml", "openai-front.yaml",
        "prometheus-adapter-rules.yaml"]  # fmt: skip

    deployment, service, autoscaler = documents(out / "deployment.yaml")
    for document in (deployment, service, autoscaler):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "fluxexport-triton:25.10-py3"  # TensorRT 10.13 engines → Triton 25.10
    assert "--model-repository=s3://models/flux/tiny-dev" in container["args"]  # the repository written
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8000}
    assert {p["containerPort"] for p in container["ports"]} == {8000, 8001, 8002}
    assert (autoscaler["spec"]["minReplicas"], autoscaler["spec"]["maxReplicas"]) == (2, 6)
    assert autoscaler["spec"]["metrics"][0]["pods"]["metric"]["name"] == "flux_pipeline_queue_us_per_request"
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"] == "tiny-dev"
    assert deployment["metadata"]["namespace"] == "imaging"

    # the OpenAI front: its own Deployment, Service and CPU autoscaler, forwarding to Triton's Service, ready while
    # Triton is; its pods are not selected by Triton's Service (nor Triton's by its)
    front, front_service, front_autoscaler = documents(out / "openai-front.yaml")
    for document in (front, front_service, front_autoscaler):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
        assert document["metadata"]["name"] == "tiny-dev-openai" and document["metadata"]["namespace"] == "imaging"
    (front_container,) = front["spec"]["template"]["spec"]["containers"]
    assert front_container["command"] == ["fluxexport"] and front_container["args"] == [
        "serve", "--triton-url", f"{service['metadata']['name']}:8000", "--openai-host", "0.0.0.0",
        "--openai-port", "8080", "--served-model-name", "tiny-dev"]  # fmt: skip
    assert front_container["image"] == container["image"] and "nvidia.com/gpu" not in front_container["resources"]["limits"]
    assert front_container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": 8080}
    assert front_container["livenessProbe"]["httpGet"] == {"path": "/health", "port": 8080}
    assert front_service["spec"]["selector"] == front["spec"]["template"]["metadata"]["labels"] != service["spec"]["selector"]
    assert front_autoscaler["spec"]["scaleTargetRef"]["name"] == "tiny-dev-openai"
    assert front_autoscaler["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert CliRunner().invoke(main, ["serve", *front_container["args"][1:], "--help"]).exit_code == 0  # options exist
    assert "kubectl apply -f openai-front.yaml" in (out / "README.md").read_text()

    (service_document,) = documents(out / "inferenceservice.yaml")
    assert kserve_problems(service_document) == []
    misspelt = json.loads(json.dumps(service_document))
    misspelt["spec"]["predictor"]["model"]["storageURI"] = misspelt["spec"]["predictor"]["model"].pop("storageUri")
    misspelt["spec"]["predictor"]["minReplicas"] = "1"
    assert kserve_problems(misspelt) == [  # the check is not vacuous
        "InferenceService.spec.predictor.minReplicas: '1' is not int",
        "InferenceService.spec.predictor.model.storageURI: V1beta1ModelSpec has no such field",
    ]
    model = service_document["spec"]["predictor"]["model"]
    assert model["storageUri"] == "s3://models/flux/tiny-dev" and model["runtimeVersion"] == "25.10-py3"
    assert model["modelFormat"] == {"name": "triton"} and model["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert model["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"

    (rules,) = documents(out / "prometheus-adapter-rules.yaml")
    (rule,) = rules["rules"]["custom"]
    assert rule["name"]["as"] == "flux_pipeline_queue_us_per_request"
    assert 'model="flux_pipeline"' in rule["metricsQuery"] and "nv_inference_request_success" in rule["metricsQuery"]
    readme = (out / "README.md").read_text()
    assert f"aws s3 sync {plan_repository} s3://models/flux/tiny-dev" in readme and "TRITON_RELEASE=25.10" in readme


@needs("kubernetes-validate")
def test_a_volume_claim_is_mounted(plan_repository, tmp_path):
    import kubernetes_validate

    settings, facts = deploy_settings(plan_repository, "pvc://flux-models/tiny-dev", gpus_per_replica=2)
    deployment = documents(write_deployment(plan_repository, tmp_path / "k", settings, facts) / "deployment.yaml")[0]
    kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "repository", "persistentVolumeClaim": {"claimName": "flux-models", "readOnly": True}} in pod[
        "volumes"
    ]
    assert "--model-repository=/models/tiny-dev" in pod["containers"][0]["args"]


def test_refusals(plan_repository, sources, exports, tmp_path):
    refusals = [
        (dict(image="nvcr.io/nvidia/tritonserver:24.12-py3", gpus_per_replica=2),
         "nvcr.io/nvidia/tritonserver:24.12-py3 serves TensorRT 10.7, the engines were built with TensorRT "
         "10.13.0.35: plans only load on the TensorRT that built them; use --image fluxexport-triton:25.10-py3 "
         "or rebuild the engines"),
        (dict(image="registry/flux:latest", gpus_per_replica=2),
         "cannot tell which Triton release registry/flux:latest is: tag it with the release (…:25.10-py3) or "
         "pass --image-tensorrt with its TensorRT version"),
        (dict(gpus_per_replica=1),
         f"{plan_repository} places instances on GPUs 0, 1, a replica has 1: pass --gpus-per-replica 2 or "
         "write the repository with fewer --gpus"),
        (dict(gpus_per_replica=2, replicas="3:2"), "--replicas 3:2: need 1 ≤ MIN ≤ MAX"),
    ]  # fmt: skip
    for kwargs, message in refusals:
        with pytest.raises(FluxExportError) as refused:
            deploy_settings(plan_repository, "s3://models/flux", **kwargs)
        assert str(refused.value) == message
    with pytest.raises(FluxExportError, match=r"^--storage-uri /data/flux: use s3://BUCKET/PATH"):
        deploy_settings(plan_repository, "/data/flux", gpus_per_replica=2)
    # a custom tag with its TensorRT stated is accepted; a stated mismatch is not
    settings, _ = deploy_settings(plan_repository, "s3://m/f", image="registry/flux:v3", image_tensorrt="10.13.3",
                                  gpus_per_replica=2)  # fmt: skip
    assert settings.image == "registry/flux:v3"
    with pytest.raises(FluxExportError, match="serves TensorRT 10.14, the engines were built with TensorRT 10.13"):
        deploy_settings(plan_repository, "s3://m/f", image="registry/flux:v3", image_tensorrt="10.14.1",
                        gpus_per_replica=2)  # fmt: skip
    # engines of a TensorRT no known release ships
    old = write_repository(
        sources["tiny-dev"],
        build_folder(sources["tiny-dev"], exports["tiny-dev"], tmp_path / "old", "12.0.0.1"),
        tmp_path / "repo-old",
    )
    with pytest.raises(FluxExportError, match=r"^no Triton release in fluxexport's table ships TensorRT 12\.0"):
        deploy_settings(old, "s3://m/f")


def test_cli_deploy_an_onnxruntime_repository(sources, exports, tmp_path):
    repository = write_repository(sources["tiny-schnell"], exports["tiny-schnell"], tmp_path / "repo")
    result = CliRunner().invoke(main, ["deploy", "--repository", str(repository), "--out", str(tmp_path / "k8s"),
                                       "--storage-uri", "gs://bucket/flux", "--replicas", "2:3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "tiny-schnell: fluxexport-triton:25.10-py3 (Triton 25.10), 1 GPU(s) per replica, 2..3 replicas" in " ".join(
        result.output.split()
    )
    (service,) = documents(tmp_path / "k8s" / "inferenceservice.yaml")
    assert service["spec"]["predictor"]["model"]["storageUri"] == "gs://bucket/flux"
    again = CliRunner().invoke(main, ["deploy", "--repository", str(repository), "--out", str(tmp_path / "k8s"),
                                      "--storage-uri", "gs://bucket/flux"])  # fmt: skip
    assert again.exit_code == 1 and "already exists and is not empty" in again.output
    bad = CliRunner().invoke(main, ["deploy", "--repository", str(tmp_path), "--out", str(tmp_path / "x"),
                                    "--storage-uri", "gs://b/f"])  # fmt: skip
    assert bad.exit_code == 1 and "is not a repository written by fluxexport triton" in bad.output
    assert not (tmp_path / "x").exists()


def test_triton_gpus_option(sources, exports, tmp_path):
    result = CliRunner().invoke(main, ["triton", "--model", "tiny-schnell", "--engines", str(exports["tiny-schnell"]),
                                       "--out", str(tmp_path / "r"), "--gpus", "2"])  # fmt: skip
    assert result.exit_code == 1 and "--gpus places GPU instances: add --instance-kind KIND_GPU" in result.output
    result = CliRunner().invoke(main, ["triton", "--model", "tiny-schnell", "--engines", str(exports["tiny-schnell"]),
                                       "--out", str(tmp_path / "r"), "--gpus", "0,x"])  # fmt: skip
    assert result.exit_code == 1 and "--gpus 0,x: give GPU indices (0,1) or a count (2)" in result.output
    result = CliRunner().invoke(main, ["triton", "--model", "tiny-schnell", "--engines", str(exports["tiny-schnell"]),
                                       "--out", str(tmp_path / "r"), "--gpus", "1,3", "--instance-kind", "KIND_GPU"])  # fmt: skip
    assert result.exit_code == 0, result.output
    config = check_config((tmp_path / "r" / "transformer" / "config.pbtxt").read_text(), "transformer")
    assert list(config.instance_group[0].gpus) == [1, 3]
    shutil.rmtree(tmp_path / "r")
