"""The flux_pipeline request a client sends, built from the pipeline's own config (names and types once)."""

from __future__ import annotations

import numpy as np

from fluxexport.families import FAMILIES
from fluxexport.triton.config import REDUX_INPUTS, REFERENCE_INPUTS, redux_inputs

# config.pbtxt type → (numpy dtype, the datatype Triton's clients name)
WIRE = {"TYPE_STRING": (object, "BYTES"), "TYPE_INT32": (np.int32, "INT32"), "TYPE_INT64": (np.int64, "INT64"),
        "TYPE_FP32": (np.float32, "FP32"), "TYPE_UINT8": (np.uint8, "UINT8")}  # fmt: skip
# every family's inputs, in the registry's order (a repository's own config says which of them it takes)
INPUTS = {tensor.name: tensor for family in FAMILIES for tensor in family.part("triton").pipeline_inputs()}
INPUTS |= {tensor.name: tensor for tensor in redux_inputs()}  # a repository written with a FLUX.1 Redux prior


def pipeline_inputs(protocol, prompt: str | None, **values) -> list:
    """InferInputs of `protocol` (`tritonclient.http` or `tritonclient.grpc`) for one flux_pipeline request:
    `prompt` and any of the optional inputs by name (`height=256`, `seed=3`, `lora=["ink"]`,
    `lora_scale=[0.8]`, `image=uint8 [H,W,3]`, `negative_prompt="blurry"`); None leaves an input out. FLUX.2's
    several references may come as one list, `image=[first, second]`: they become `image`, `image_2`, … (a Redux
    prior's `redux_image=[…]` likewise); a `prompt` of None is left out (a Redux variation needs none)."""
    values = _numbered_references(_numbered_references(values), "redux_image", REDUX_INPUTS, "Redux images")
    unknown = sorted(set(values) - set(INPUTS))
    if unknown:
        raise ValueError(f"flux_pipeline has no input {unknown[0]!r} (it takes {', '.join(INPUTS)})")
    inputs = []
    for name, value in {"prompt": prompt, **values}.items():
        if value is None:
            continue
        dtype, datatype = WIRE[INPUTS[name].data_type]
        if dtype is object:
            value = [v.encode() if isinstance(v, str) else v for v in ([value] if isinstance(value, str) else value)]
        array = np.asarray(value, dtype=dtype)
        array = array.reshape(1) if array.ndim == 0 else array
        tensor = protocol.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _numbered_references(
    values: dict, key: str = "image", names: tuple[str, ...] = REFERENCE_INPUTS, what: str = "reference images"
) -> dict:
    """`image=[a, b, …]` (arrays [H,W,3]) → `image=a, image_2=b, …` (`key` and its numbered `names`); anything
    else as given."""
    images = values.get(key)
    if not (isinstance(images, list | tuple) and images and all(isinstance(i, np.ndarray) for i in images)):
        return values
    if len(images) > len(names):
        raise ValueError(f"flux_pipeline takes at most {len(names)} {what}, got {len(images)}")
    named = {name: value for name, value in values.items() if name != key}
    return named | dict(zip(names, images, strict=False))
