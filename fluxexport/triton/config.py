"""config.pbtxt files derived from the component specs, checked against Triton's ModelConfig schema and ours.

All models use `max_batch_size: 0` with the batch as an explicit -1 dim: the transformer's img_ids/txt_ids
have no batch axis, so Triton's implicit batching cannot apply to it, and one rule for all keeps clients simple.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fluxexport.artifacts.records import EngineRecord, GraphRecord, TensorRecord
from fluxexport.artifacts.repository import PIPELINE
from fluxexport.dtypes import ELEMENT_TRITON
from fluxexport.errors import FluxExportError
from fluxexport.specs import ComponentSpec

INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")  # where Triton places a model's instances


@dataclass(frozen=True)
class TensorConfig:
    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class ModelConfig:
    name: str
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    backend: str | None = None  # "python"
    platform: str | None = None  # "tensorrt_plan"
    instance_kind: str = "KIND_CPU"
    instance_count: int = 1
    profiles: tuple[str, ...] = ()
    parameters: dict[str, str] = field(default_factory=dict)
    gpus: tuple[int, ...] = ()  # KIND_GPU: `count` instances on each of these GPUs (all visible ones if empty)

    def to_pbtxt(self) -> str:
        lines = [f'name: "{self.name}"']
        lines += [f'backend: "{self.backend}"'] if self.backend else [f'platform: "{self.platform}"']
        lines.append("max_batch_size: 0")
        for keyword, tensors in (("input", self.inputs), ("output", self.outputs)):
            lines.append(f"{keyword} [")
            entries = []
            for tensor in tensors:
                optional = " optional: true" if tensor.optional else ""
                dims = ", ".join(str(d) for d in tensor.dims)
                entries.append(
                    f'  {{ name: "{tensor.name}" data_type: {tensor.data_type} dims: [ {dims} ]{optional} }}'
                )
            lines.append(",\n".join(entries))
            lines.append("]")
        profiles = "".join(f' profile: "{p}"' for p in self.profiles)
        gpus = f" gpus: [ {', '.join(map(str, self.gpus))} ]" if self.gpus and self.instance_kind == "KIND_GPU" else ""
        lines.append(
            f"instance_group [ {{ count: {self.instance_count} kind: {self.instance_kind}{gpus}{profiles} }} ]"
        )
        for key, value in self.parameters.items():
            lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
        return "\n".join(lines) + "\n"


def _tensor_configs(tensors: tuple[TensorRecord, ...], spec_tensors) -> tuple[TensorConfig, ...]:
    """Manifest tensors (names, dtypes as exported) with the spec's dims: -1 for every symbolic axis."""
    configs = []
    for tensor, spec_tensor in zip(tensors, spec_tensors, strict=True):
        if tensor.name != spec_tensor.name:
            raise FluxExportError(f"manifest tensor {tensor.name!r} is not the spec's {spec_tensor.name!r}")
        dims = tuple(d if isinstance(d, int) else -1 for d in spec_tensor.dims)
        configs.append(TensorConfig(tensor.name, ELEMENT_TRITON[tensor.dtype], dims))
    return tuple(configs)


def component_config(
    spec: ComponentSpec, record: GraphRecord | EngineRecord, instance_kind: str, count: int = 1,
    gpus: tuple[int, ...] = (),
) -> ModelConfig:  # fmt: skip
    """The config of one component model: a plan (`tensorrt_plan`) for an engine record, the python backend
    (ONNX Runtime) for a graph record; GPU instances go on each of `gpus` (every visible GPU when empty)."""
    inputs = _tensor_configs(record.inputs, spec.inputs)
    outputs = _tensor_configs(record.outputs, spec.outputs)
    if isinstance(record, EngineRecord):
        # every profile of the plan (one per resolution bucket): Triton picks the one each request's shapes
        # fit; an instance given none uses profile 0 only
        profiles = tuple(str(index) for index in range(len(record.profiles)))
        return ModelConfig(spec.name, inputs, outputs, platform="tensorrt_plan", instance_kind="KIND_GPU",
                           instance_count=count, profiles=profiles, gpus=gpus)  # fmt: skip
    return ModelConfig(spec.name, inputs, outputs, backend="python", instance_kind=instance_kind, instance_count=count,
                       gpus=gpus)  # fmt: skip


# Reference images come as one input each, uint8 [H,W,3] (pictures of different sizes need no padding), numbered
# `image`, `image_2`, …: a family's pipeline takes the first of them as many as it reads (FLUX.1 Kontext: `image`;
# FLUX.2: all ten, its announced reference count)
MAX_REFERENCE_IMAGES = 10
REFERENCE_INPUTS = ("image", *(f"image_{number}" for number in range(2, MAX_REFERENCE_IMAGES + 1)))


def pipeline_config(
    inputs: tuple[TensorConfig, ...], instance_kind: str, count: int = 1, gpus: tuple[int, ...] = ()
) -> ModelConfig:
    """flux_pipeline: `inputs` (the family's, `families/<f>/triton.py` `pipeline_inputs`) in, uint8 images
    [B,H,W,3] out; with `gpus`, `count` instances per GPU (GPU instances on each, CPU instances `count` × the number
    of GPUs)."""
    outputs = (TensorConfig("images", "TYPE_UINT8", (-1, -1, -1, 3)),)
    if gpus and instance_kind != "KIND_GPU":
        count *= len(gpus)
    return ModelConfig(PIPELINE, inputs, outputs, backend="python", instance_kind=instance_kind,
                       instance_count=count, gpus=gpus)  # fmt: skip


def settings_inputs() -> list[TensorConfig]:
    """The optional settings every family's pipeline takes: size, steps, guidance, seed, images per prompt."""
    return [
        TensorConfig("height", "TYPE_INT32", (1,), optional=True),
        TensorConfig("width", "TYPE_INT32", (1,), optional=True),
        TensorConfig("num_inference_steps", "TYPE_INT32", (1,), optional=True),
        TensorConfig("guidance_scale", "TYPE_FP32", (1,), optional=True),
        TensorConfig("seed", "TYPE_INT64", (1,), optional=True),
        TensorConfig("num_images", "TYPE_INT32", (1,), optional=True),
    ]


def lora_and_cache_inputs() -> list[TensorConfig]:
    """The per-request LoRAs and step cache every family's pipeline takes."""
    return [
        TensorConfig("lora", "TYPE_STRING", (-1,), optional=True),  # names of LoRAs placed in the repository
        TensorConfig("lora_scale", "TYPE_FP32", (-1,), optional=True),  # one per LoRA, or one for all
        TensorConfig("cache", "TYPE_STRING", (1,), optional=True),  # a step cache, as `run --cache` takes it
    ]


def reference_inputs(count: int) -> list[TensorConfig]:
    """The first `count` reference image inputs (`REFERENCE_INPUTS`), each optional uint8 [H,W,3]."""
    return [TensorConfig(name, "TYPE_UINT8", (-1, -1, 3), optional=True) for name in REFERENCE_INPUTS[:count]]


# A FLUX.1 Redux prior's inputs (a repository written with `redux`): its images numbered as the references are (one
# uint8 [H,W,3] each, any size: the prior's processor resizes them), and the per-image scales of its text and pooled
# embeddings (one value for every image, or one per image), as `run --redux-scale/--redux-pooled-scale` take them
REDUX_INPUTS = ("redux_image", *(f"redux_image_{number}" for number in range(2, MAX_REFERENCE_IMAGES + 1)))
REDUX_SCALES = ("redux_scale", "redux_pooled_scale")


def redux_inputs() -> list[TensorConfig]:
    """The optional Redux inputs: `redux_image` … `redux_image_10`, `redux_scale`, `redux_pooled_scale`."""
    images = [TensorConfig(name, "TYPE_UINT8", (-1, -1, 3), optional=True) for name in REDUX_INPUTS]
    return images + [TensorConfig(name, "TYPE_FP32", (-1,), optional=True) for name in REDUX_SCALES]


def with_redux_inputs(inputs: tuple[TensorConfig, ...]) -> tuple[TensorConfig, ...]:
    """A FluxPipeline's inputs in front of a Redux prior: its `prompt` optional (a variation needs none), then
    the prior's own."""
    optional = tuple(replace(t, optional=True) if t.name == "prompt" else t for t in inputs)
    return (*optional, *redux_inputs())


def check_config(text: str, folder_name: str, spec: ComponentSpec | None = None):
    """Parse against Triton's ModelConfig protobuf, then our rules: name = folder, dims agree with the spec."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise FluxExportError(f"{folder_name}/config.pbtxt does not fit Triton's schema: {error}") from None
    if config.name != folder_name:
        raise FluxExportError(
            f"{folder_name}/config.pbtxt names the model {config.name!r}: Triton needs the folder name"
        )
    if config.max_batch_size != 0:
        raise FluxExportError(f"{folder_name}: max_batch_size must be 0 (batch is an explicit -1 dim)")
    if spec is not None:
        for values, tensors in ((config.input, spec.inputs), (config.output, spec.outputs)):
            if [v.name for v in values] != [t.name for t in tensors]:
                raise FluxExportError(
                    f"{folder_name}: tensors {[v.name for v in values]} are not the spec's {[t.name for t in tensors]}"
                )
            for value, tensor in zip(values, tensors, strict=True):
                expected = [d if isinstance(d, int) else -1 for d in tensor.dims]
                if list(value.dims) != expected:
                    raise FluxExportError(
                        f"{folder_name}.{value.name}: dims {list(value.dims)}, the spec says {expected}"
                    )
    return config
