"""Write a Triton model repository: one model per component and the flux_pipeline model on top."""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path

from fluxexport.atomic import atomic_folder
from fluxexport.dtypes import host_element
from fluxexport.errors import FluxExportError
from fluxexport.export.manifest import graph_entries, read_manifest
from fluxexport.models.source import ModelSource
from fluxexport.models.tiny import TINY_MARKER
from fluxexport.specs import component_specs, pipeline_components
from fluxexport.triton.config import PIPELINE, check_config, component_config, pipeline_config

_CHECKPOINT_FILES = ("model_index.json", TINY_MARKER, "transformer/config.json", "vae/config.json",
                     "text_encoder/config.json", "text_encoder_2/config.json", "scheduler/scheduler_config.json")  # fmt: skip


def _template(name: str) -> str:
    return resources.files("fluxexport.triton").joinpath("templates", name).read_text()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_config(folder: Path, text: str, spec=None) -> None:
    check_config(text, folder.name, spec)  # before anything is written
    (folder / "config.pbtxt").write_text(text)


def _copy_checkpoint(source: ModelSource, target: Path) -> None:
    """Configs and tokenizers only: what the pipeline model needs to tokenize, schedule and scale."""
    for relative in _CHECKPOINT_FILES:
        path = source.root / relative
        if path.is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / relative)
    for folder in ("tokenizer", "tokenizer_2"):
        shutil.copytree(source.root / folder, target / folder)


def _bounds(manifest: dict) -> dict:
    if manifest.get("kind") == "tensorrt":
        options = manifest["builder"]
        return {"min_resolution": options["resolution"][0], "max_resolution": options["resolution"][2],
                "max_batch": options["batch"][2]}  # fmt: skip
    bounds = manifest["bounds"]
    return {key: bounds[key] for key in ("min_resolution", "max_resolution", "max_batch")}


def write_repository(
    source: ModelSource, engines: Path, out: Path, instance_kind: str = "KIND_CPU", pipeline_instances: int = 1,
    fp8: bool | None = None,
) -> Path:  # fmt: skip
    """A repository at `out` serving the graphs (python backend + ONNX Runtime) or plans (TensorRT) in `engines`;
    from graphs, `fp8` picks the transformer as the ONNX Runtime backend does (the FP8 one if there is one)."""
    engines, out = Path(engines), Path(out)
    manifest = read_manifest(engines)
    kind = "tensorrt" if manifest.get("kind") == "tensorrt" else "onnxruntime"
    if manifest["model"]["fingerprint"] != source.fingerprint():
        raise FluxExportError(
            f"{engines} was made from {manifest['model']['name']!r}, not {source.name!r}: pass the same --model"
        )
    entries = manifest["components"] if kind == "tensorrt" else graph_entries(manifest, fp8)
    needed = pipeline_components(source)
    missing = [name for name in needed if name not in entries]
    if missing:
        raise FluxExportError(f"{engines} lacks {', '.join(missing)}: the pipeline needs {', '.join(needed)}")
    specs = component_specs(source)
    with atomic_folder(out) as staging:
        bls_components = {}
        for name in needed:
            entry = entries[name]
            version = staging / name / "1"
            version.mkdir(parents=True)
            config = component_config(specs[name], entry, kind, instance_kind)
            _write_config(staging / name, config.to_pbtxt(), specs[name])
            if kind == "tensorrt":
                _link_or_copy(engines / entry["file"], version / "model.plan")
                bls_components[name] = {"inputs": entry["inputs"], "outputs": entry["outputs"]}
            else:
                _link_or_copy(engines / entry["file"], version / "model.onnx")
                if entry.get("external_data"):
                    _link_or_copy(engines / entry["external_data"], version / entry["external_data"])
                (version / "component.json").write_text(json.dumps(entry, indent=2))
                (version / "model.py").write_text(_template("onnxruntime_component.py"))
                # the python component takes float32 and casts for its graph itself
                as_float = [{**t, "dtype": host_element(t["dtype"])} for t in entry["inputs"]]
                bls_components[name] = {"inputs": as_float, "outputs": entry["outputs"]}
        pipeline = staging / PIPELINE / "1"
        pipeline.mkdir(parents=True)
        _write_config(
            staging / PIPELINE, pipeline_config(source.is_kontext, instance_kind, pipeline_instances).to_pbtxt()
        )
        (pipeline / "model.py").write_text(_template("flux_pipeline.py"))
        _copy_checkpoint(source, pipeline / "checkpoint")
        settings = {"model": source.name, "kind": kind, "bounds": _bounds(manifest), "components": bls_components}
        (pipeline / "pipeline.json").write_text(json.dumps(settings, indent=2))
        (staging / "README.md").write_text(_readme(source, kind, needed))
    return out


def _readme(source: ModelSource, kind: str, components) -> str:
    engine = (
        "TensorRT plans (`tensorrt_plan`)" if kind == "tensorrt" else "ONNX graphs run by ONNX Runtime (python backend)"
    )
    kontext = " and `image` (uint8 [H,W,3], the Kontext reference)" if source.is_kontext else ""
    return f"""# Triton model repository for {source.name}

Written by `fluxexport triton`. Components ({", ".join(components)}) are {engine}; `flux_pipeline`
(python backend) takes `prompt` (BYTES [1]) and optional `prompt_2`, `height`, `width`,
`num_inference_steps`, `guidance_scale`, `seed`, `num_images`{kontext}, and returns `images`
(UINT8 [B,H,W,3]), calling the components through BLS with fluxexport's runtime.

Start a server on it (Triton 2.51+, python backend; the python environment needs `fluxexport`,
`onnxruntime` and numpy<2):

    fluxexport serve {{this folder}}              # a local server on 127.0.0.1, Ctrl-C to stop
    tritonserver --model-repository={{this folder}}

Every config.pbtxt uses `max_batch_size: 0` with an explicit -1 batch dim: the transformer's `img_ids` and
`txt_ids` have no batch axis.
"""
