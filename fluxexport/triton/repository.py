"""Write a Triton model repository: one model per component and the flux_pipeline model on top."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, replace
from importlib import resources
from pathlib import Path

from fluxexport.artifacts.folders import EngineFolder, ExportFolder, open_folder
from fluxexport.artifacts.published import PUBLISHED, posterior_record
from fluxexport.artifacts.records import EngineRecord, GraphRecord
from fluxexport.artifacts.repository import PIPELINE, ComponentIO, PipelineSettings, ServedGraph
from fluxexport.artifacts.weights import sibling_tensors
from fluxexport.atomic import atomic_folder
from fluxexport.dtypes import host_element
from fluxexport.errors import FluxExportError
from fluxexport.models.loaders import MODULE_OF
from fluxexport.models.lora import LoraFile
from fluxexport.models.redux import REDUX_COMPONENTS, ReduxSource
from fluxexport.models.source import ModelSource
from fluxexport.models.tiny import TINY_MARKER
from fluxexport.onnxruntime.backend import LORA_COMPONENTS
from fluxexport.specs import TRANSFORMER_PARTS, ExportBounds, component_specs, pipeline_components
from fluxexport.triton.config import check_config, component_config, pipeline_config, with_redux_inputs


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
    """Configs and tokenizers only (the family's own: FLUX.2 has one text encoder and one tokenizer): what the
    pipeline model needs to tokenize, schedule and scale."""
    for relative in ("model_index.json", TINY_MARKER, *source.family.config_files.values()):
        path = source.root / relative
        if path.is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / relative)
    for folder in source.family.tokenizer_folders:
        shutil.copytree(source.root / folder, target / folder)


def _bounds(folder: ExportFolder | EngineFolder, source: ModelSource) -> dict:
    """What the repository serves, every bound (sides, batch, text, FLUX.2's reference budget): an engine folder's
    build bounds, or an export's bounds, read as `ExportBounds` (folders recorded before the reference budget
    serve what they were made for); a published folder records none but the text length its graphs fix, so the
    model's export defaults (a tiny model's sides too) with that length, as `build` profiles it."""
    if folder.kind == PUBLISHED:
        return asdict(replace(ExportBounds.for_model(source), **folder.bounds))
    return asdict(ExportBounds.from_json(folder.bounds, built=isinstance(folder, EngineFolder)))


LORA_FOLDER = f"{PIPELINE}/1/loras"  # the LoRAs clients may pick per request, relative to the repository


def _lora_names(
    source: ModelSource, loras: Sequence[LoraFile], entries: dict[str, GraphRecord | EngineRecord], kind: str
) -> dict[str, dict]:
    """Name (file stem) → record of each per-request LoRA, read for the model's family (FLUX.2 LoRAs adapt its
    transformer only), refused in one line before anything is written when it does not fit the model, its name
    repeats, or the graphs it adapts cannot take it."""
    from fluxexport.models.lora import LoraSet

    if loras and kind == "tensorrt":
        raise FluxExportError(
            "per-request LoRAs are swapped by the ONNX Runtime components; TensorRT plans take LoRAs by refit: "
            f"fluxexport refit --model {source.name} --engines DIR --lora FILE, then write the repository from "
            "the refitted engines"
        )
    graphs = {name: graph for name, graph in entries.items() if isinstance(graph, GraphRecord)}  # plans: refused
    names: dict[str, dict] = {}
    for lora in loras:
        name = lora.path.stem
        if name in names:
            raise FluxExportError(f"two --request-lora files are named {name}: a request names LoRAs by file stem")
        modules = sorted(LoraSet([lora], source.family.name).layers)
        for component in (c for c in LORA_COMPONENTS if c in graphs and MODULE_OF[c] in modules):
            _check_swappable(source.with_loras([lora]), component, graphs, name)
        names[name] = {"file": lora.path.name, "sha256": lora.sha256, "modules": modules}
    return names


def _check_swappable(source: ModelSource, component: str, graphs: dict[str, GraphRecord], name: str) -> None:
    """Refuse LoRA `name` (the LoRAs of `source`) unless `component`'s graph can take it: a base graph that
    records its weights' origins and, for a part of the transformer, the parts hold every layer between them."""
    from fluxexport.artifacts.weights import check_swap, refuse_unheld

    graph, module = graphs[component], MODULE_OF[component]
    held = {origin.tensor for origin in check_swap(source, module, graph).values()}
    if component in TRANSFORMER_PARTS:
        elsewhere = sibling_tensors(graphs, component, TRANSFORMER_PARTS)
        refuse_unheld(source.lora_set, module, held | elsewhere, graph.file, siblings=True)
    if graph.is_fp8:
        raise FluxExportError(
            f"LoRA {name} adapts the transformer, whose graph here is FP8: write the repository with --no-fp8"
        )


def _served_graph(
    source: ModelSource, name: str, entries: dict[str, GraphRecord | EngineRecord], loras: bool
) -> ServedGraph:
    """The served graph of `name`: where its per-request LoRAs are, which module they adapt, the family they are
    read for and, for a part of the transformer, the tensors its sibling parts hold (`loras`: any placed)."""
    graph = entries[name]
    if not loras or name not in LORA_COMPONENTS:
        return ServedGraph(graph)
    graphs = {part: entry for part, entry in entries.items() if isinstance(entry, GraphRecord)}
    elsewhere = tuple(sorted(sibling_tensors(graphs, name, TRANSFORMER_PARTS)))
    return ServedGraph(graph, LORA_FOLDER, MODULE_OF[name], elsewhere, source.family.name)


REDUX_FOLDER = "redux"  # in flux_pipeline's version folder: the Redux prior's configs, in a folder of its name
REDUX_RECORD = "redux.json"  # beside it: the prior's name, that folder and the most images its engines take


def redux_max_images(records: dict) -> int | None:
    """The most images one request may send the prior: its plans' largest profile batch (None for graphs, which
    take any batch)."""
    batches = [
        max(shapes[2][0] for profile in record.profiles for shapes in profile.values())
        for record in records.values()
        if isinstance(record, EngineRecord)
    ]
    return min(batches) if batches else None


def _redux_records(
    source: ModelSource, redux: ReduxSource | None, folder: Path | None, kind: str
) -> dict[str, GraphRecord | EngineRecord]:
    """The Redux prior's two components (its engines from `build --redux`, its graphs from `export --redux`, of
    the same kind as the base's), refused in one line before anything is written where they cannot serve."""
    from fluxexport.artifacts.redux import is_redux_engines, open_redux_engines, open_redux_export

    if redux is None:
        if folder is not None:
            raise FluxExportError("--redux-engines is the Redux prior's folder: add --redux PRIOR")
        return {}
    redux.check_base(source)
    if folder is None:
        raise FluxExportError(
            f"the repository serves {redux.name} from its graphs or engines: export them with `fluxexport export "
            "--redux` (or build them with `build --redux`) and pass that folder with --redux-engines"
        )
    if is_redux_engines(folder) != (kind == "tensorrt"):
        made = "TensorRT engines" if kind == "tensorrt" else "ONNX graphs"
        raise FluxExportError(
            f"{folder} does not hold the Redux prior's {made}, as the base's folder does: pass the Redux folder of "
            f"the same kind (`{'build' if kind == 'tensorrt' else 'export'} --redux`)"
        )
    if kind == "tensorrt":
        return dict(open_redux_engines(folder, redux.name).engines)
    return dict(open_redux_export(folder, redux.name).graphs)


def _write_redux(
    staging: Path, redux: ReduxSource, folder: Path, records: dict, instance_kind: str, gpus: tuple[int, ...]
) -> dict[str, ComponentIO]:
    """The prior's component models (fp32 as exported, no LoRAs) and its configs beside the pipeline's checkpoint
    (`flux_pipeline/1/redux/<name>`: what the pipeline model reads it with); their inputs and outputs for BLS."""
    from fluxexport.specs.redux import redux_specs

    specs, served = redux_specs(redux), {}
    for name in REDUX_COMPONENTS:
        record, version = records[name], staging / name / "1"
        version.mkdir(parents=True)
        _write_config(staging / name, component_config(specs[name], record, instance_kind, gpus=gpus).to_pbtxt(),
                      specs[name])  # fmt: skip
        if isinstance(record, EngineRecord):
            _link_or_copy(folder / record.file, version / "model.plan")
            served[name] = ComponentIO(record.inputs, record.outputs)
        else:
            _link_or_copy(folder / record.file, version / "model.onnx")
            ServedGraph(record).write(version)
            (version / "model.py").write_text(_template("onnxruntime_component.py"))
            as_float = tuple(replace(t, dtype=host_element(t.dtype)) for t in record.inputs)
            served[name] = ComponentIO(as_float, record.outputs)
    target = staging / PIPELINE / "1" / REDUX_FOLDER / redux.name
    record = {"redux": redux.name, "folder": f"{REDUX_FOLDER}/{redux.name}", "max_images": redux_max_images(records)}
    (staging / PIPELINE / "1" / REDUX_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    for relative in ("model_index.json", "image_encoder/config.json", "image_embedder/config.json"):
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(redux.root / relative, target / relative)
    shutil.copytree(redux.root / "feature_extractor", target / "feature_extractor")
    return served


def write_repository(
    source: ModelSource, engines: Path, out: Path, instance_kind: str = "KIND_CPU", pipeline_instances: int = 1,
    fp8: bool | None = None, request_loras: Sequence[LoraFile] = (), gpus: Sequence[int] = (),
    redux: ReduxSource | None = None, redux_engines: Path | None = None,
) -> Path:  # fmt: skip
    """A repository at `out` serving the graphs (python backend + ONNX Runtime) or plans (TensorRT) in `engines`;
    from graphs, `fp8` picks the transformer as the ONNX Runtime backend does (the FP8 one if there is one).
    `request_loras` are placed in the repository for clients to pick per request (`lora`, `lora_scale`).
    `gpus` (e.g. 0, 1): each GPU component gets an instance on each, and flux_pipeline one instance per GPU
    times `pipeline_instances`, so every GPU has requests to serve. `redux` (a FLUX.1 Redux prior, its graphs or
    engines in `redux_engines`): the repository also serves the prior, and flux_pipeline takes `redux_image`…"""
    gpus = tuple(sorted(set(gpus)))
    engines, out = Path(engines), Path(out)
    folder = open_folder(engines)
    kind = "tensorrt" if isinstance(folder, EngineFolder) else "onnxruntime"
    if gpus and kind != "tensorrt" and instance_kind != "KIND_GPU":
        raise FluxExportError("--gpus places GPU instances: add --instance-kind KIND_GPU for ONNX Runtime graphs")
    folder.check_made_from(source, "pass the same --model")
    entries: dict[str, GraphRecord | EngineRecord] = (
        dict(folder.components)
        if isinstance(folder, EngineFolder)  # a published encoder's graph serves its copy's posterior (mean and std)
        else {name: posterior_record(graph) for name, graph in folder.graphs(fp8).items()}
    )
    needed = list(pipeline_components(source))
    missing = [name for name in needed if name not in entries]
    if missing:
        raise FluxExportError(f"{engines} lacks {', '.join(missing)}: the pipeline needs {', '.join(needed)}")
    needed += [name for name in TRANSFORMER_PARTS if name in entries]  # the parts serve `cache: first-block`
    specs = component_specs(source)
    loras = _lora_names(source, request_loras, entries, kind)
    redux_records = _redux_records(source, redux, None if redux_engines is None else Path(redux_engines), kind)
    with atomic_folder(out) as staging:
        bls_components = {}
        for name in needed:
            record = entries[name]
            version = staging / name / "1"
            version.mkdir(parents=True)
            config = component_config(specs[name], record, instance_kind, gpus=gpus)
            _write_config(staging / name, config.to_pbtxt(), specs[name])
            if isinstance(record, EngineRecord):
                _link_or_copy(engines / record.file, version / "model.plan")
                bls_components[name] = ComponentIO(record.inputs, record.outputs)
            else:
                _link_or_copy(engines / record.file, version / "model.onnx")
                if record.external_data:
                    # beside the graph under the name the graph gives it (a published folder's sits in a subfolder);
                    # copied for a bf16 graph: the component upcasts it through onnx_ir, which refuses hard links
                    data, placed = engines / record.external_data, version / Path(record.external_data).name
                    if record.base_dtype == "bf16":
                        shutil.copy2(data, placed)
                    else:
                        _link_or_copy(data, placed)
                _served_graph(source, name, entries, bool(loras)).write(version)
                (version / "model.py").write_text(_template("onnxruntime_component.py"))
                # the python component takes float32 and casts for its graph itself
                as_float = tuple(replace(t, dtype=host_element(t.dtype)) for t in record.inputs)
                bls_components[name] = ComponentIO(as_float, record.outputs)
        pipeline = staging / PIPELINE / "1"
        pipeline.mkdir(parents=True)
        pipeline_inputs = source.family.part("triton").pipeline_inputs(source)
        if redux is not None and redux_engines is not None:
            bls_components |= _write_redux(staging, redux, Path(redux_engines), redux_records, instance_kind, gpus)
            pipeline_inputs = with_redux_inputs(pipeline_inputs)
        _write_config(
            staging / PIPELINE,
            pipeline_config(pipeline_inputs, instance_kind, pipeline_instances, gpus).to_pbtxt(),
        )
        (pipeline / "model.py").write_text(_template("flux_pipeline.py"))
        _copy_checkpoint(source, pipeline / "checkpoint")
        if loras:
            (staging / LORA_FOLDER).mkdir()
            for lora in request_loras:
                _link_or_copy(lora.path, staging / LORA_FOLDER / f"{lora.path.stem}.safetensors")
        tensorrt = folder.tensorrt if isinstance(folder, EngineFolder) else None
        settings = PipelineSettings(source.name, kind, _bounds(folder, source), bls_components, loras, gpus, tensorrt)
        settings.write(pipeline)
        (staging / "README.md").write_text(_readme(source, kind, needed, sorted(loras), redux))
    return out


def _readme(source: ModelSource, kind: str, components, loras: list[str], redux: ReduxSource | None = None) -> str:
    engine = (
        "TensorRT plans (`tensorrt_plan`)" if kind == "tensorrt" else "ONNX graphs run by ONNX Runtime (python backend)"
    )
    inputs = source.family.part("triton").inputs_text(source, loras)
    if redux is not None:
        inputs += f"""
With the FLUX.1 Redux prior {redux.name} (models {", ".join(REDUX_COMPONENTS)}), `prompt` is optional and
`redux_image` … `redux_image_10` (uint8 [H,W,3] each, any size) make a variation of those images (several are
blended), weighted by `redux_scale` and `redux_pooled_scale` (FP32 [1] or one per image), as `fluxexport run
--redux` makes it."""
    return f"""# Triton model repository for {source.name}

Written by `fluxexport triton`. Components ({", ".join(components)}) are {engine}; `flux_pipeline`
(python backend) {inputs}

Start a server on it (Triton 2.51+, python backend; the python environment needs `fluxexport`,
`onnxruntime` and numpy<2):

    fluxexport serve {{this folder}}              # a local server on 127.0.0.1, Ctrl-C to stop
    tritonserver --model-repository={{this folder}}

Every config.pbtxt uses `max_batch_size: 0` with an explicit -1 batch dim: the transformer's `img_ids` and
`txt_ids` have no batch axis.
"""


def lora_inputs_text(loras: list[str]) -> str:
    """The inputs that pick a request's LoRAs, as both families take them."""
    placed = ", ".join(loras) or "none placed"
    return f"`lora` (BYTES [n], names of the LoRAs in `{LORA_FOLDER}`: {placed}), `lora_scale` (FP32 [n] or [1])"


def lora_swap_text(components: str) -> str:
    """How a request's LoRAs reach `components` (the family's that take LoRAs)."""
    return (
        f"A request's LoRAs are swapped into the {components} (only the weights they touch); a component keeps "
        "the last set, so requests with the same LoRAs pay nothing, and a change costs one session re-creation."
    )
