"""Black Forest Labs' published ONNX folders (`black-forest-labs/FLUX.1-<variant>-onnx`), read as they are.

One table, `LAYOUT`, says for each folder of the published layout which of our components it holds, the tensor
names its graph has (NVIDIA's TensorRT diffusion demo's, which are ours), and which precision its folder name
promises. `open_published` reads a folder through it alone: detection is from the folder's structure (no manifest),
each graph's names, element types and precision are read from the graph itself (never its weights), and what we
cannot use is refused in one line naming the folder and the fix. The result is an `ExportFolder`, so `run`,
`validate`, `build` and `triton` take a published folder where they take one of ours. The VAE encoder is published
as the demo exports it, drawing its latent from the posterior inside the graph (`posterior_sampling`); what runs it
(ONNX Runtime's float32 copy, TensorRT's build) runs a copy that gives the mean and std instead.

Sources (read 2026-12-07): NVIDIA/TensorRT `demo/Diffusion` (11.1): `FluxPipeline.download_onnx_models` (folder
names), `FluxTransformerModel`/`VAEModel`/`VAEEncoderModel` `get_input_names`/`get_output_names`/`get_dynamic_axes`,
and how `infer` feeds them; black-forest-labs/flux `src/flux/trt` (`trt_config/*`, `engine/*`), the published
folders' own consumer. See the README's "Black Forest Labs' published ONNX folders" for what is confirmed and what
is assumed.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fluxexport.artifacts.files import MANIFEST, file_sha256
from fluxexport.artifacts.folders import FP8, NVFP4, ExportFolder
from fluxexport.artifacts.records import GraphRecord, ModelRecord, TensorRecord
from fluxexport.errors import FluxExportError, RequestError
from fluxexport.models.source import ModelSource

GRAPH_FILE = "model.onnx"  # every published folder's graph (the demo renames it model_optimized.onnx on download)
BASE = "components"  # the ExportFolder section of a base-precision graph


@dataclass(frozen=True)
class PublishedGraph:
    """One folder of the published layout: the component it holds, its graph's tensor names in order (those
    in `optional` only where the model has them: `guidance` for guidance-distilled models), the precision its
    name promises (None: whatever the graph holds, bf16 in what BFL ships) and the ExportFolder section it
    fills. `known` False: a folder we know exists but whose tensor names no source we read states."""

    folder: str
    component: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    precision: str | None = None
    section: str = BASE
    optional: tuple[str, ...] = ()
    known: bool = True


_TRANSFORMER_IN = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                   "guidance")  # fmt: skip


def _transformer(folder: str, precision: str, section: str) -> PublishedGraph:
    return PublishedGraph(f"transformer.opt/{folder}", "transformer", _TRANSFORMER_IN, ("latent",), precision, section,
                          optional=("guidance",))  # fmt: skip


# The published layout. What our runtime does with each is what it does with our own graphs of the same name:
# timestep is sigma in [0, 1] (the demo feeds t/1000), `guidance` a [B] fp32 scale only for guidance-distilled
# models (BFL's engine drops it for schnell), img_ids/txt_ids carry no batch axis, the VAE's scaling and shift
# stay outside both VAE graphs (z/scale + shift before the decoder, scale·(z − shift) after the encoder).
LAYOUT: tuple[PublishedGraph, ...] = (
    PublishedGraph("clip.opt", "clip", ("input_ids",), ("text_embeddings", "pooled_embeddings")),
    PublishedGraph("t5.opt", "t5", ("input_ids",), ("text_embeddings",)),
    PublishedGraph("t5-fp8.opt", "t5", ("input_ids",), ("text_embeddings",), "fp8", FP8, known=False),
    _transformer("bf16", "bf16", BASE),
    _transformer("fp8", "fp8", FP8),
    _transformer("fp4", NVFP4, NVFP4),
    _transformer("fp4_svd32", NVFP4, NVFP4),  # Kontext's FP4 (the demo's folder name)
    PublishedGraph("vae.opt", "vae_decoder", ("latent",), ("images",)),
    PublishedGraph("vae_encoder.opt", "vae_encoder", ("images",), ("latent",)),
)
PUBLISHED = "published"  # the `kind` of a folder read through LAYOUT


def present(folder: Path) -> list[PublishedGraph]:
    """The layout's folders that `folder` holds a graph in."""
    return [entry for entry in LAYOUT if (Path(folder) / entry.folder / GRAPH_FILE).is_file()]


def is_published(folder: Path) -> bool:
    """Whether `folder` is laid out as BFL publishes its ONNX (a `<component>.opt/` folder, no manifest of ours)."""
    folder = Path(folder)
    return (
        not (folder / MANIFEST).is_file()
        and folder.is_dir()
        and any((folder / entry.folder.split("/")[0]).is_dir() for entry in LAYOUT)
    )


_ELEMENT = {1: "float", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool", 17: "float8e4m3fn",
            23: "float4e2m1"}  # onnx.TensorProto's numbers  # fmt: skip
_FLOATS = {"float": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# TensorRT's own quantization ops, which ModelOpt's ONNX export writes (domain `trt`): TensorRT parses them,
# ONNX Runtime has no kernel for them
TENSORRT_FP8_OPS = {"TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"}
TENSORRT_FP4_OPS = {"TRT_FP4DynamicQuantize", "TRT_FP4QuantizeLinear", "TRT_FP4DequantizeLinear"}


def _tensor(value: Any) -> TensorRecord:
    kind = value.type.tensor_type
    dims = tuple(d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in kind.shape.dim)
    return TensorRecord(value.name, _ELEMENT.get(kind.elem_type, str(kind.elem_type)), dims)


def _precision(model: Any) -> tuple[str, str]:
    """(precision, base dtype) the graph holds, from its initializers' element types and sizes (never their
    bytes): FP4 or FP8 weights, or TensorRT's own Q/DQ ops, make an nvfp4 / fp8 graph on the float type most of
    the weights have; otherwise that type."""
    elements: Counter[str] = Counter()
    for tensor in model.graph.initializer:
        elements[_ELEMENT.get(tensor.data_type, "")] += math.prod(tensor.dims)
    floats = Counter({name: n for name, n in elements.items() if name in _FLOATS})
    base = _FLOATS[floats.most_common(1)[0][0]] if floats else "fp32"
    ops = {node.op_type for node in model.graph.node}
    quantized = ops & {"QuantizeLinear", "DequantizeLinear"}
    if elements["float4e2m1"] or ops & TENSORRT_FP4_OPS:
        return NVFP4, base
    if elements["float8e4m3fn"] or ops & TENSORRT_FP8_OPS or (quantized and _has_fp8_zero_point(model)):
        return "fp8", base
    return base, base


def _has_fp8_zero_point(model: Any) -> bool:
    fp8 = {t.name for t in model.graph.initializer if t.data_type == 17}
    return any(node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in fp8
               for node in model.graph.node)  # fmt: skip


def _external_data(model: Any, graph_dir: Path) -> str | None:
    """The one file the graph's initializers keep their bytes in, beside the graph (None: inline)."""
    locations = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    if len(locations) > 1:
        raise FluxExportError(
            f"{graph_dir / GRAPH_FILE} keeps its weights in {len(locations)} files ({', '.join(sorted(locations))}); "
            "fluxexport reads graphs with one external-data file: re-save it with onnx.save_model(..., "
            "all_tensors_to_one_file=True)"
        )
    return next(iter(locations), None)


def names_fit(entry: PublishedGraph, inputs: list[str], outputs: list[str]) -> bool:
    """Whether a graph's input and output names are `entry`'s: its inputs in the table's order, the optional
    ones (guidance) present or not, and exactly its outputs."""
    required = set(entry.inputs) - set(entry.optional)
    in_order = [name for name in entry.inputs if name in inputs] == inputs
    return in_order and required <= set(inputs) and outputs == list(entry.outputs)


def read_graph(root: Path, entry: PublishedGraph) -> GraphRecord:
    """The record of `entry`'s graph in `root`, checked against the table: its names, its precision."""
    import onnx

    where = Path(root) / entry.folder
    path = where / GRAPH_FILE
    if not entry.known:
        raise FluxExportError(
            f"{path}: no source fluxexport read gives the tensor names of {entry.folder} graphs, so it does not "
            f"read them: remove {where} (or move it aside) to use the folder's other graphs"
        )
    model = onnx.load(str(path), load_external_data=False)
    inputs, outputs = tuple(map(_tensor, model.graph.input)), tuple(map(_tensor, model.graph.output))
    names = [t.name for t in inputs]
    if not names_fit(entry, names, [t.name for t in outputs]):
        found = f"({', '.join(names)}) → ({', '.join(t.name for t in outputs)})"
        raise FluxExportError(
            f"{path} has tensors {found}, not the published layout's ({', '.join(entry.inputs)}) → "
            f"({', '.join(entry.outputs)}): a variant whose tensor names fluxexport does not know; export the model "
            "with `fluxexport export` instead"
        )
    extra: dict[str, Any] = {}
    if entry.component == "vae_encoder" and posterior_sampling(_proto_nodes(model)) is not None:
        extra[SAMPLES] = True  # ONNX Runtime runs a copy that gives the posterior instead (`posterior_record`)
    precision, base = _precision(model)
    if entry.precision is not None and precision != entry.precision:
        raise FluxExportError(
            f"{path} holds a {precision} graph where the folder name {entry.folder} promises {entry.precision}: put "
            "it in the folder of its precision"
        )
    external = _external_data(model, where)
    if external and not (where / external).is_file():
        raise FluxExportError(f"{path} keeps its weights in {external}, which is missing beside it: download it too")
    files = [path] + ([where / external] if external else [])
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return GraphRecord(
        file=f"{entry.folder}/{GRAPH_FILE}", dtype=precision, base_dtype=base, opset=opset, inputs=inputs,
        outputs=outputs, external_data=f"{entry.folder}/{external}" if external else None,
        sha256={file.name if file == path else external: file_sha256(file) for file in files},
        extra={"published": entry.folder, "tensorrt_ops": sorted(_tensorrt_ops(model)), **extra},
    )  # fmt: skip


# NVIDIA's demo exports the VAE encoder as `vae.encode(x).latent_dist.sample()` through TorchScript (demo/Diffusion
# `TorchVAEEncoder.forward`): the graph draws its own noise, `latent = mean + std · Cast(RandomNormalLike(
# ConstantOfShape(Shape(mean))))`, and has no `latent_std` output. `posterior_sampling` finds that tail so that the
# float32 copy ONNX Runtime runs (`onnxruntime/upcast.py`) cuts it and gives the posterior's mean and std instead:
# what diffusers' Kontext (the mode) and Fill/Canny/Depth (mean + std · the request's seeded noise) take.
RANDOM_OPS = frozenset({"RandomNormalLike", "RandomNormal"})
_PASS_THROUGH = frozenset({"Cast", "Identity"})
LATENT, LATENT_STD = "latent", "latent_std"


@dataclass(frozen=True)
class PosteriorSampling:
    """Where a VAE encoder graph samples its posterior: the names of the values holding the mean and the std."""

    mean: str
    std: str


def posterior_sampling(nodes: list[tuple[str, list[str], list[str]]], output: str = LATENT) -> PosteriorSampling | None:
    """The sampling tail of a graph given as (op_type, inputs, outputs) per node: `output` made by Add(mean,
    Mul(std, noise)) with the noise drawn by RandomNormal(Like), through Casts; None when `output` is made otherwise."""
    producer = {name: (op, inputs) for op, inputs, outs in nodes for name in outs}

    def is_noise(name: str) -> bool:
        while name in producer and producer[name][0] in _PASS_THROUGH:
            name = producer[name][1][0]
        return name in producer and producer[name][0] in RANDOM_OPS

    op, inputs = producer.get(output, ("", []))
    if op != "Add" or len(inputs) != 2:
        return None
    for mean, scaled in (inputs, inputs[::-1]):
        mul, factors = producer.get(scaled, ("", []))
        if mul != "Mul" or len(factors) != 2:
            continue
        for std, noise in (factors, factors[::-1]):
            if is_noise(noise):
                return PosteriorSampling(mean, std)
    return None


def _proto_nodes(model: Any) -> list[tuple[str, list[str], list[str]]]:
    return [(node.op_type, list(node.input), list(node.output)) for node in model.graph.node]


SAMPLES = "samples_posterior"  # a GraphRecord's extra: the graph draws its `latent` from the posterior itself


def posterior_record(graph: GraphRecord) -> GraphRecord:
    """What the float32 copy of a graph gives: for an encoder that samples its posterior inside, the mean as
    `latent` and the std as `latent_std` (`onnxruntime/upcast.py` cuts the draw); any other graph as it is."""
    if not graph.extra.get(SAMPLES):
        return graph
    latent = next(tensor for tensor in graph.outputs if tensor.name == LATENT)
    return replace(graph, outputs=(latent, TensorRecord(LATENT_STD, latent.dtype, latent.dims)))


def cut_posterior_sampling(model: Any) -> bool:
    """Where the graph's `latent` is a draw from the VAE posterior (a published VAE encoder: NVIDIA's demo exports
    `latent_dist.sample()`), give the mean as `latent` and the std as `latent_std` instead and drop the noise, in
    place, as our own encoder graphs are; whether it did. The runtime then takes the mode (Kontext) or samples with
    the request's generator (Fill, Canny, Depth), as diffusers does."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    nodes = [(node.op_type, [v.name if v is not None else "" for v in node.inputs], [v.name for v in node.outputs])
             for node in model.graph]  # fmt: skip
    sampling = posterior_sampling(nodes)
    if sampling is None:
        return False
    values = {value.name: value for node in model.graph for value in node.outputs}
    mean, std = values[sampling.mean], values[sampling.std]
    sampled = next(value for value in model.graph.outputs if value.name == LATENT)
    sampled.name = f"{LATENT}_sampled"
    for value, name in ((mean, LATENT), (std, LATENT_STD)):
        value.name, value.dtype, value.shape = name, value.dtype or sampled.dtype, value.shape or sampled.shape
    model.graph.outputs.clear()
    model.graph.outputs.extend([mean, std])
    RemoveUnusedNodesPass()(model)
    return True


def write_posterior_graph(path: Path, folder: Path) -> Path:
    """A copy of the sampling encoder graph at `path` that gives the posterior (`cut_posterior_sampling`), its
    weights as they are (bf16), written into `folder` (TensorRT builds the encoder's engine from it: an engine of
    the graph as published would draw its own noise); an existing copy is reused."""
    import onnx_ir as ir

    from fluxexport.atomic import staged_files

    target = Path(folder) / f"{path.parent.name}.{path.name}"
    if target.is_file():
        return target
    model = ir.load(path)
    cut_posterior_sampling(model)
    with staged_files(Path(folder), "posterior", last=target.name) as staging:
        ir.save(model, staging / target.name, external_data=f"{target.name}_data", size_threshold_bytes=1024)
    return target


def _tensorrt_ops(model: Any) -> set[str]:
    """The graph's ops in TensorRT's own domain (`trt::`), which only TensorRT runs."""
    return {node.op_type for node in model.graph.node if node.domain == "trt"}


def refuse_tensorrt_only(graph: GraphRecord, component: str, folder: Path) -> None:
    """Refuse in one line a published graph that holds TensorRT's own ops where ONNX Runtime would run it."""
    ops = graph.extra.get("tensorrt_ops") or []
    if ops:
        raise FluxExportError(
            f"{component} in {folder} ({graph.file}) holds TensorRT's own ops ({', '.join(ops)}), which ONNX Runtime "
            "cannot run: build engines from it (fluxexport build) and run with --backend tensorrt, or run the bf16 "
            "graph with --no-fp8"
        )


def published_root(path: Path) -> Path | None:
    """The published folder a graph file `<root>/<folder>/model.onnx` lies in, if any."""
    path = Path(path)
    for entry in LAYOUT:
        depth = entry.folder.count("/") + 1
        if len(path.parents) > depth and path == path.parents[depth] / entry.folder / GRAPH_FILE:
            return path.parents[depth] if is_published(path.parents[depth]) else None
    return None


def published_graph(path: Path) -> GraphRecord | None:
    """The record of the published graph at `path` (an engine built from it asks), None if it is not one."""
    root = published_root(path)
    if root is None:
        return None
    relative = Path(path).relative_to(root).as_posix()
    return open_published(root).every_graph().get(relative)


@dataclass
class PublishedFolder(ExportFolder):
    """A published ONNX folder read through `LAYOUT`. It names no checkpoint: `check_made_from(source)` checks
    the graphs' widths against the `--model` given (whose tokenizers and configs the runtime reads) and then
    records that checkpoint as the one the graphs are of."""

    layout: dict[str, str] = field(default_factory=dict)  # component (section-qualified) → published folder

    kind = PUBLISHED

    def write(self) -> Path:
        raise FluxExportError(
            f"{self.path} is a published ONNX folder, read as it is: write exports, FP8 graphs and engines to another "
            "folder (--out)"
        )

    def check_text_length(self, length: int) -> None:
        """Refuse a request for another T5 length than the one the graphs fix (a request's fault, in one line)."""
        fixed = self.bounds.get("max_text_length")
        if fixed is not None and length != fixed:
            raise RequestError(
                "max_sequence_length", f"the graphs in {self.path} take exactly {fixed} T5 tokens, not {length}",
                f"set {{name}} to {fixed}",
            )  # fmt: skip

    def check_made_from(self, source: ModelSource, fix: str = "pass the --model the folder was published for"):
        problems = _width_problems(self, source)
        if problems:
            raise FluxExportError(f"{self.path} does not hold {source.name}'s graphs ({'; '.join(problems)}): {fix}")
        if _samples_without_std(self, source):
            raise FluxExportError(
                f"{self.path}'s VAE encoder (vae_encoder.opt) gives no latent_std, which {source.name}'s pipeline "
                f"samples its condition latents with: export the model with `fluxexport export --model {source.name} "
                "--dtype bf16` and run that folder"
            )
        if source.loras:
            raise FluxExportError(
                f"{self.path} is a published ONNX folder, which records no weight origins to swap LoRAs into: "
                f"export the model with its LoRAs (fluxexport export --model {source.name} --lora …) instead"
            )
        self.model = ModelRecord.of(source)


def _width_problems(folder: PublishedFolder, source: ModelSource) -> list[str]:
    """What in the graphs disagrees with `source`'s configs: the transformer's input and text widths, whether it
    takes guidance, and a VAE encoder without the posterior's std where the transformer takes sampled
    conditions (Fill, Canny, Depth: its input is wider than the packed latent)."""
    problems = []
    graphs = {**folder.components, **folder.fp8, **folder.nvfp4}
    transformer = graphs.get("transformer")
    config = source.transformer
    if transformer is not None:
        dims = {t.name: t.dims for t in transformer.inputs}
        widths = (("hidden_states", "in_channels"), ("encoder_hidden_states", "joint_attention_dim"),
                  ("pooled_projections", "pooled_projection_dim"))  # fmt: skip
        for name, key in widths:
            width = dims.get(name, (None,))[-1]
            if isinstance(width, int) and width != int(config[key]):
                problems.append(f"transformer {name} is {width} wide, {source.name}'s {key} is {config[key]}")
        if ("guidance" in dims) != bool(source.guidance_embeds):
            has = "takes" if "guidance" in dims else "takes no"
            embeds = "has a guidance embedding" if source.guidance_embeds else "has none"
            problems.append(f"the transformer {has} guidance, {source.name} {embeds}")
    return problems


def _samples_without_std(folder: PublishedFolder, source: ModelSource) -> bool:
    """Whether `source`'s transformer takes sampled condition latents (Fill, Canny, Depth: its input is wider than
    the packed latent) and the folder's VAE encoder lacks the posterior's std they are sampled with."""
    encoder = folder.components.get("vae_encoder")
    conditioned = int(source.transformer["in_channels"]) > 4 * int(source.vae["latent_channels"])
    return encoder is not None and conditioned and LATENT_STD not in posterior_record(encoder).output_names()


def open_published(folder: Path) -> PublishedFolder:
    """`folder` read through `LAYOUT`, refused in one line when it holds no graph of the layout."""
    folder = Path(folder)
    entries = present(folder)
    if not entries:
        expected = ", ".join(sorted({entry.folder + "/" + GRAPH_FILE for entry in LAYOUT}))
        raise FluxExportError(
            f"{folder} has neither a {MANIFEST} nor a graph of the published layout ({expected}): download the "
            "component folders too, or export graphs into it with `fluxexport export`"
        )
    opened = PublishedFolder(folder, ModelRecord(f"published ONNX folder {folder.name}", ""), "bf16", {})
    sections = {BASE: opened.components, FP8: opened.fp8, NVFP4: opened.nvfp4}
    for entry in entries:
        record = read_graph(folder, entry)
        if entry.component in sections[entry.section]:
            other = opened.layout[f"{entry.section}:{entry.component}"]
            raise FluxExportError(
                f"{folder} holds {entry.component} graphs of one precision in both {other} and {entry.folder}: keep one"
            )
        sections[entry.section][entry.component] = record
        opened.layout[f"{entry.section}:{entry.component}"] = entry.folder
    if not opened.components and opened.nvfp4 and not opened.fp8:
        opened.dtype = NVFP4
    opened.bounds = fixed_text_bounds(opened)
    return opened


_TEXT_AXIS = {"input_ids": 1, "encoder_hidden_states": 1, "txt_ids": 0}  # the token axis of T5's and the transformer's


def fixed_text_bounds(folder: PublishedFolder) -> dict[str, int]:
    """The bounds a published folder pins: its text length where the graphs fix it (the demo exports T5 and the
    transformer with a static token axis, 512, or 256 for schnell), so that TensorRT profiles ask for no other
    length; the rest are the model's export defaults."""
    lengths = {
        tensor.dims[_TEXT_AXIS[tensor.name]]
        for graph in folder.every_graph().values()
        if graph.file.startswith(("t5", "transformer"))
        for tensor in graph.inputs
        if tensor.name in _TEXT_AXIS and isinstance(tensor.dims[_TEXT_AXIS[tensor.name]], int)
    }
    if len(lengths) > 1:
        raise FluxExportError(
            f"{folder.path}'s T5 and transformer graphs fix different text lengths ({', '.join(map(str, sorted(lengths)))}): "
            "download them from one repository"
        )
    return {f"{which}_text_length": length for length in lengths for which in ("min", "opt", "max")}


# Our component → the published folder its base graph goes to (`write_published`), from LAYOUT
_BASE_FOLDER = {entry.component: entry for entry in LAYOUT if entry.section == BASE and entry.known}


def sample_in_graph(model: Any) -> None:
    """Make our VAE encoder graph (outputs `latent`, the mean, and `latent_std`) sample its posterior as the demo's
    published one does, in place: `latent` becomes mean + std · Cast(RandomNormalLike(ConstantOfShape(Shape(mean))))
    (float32 noise cast to the mean's type, as TorchScript exports diffusers' `latent_dist.sample()`), and
    `latent_std` is no longer an output."""
    import onnx
    from onnx import helper

    outputs = {value.name: value for value in model.graph.output}
    mean_type = outputs[LATENT].type.tensor_type.elem_type
    renamed = {LATENT: "posterior_mean", LATENT_STD: "posterior_std"}
    for node in model.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    for name, value in outputs.items():  # the renamed values keep their types (the float32 copy rounds by them)
        if name in renamed:
            typed = model.graph.value_info.add()
            typed.CopyFrom(value)
            typed.name = renamed[name]
    mean, std = renamed[LATENT], renamed[LATENT_STD]
    model.graph.node.extend([
        helper.make_node("Shape", [mean], ["posterior_shape"]),
        helper.make_node("ConstantOfShape", ["posterior_shape"], ["posterior_zeros"],
                         value=helper.make_tensor("value", onnx.TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("RandomNormalLike", ["posterior_zeros"], ["posterior_noise"], dtype=onnx.TensorProto.FLOAT),
        helper.make_node("Cast", ["posterior_noise"], ["posterior_noise_cast"], to=mean_type),
        helper.make_node("Mul", [std, "posterior_noise_cast"], ["posterior_scaled_noise"]),
        helper.make_node("Add", [mean, "posterior_scaled_noise"], [LATENT]),
    ])  # fmt: skip
    del model.graph.output[:]
    model.graph.output.append(outputs[LATENT])


def write_published(export: ExportFolder, out: Path, external_data: tuple[str, ...] = ("transformer",)) -> Path:
    """Lay `export`'s base graphs out at `out` as BFL publishes them, through `LAYOUT` (the tests' fixture: what a
    published folder is, made by our code from our own graphs): each graph as `<folder>/model.onnx`, outputs the
    published graph lacks removed, the VAE encoder sampling its posterior inside (`sample_in_graph`: its `latent`
    is a draw, its `latent_std` gone, as the demo exports it), the `external_data` components' weights in one
    file beside the graph. Only a bf16 export fits the precision folders BFL publishes."""
    import onnx

    from fluxexport.atomic import atomic_folder

    if export.dtype != "bf16":
        raise FluxExportError(
            f"{export.path} holds {export.dtype} graphs; BFL publishes bf16 ones: export with --dtype bf16"
        )
    with atomic_folder(Path(out)) as staging:
        for name, graph in export.components.items():
            entry = _BASE_FOLDER.get(name)
            if entry is None:
                continue
            model = onnx.load(str(export.path / graph.file))
            if name == "vae_encoder":
                sample_in_graph(model)
            kept = [value for value in model.graph.output if value.name in entry.outputs]
            del model.graph.output[:]
            model.graph.output.extend(kept)
            target = staging / entry.folder
            target.mkdir(parents=True)
            outside = name in external_data
            onnx.save_model(model, str(target / GRAPH_FILE), save_as_external_data=outside,
                            all_tensors_to_one_file=True, location=f"{GRAPH_FILE}_data", size_threshold=0)  # fmt: skip
    return Path(out)
