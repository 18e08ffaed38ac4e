"""Black Forest Labs' published ONNX folders (`FLUX.1-<variant>-onnx`), read through one layout table
(`fluxexport/artifacts/published.py`). The fixture is tiny-dev's bf16 session export laid out as BFL publishes it
by our own code (`write_published`: `<component>.opt/model.onnx`, the transformer in `transformer.opt/bf16/` with
its weights in a file beside it); `run`, `validate`, `build` and `triton` take it as they take our own folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fluxexport.errors import FluxExportError


@pytest.fixture(scope="module")
def published(bf16_export, tmp_path_factory) -> Path:
    """tiny-dev's bf16 graphs in BFL's published layout (a copy of the session's bf16 export, renamed into place)."""
    from helpers import once_per_session

    from fluxexport.artifacts.folders import open_export
    from fluxexport.artifacts.published import write_published

    return once_per_session(tmp_path_factory, "published-tiny-dev",
                            lambda folder: write_published(open_export(bf16_export), folder))  # fmt: skip


def published_variant(variant: str, published: Path, sources, tmp_path_factory) -> Path:
    """tiny `variant` in the published layout (as FLUX.1-Canny-dev-onnx, FLUX.1-Kontext-dev-onnx): its bf16
    transformer, the one graph the variant adds, laid out by write_published beside tiny-dev's published text
    encoders and VAE graphs, which are the same weights (the tiny variants draw each component from one seed: their
    safetensors equal tiny-dev's), made once per session."""
    from helpers import once_per_session

    from fluxexport.artifacts.published import write_published
    from fluxexport.export.onnx_export import export_model
    from fluxexport.models.source import resolve_model

    def make(folder: Path) -> None:
        source = resolve_model(variant)
        for name in ("vae", "text_encoder", "text_encoder_2"):  # what makes tiny-dev's graphs the variant's own
            ours = sorted((source.root / name).glob("*.safetensors"))
            assert [f.read_bytes() for f in ours] == [(sources["tiny-dev"].root / name / f.name).read_bytes()
                                                      for f in ours]  # fmt: skip
        graphs = folder.with_name(f"{folder.name}-graphs")
        write_published(export_model(source, graphs, ["transformer"], dtype="bf16"), folder)
        shutil.rmtree(graphs)
        for part in ("clip.opt", "t5.opt", "vae.opt", "vae_encoder.opt"):
            shutil.copytree(published / part, folder / part)

    return once_per_session(tmp_path_factory, f"published-{variant}", make)


def copy_of(published: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "FLUX.1-dev-onnx"
    shutil.copytree(published, folder)
    return folder


def test_published_folder_reads_through_the_layout(published, sources):
    """Each graph is found where the table says, with its own names, precision and external data; the folder
    is bound to the --model whose widths it has."""
    from fluxexport.artifacts.folders import open_export
    from fluxexport.artifacts.published import PUBLISHED, posterior_record

    folder = open_export(published, sources["tiny-dev"])
    assert folder.kind == PUBLISHED and folder.model.name == "tiny-dev"
    files = {name: (graph.file, graph.dtype, graph.external_data) for name, graph in folder.components.items()}
    assert files == {
        "clip": ("clip.opt/model.onnx", "bf16", None),
        "t5": ("t5.opt/model.onnx", "bf16", None),
        "transformer": ("transformer.opt/bf16/model.onnx", "bf16", "transformer.opt/bf16/model.onnx_data"),
        "vae_decoder": ("vae.opt/model.onnx", "bf16", None),
        "vae_encoder": ("vae_encoder.opt/model.onnx", "bf16", None),
    }
    transformer = folder.components["transformer"]
    assert transformer.input_names() == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                         "img_ids", "txt_ids", "guidance"]  # fmt: skip
    assert [t.dtype for t in transformer.inputs] == ["bfloat16"] * 4 + ["float"] * 3
    encoder = folder.components["vae_encoder"]  # it samples inside; the copy ONNX Runtime runs gives the posterior
    assert encoder.output_names() == ["latent"] and posterior_record(encoder).output_names() == ["latent", "latent_std"]


def test_the_published_encoder_samples_its_posterior_inside(published):
    """As NVIDIA's demo exports it (`latent_dist.sample()` through TorchScript): `latent` is mean + std · noise the
    graph draws itself (RandomNormalLike), and there is no `latent_std`."""
    import onnx

    from fluxexport.artifacts.published import _proto_nodes, posterior_sampling

    model = onnx.load(str(published / "vae_encoder.opt" / "model.onnx"), load_external_data=False)
    assert [value.name for value in model.graph.output] == ["latent"]
    tail = [(node.op_type, list(node.input)) for node in model.graph.node[-4:]]
    assert tail == [("RandomNormalLike", ["posterior_zeros"]), ("Cast", ["posterior_noise"]),
                    ("Mul", ["posterior_std", "posterior_noise_cast"]),
                    ("Add", ["posterior_mean", "posterior_scaled_noise"])]  # fmt: skip
    sampling = posterior_sampling(_proto_nodes(model))
    assert sampling is not None and (sampling.mean, sampling.std) == ("posterior_mean", "posterior_std")


def test_the_published_encoder_runs_as_our_posterior(published, bf16_export, sources, reference_image):
    """ONNX Runtime runs the published encoder's copy with the draw cut out: its mean and std equal our own
    export's bit for bit, so Kontext (the mode) and Fill/Canny/Depth (mean + std · the request's seeded noise)
    get diffusers' latents; the same image twice gives the same latent."""
    import torch

    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    source = sources["tiny-dev"]
    pixels = torch.from_numpy(np.asarray(reference_image.resize((96, 64)), dtype=np.float32)).permute(2, 0, 1)
    images = (pixels / 127.5 - 1).unsqueeze(0).repeat(2, 1, 1, 1)
    theirs = OnnxRuntimeBackend(source, published).component("vae_encoder")({"images": images})
    ours = OnnxRuntimeBackend(source, bf16_export, upcast_bf16=True).component("vae_encoder")({"images": images})
    assert sorted(theirs) == ["latent", "latent_std"] and theirs["latent"].shape == (2, 16, 8, 12)
    for name in ("latent", "latent_std"):
        assert torch.equal(theirs[name], ours[name]), name
    assert torch.equal(theirs["latent"][0], theirs["latent"][1])


def test_run_on_a_published_folder_equals_our_own_export(published, bf16_export, sources):
    """The same weights under the published names and folders give our export's images bit for bit (both run
    as ONNX Runtime runs bf16 graphs on CPU: float32 copies of their bf16-rounded weights)."""
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.runtime.pipeline import GenerationRequest, generate

    source = sources["tiny-dev"]
    request = GenerationRequest(prompt="a red fox", height=128, width=192, num_inference_steps=2, seed=3)
    theirs = generate(OnnxRuntimeBackend(source, published), source, request).images
    ours = generate(OnnxRuntimeBackend(source, bf16_export, upcast_bf16=True), source, request).images
    assert theirs.shape == (1, 128, 192, 3) and theirs.std() > 0
    assert np.array_equal(theirs, ours)


def test_validate_a_published_folder_against_pytorch(published, sources):
    """`validate` compares the published graphs with PyTorch bf16 (the VAE encoder on its one output) and end to
    end, within the bf16 bounds."""
    from fluxexport.validate.graphs import validate_folder

    report, dtype = validate_folder(sources["tiny-dev"], published, ["transformer", "vae_encoder"], steps=1)
    assert dtype == "bf16" and report.passed, report
    assert {row.output for row in report.components if row.component == "vae_encoder"} == {"latent", "latent_std"}
    assert report.images and all(image.psnr > 40 for image in report.images)


def test_build_engines_from_a_published_folder(published, sources, tmp_path):
    """`build` (TensorRT's stand-in) makes bf16 engines from the published graphs as they are: nothing is
    exported into the folder, and each engine records the published graph it was built from."""
    import onnx
    from helpers import build_folder, manifest_json

    from fluxexport.artifacts.files import MANIFEST
    from fluxexport.artifacts.folders import open_engines
    from fluxexport.build import export_missing_graphs

    source = sources["tiny-dev"]
    assert export_missing_graphs(source, published, "bf16", ["transformer", "t5"]).kind == "published"
    engines = build_folder(source, published, tmp_path / "trt", precision="bf16",
                           components=["transformer", "t5", "vae_encoder"])  # fmt: skip
    built = manifest_json(engines)["components"]
    # the encoder's engine is parsed from a copy without the draw: it gives the posterior, not TensorRT's noise
    assert [t["name"] for t in built["vae_encoder"]["outputs"]] == ["latent", "latent_std"]
    assert built["vae_encoder"]["onnx"] == str((published / "vae_encoder.opt/model.onnx").resolve())
    copy = onnx.load(str(engines / "posterior_graphs" / "vae_encoder.opt.model.onnx"), load_external_data=False)
    assert [v.name for v in copy.graph.output] == ["latent", "latent_std"]
    assert not {"RandomNormalLike", "Add"} & {node.op_type for node in copy.graph.node[-3:]}
    assert built["transformer"]["onnx"] == str((published / "transformer.opt/bf16/model.onnx").resolve())
    assert built["transformer"]["precision"] == "bf16" and built["t5"]["file"].startswith("t5_bf16.")
    assert not (published / MANIFEST).exists()
    # what validate --engines and refit read: the record of the published graph each engine was built from
    assert open_engines(engines, source).built_from("transformer").file == "transformer.opt/bf16/model.onnx"


def test_triton_repository_from_a_published_folder(published, sources, tmp_path):
    """`triton` serves the published graphs: each component's graph, the transformer's weights beside it under
    the name its graph gives them."""
    import onnx

    from fluxexport.artifacts.repository import read_pipeline_settings
    from fluxexport.onnxruntime.backend import create_session
    from fluxexport.specs import ExportBounds
    from fluxexport.triton.repository import write_repository

    out = write_repository(sources["tiny-dev"], published, tmp_path / "repo")
    version = out / "transformer" / "1"
    assert sorted(path.name for path in version.glob("model.onnx*")) == ["model.onnx", "model.onnx_data"]
    graph = onnx.load(str(version / "model.onnx"), load_external_data=False)
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx_data"}  # found where the graph says: the component's session opens it
    session = create_session(version / "model.onnx", upcast=True)  # as the Triton component opens a bf16 graph
    assert [i.name for i in session.get_inputs()][:1] == ["hidden_states"]
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == [
        "clip", "flux_pipeline", "t5", "transformer", "vae_decoder"]  # fmt: skip
    # the folder records no bounds: the model's (tiny-dev's 64–1024 px sides, not a real FLUX's 256–1360)
    served = read_pipeline_settings(out).bounds
    assert served == vars(ExportBounds.for_model(sources["tiny-dev"])) and served["min_resolution"] == 64


def _rename_input(graph: Path, old: str, new: str) -> None:
    import onnx

    model = onnx.load(str(graph))
    for value in model.graph.input:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
    onnx.save_model(model, str(graph), save_as_external_data=True, location="model.onnx_data", size_threshold=0)


def _bf16_in_fp4(folder: Path) -> None:
    shutil.copytree(folder / "transformer.opt" / "bf16", folder / "transformer.opt" / "fp4")


def _fp8_t5(folder: Path) -> None:
    shutil.copytree(folder / "t5.opt", folder / "t5-fp8.opt")


@pytest.mark.parametrize(
    "spoil, expected",
    [
        (lambda f: _rename_input(f / "transformer.opt/bf16/model.onnx", "timestep", "t"),
         "transformer.opt/bf16/model.onnx has tensors (hidden_states, encoder_hidden_states, pooled_projections, t, "
         "img_ids, txt_ids, guidance) → (latent), not the published layout's"),
        (_fp8_t5, "no source fluxexport read gives the tensor names of t5-fp8.opt graphs"),
        (_bf16_in_fp4, "holds a bf16 graph where the folder name transformer.opt/fp4 promises nvfp4"),
        (lambda f: (f / "transformer.opt/bf16/model.onnx_data").unlink(),
         "keeps its weights in model.onnx_data, which is missing beside it: download it too"),
    ],
    ids=["unknown-names", "t5-fp8", "precision-folder", "missing-weights"],
)  # fmt: skip
def test_what_cannot_be_used_is_refused_in_one_line(published, sources, tmp_path, spoil, expected):
    from fluxexport.artifacts.folders import open_export

    folder = copy_of(published, tmp_path)
    spoil(folder)
    with pytest.raises(FluxExportError) as refused:
        open_export(folder, sources["tiny-dev"])
    assert expected in str(refused.value) and "\n" not in str(refused.value)
    assert str(folder) in str(refused.value)


def test_a_folder_of_another_model_or_without_graphs_is_refused(published, sources, tmp_path):
    from fluxexport.artifacts.folders import open_export

    with pytest.raises(FluxExportError, match=r"does not hold tiny-schnell's graphs \(the transformer takes guidance, "
                                              r"tiny-schnell has none\): pass the --model the folder was published"):  # fmt: skip
        open_export(published, sources["tiny-schnell"])
    empty = tmp_path / "FLUX.1-schnell-onnx"
    (empty / "transformer.opt" / "bf16").mkdir(parents=True)
    with pytest.raises(FluxExportError, match="has neither a manifest.json nor a graph of the published layout"):
        open_export(empty)


def test_cli_run_on_a_published_folder_of_another_model_exits_with_one_line(published):
    from click.testing import CliRunner

    from fluxexport.cli import main

    result = CliRunner().invoke(main, ["run", "--model", "tiny-schnell", "--backend", "onnxruntime", "--engines",
                                       str(published), "--prompt", "x", "--steps", "1"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "does not hold tiny-schnell's graphs" in result.output


def _with_tensorrt_fp8_op(folder: Path, op: str = "TRT_FP8QuantizeLinear", precision: str = "fp8") -> None:
    """The bf16 transformer with one of TensorRT's own FP8 (FP4) ops, as ModelOpt exports them, in
    `transformer.opt/<precision>`."""
    import onnx

    graph = folder / "transformer.opt" / "bf16" / "model.onnx"
    model = onnx.load(str(graph))
    model.graph.initializer.append(onnx.helper.make_tensor("fp8_scale", onnx.TensorProto.FLOAT, [], [1.0]))
    model.graph.node.append(onnx.helper.make_node(op, ["hidden_states", "fp8_scale"], ["hidden_states_q"],
                                                  domain="trt"))  # fmt: skip
    model.opset_import.append(onnx.helper.make_opsetid("trt", 1))
    (folder / "transformer.opt" / precision).mkdir()
    onnx.save_model(model, str(folder / "transformer.opt" / precision / "model.onnx"), save_as_external_data=True,
                    location="model.onnx_data", size_threshold=0)  # fmt: skip


def test_a_graph_of_tensorrt_ops_is_fp8_and_refused_by_onnxruntime_in_one_line(published, sources, tmp_path):
    """ModelOpt's FP8 graph (TensorRT's own Q/DQ ops) is read as the folder's FP8 transformer, which `build` takes
    and ONNX Runtime refuses in one line, naming the graph and the bf16 way out."""
    from helpers import build_folder, manifest_json

    from fluxexport.artifacts.folders import open_export
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    folder = copy_of(published, tmp_path)
    _with_tensorrt_fp8_op(folder)
    fp8 = open_export(folder, sources["tiny-dev"]).fp8["transformer"]
    assert (fp8.file, fp8.dtype, fp8.base_dtype) == ("transformer.opt/fp8/model.onnx", "fp8", "bf16")
    with pytest.raises(FluxExportError) as refused:
        OnnxRuntimeBackend(sources["tiny-dev"], folder).component("transformer")
    assert str(refused.value) == (
        f"transformer in {folder} (transformer.opt/fp8/model.onnx) holds TensorRT's own ops (TRT_FP8QuantizeLinear), "
        "which ONNX Runtime cannot run: build engines from it (fluxexport build) and run with --backend tensorrt, or "
        "run the bf16 graph with --no-fp8"
    )
    assert OnnxRuntimeBackend(sources["tiny-dev"], folder, fp8=False).component("transformer") is not None
    engines = build_folder(sources["tiny-dev"], folder, tmp_path / "trt", precision="fp8", components=["transformer"])
    built = manifest_json(engines)["components"]["transformer"]
    assert (built["precision"], built["onnx"]) == ("fp8", str((folder / "transformer.opt/fp8/model.onnx").resolve()))


def test_nvfp4_engines_from_a_published_fp4_folder(published, sources, tmp_path):
    """`build --precision nvfp4` (stand-in, a Blackwell device) takes the transformer from `transformer.opt/fp4`
    (ModelOpt's graph of TensorRT's own FP4 ops) as it is and the rest from the bf16 graphs."""
    from helpers import manifest_json, standin_tensorrt

    from fluxexport.specs import ExportBounds
    from fluxexport.tensorrt.builder import BuildOptions, build_engines
    from fluxexport.tensorrt.environment import Gpu

    folder = copy_of(published, tmp_path)
    _with_tensorrt_fp8_op(folder, "TRT_FP4DynamicQuantize", "fp4")
    source = sources["tiny-dev"]
    options = BuildOptions("nvfp4", ExportBounds.for_model(source, max_batch=2), optimization_level=2)
    with standin_tensorrt():
        build_engines(source, folder, tmp_path / "trt", options, ["transformer", "vae_decoder"],
                      device_gpu=lambda: Gpu("NVIDIA B200", (10, 0), 180 * 2**30))  # fmt: skip
    built = manifest_json(tmp_path / "trt")["components"]
    assert (built["transformer"]["precision"], built["transformer"]["onnx"]) == (
        "nvfp4", str((folder / "transformer.opt/fp4/model.onnx").resolve()))  # fmt: skip
    assert built["vae_decoder"]["onnx"] == str((folder / "vae.opt/model.onnx").resolve())


def test_nothing_is_written_into_a_published_folder(published, sources):
    from fluxexport.export.onnx_export import export_model

    with pytest.raises(
        FluxExportError, match="is a published ONNX folder, read as it is: write exports and FP8 graphs"
    ):
        export_model(sources["tiny-dev"], published, ["clip"], dtype="bf16")
    assert not (published / "manifest.json").exists() and not (published / "clip.onnx").exists()


def _fix_text_length(folder: Path, t5: int, transformer: int) -> None:
    """Declare the token axis static, as the demo exports T5 and the transformer (no dynamic axis for it)."""
    import onnx

    for graph, axes, length in (("t5.opt", {"input_ids": 1}, t5),
                                ("transformer.opt/bf16", {"encoder_hidden_states": 1, "txt_ids": 0}, transformer)):  # fmt: skip
        path = folder / graph / "model.onnx"
        model = onnx.load(str(path), load_external_data=False)
        for value in model.graph.input:
            if value.name in axes:
                value.type.tensor_type.shape.dim[axes[value.name]].dim_value = length
        onnx.save_model(model, str(path))  # the weights stay where they are (`location` unchanged)


def test_a_text_length_the_graphs_fix_pins_the_engines_profiles(published, sources, tmp_path):
    """Graphs exported with a static token axis (the demo's: 512, 256 for schnell) make `build` profile exactly that
    length and `run` refuse another one in one line (that one runs); T5 and the transformer fixing different
    lengths is refused in one line."""
    from click.testing import CliRunner

    from fluxexport.artifacts.folders import open_export
    from fluxexport.cli import main
    from fluxexport.tensorrt.builder import build_bounds

    folder = copy_of(published, tmp_path)
    _fix_text_length(folder, 7, 7)
    assert build_bounds(sources["tiny-dev"], folder).text_length == (7, 7, 7)
    assert build_bounds(sources["tiny-dev"], published).text_length == (1, 512, 512)  # dynamic: the model's defaults
    result = CliRunner().invoke(main, ["run", "--model", "tiny-dev", "--engines", str(folder), "--prompt", "x",
                                       "--steps", "1", "--height", "64", "--width", "64", "--max-sequence-length", "8",
                                       "--output", str(tmp_path / "x.png")])  # fmt: skip
    assert result.exit_code == 1 and not (tmp_path / "x.png").exists(), result.output
    assert (
        f"Error: the graphs in {folder} take exactly 7 T5 tokens, not 8: set max-sequence-length to 7 "
        "(--max-sequence-length)\n"
    ) in result.output
    result = CliRunner().invoke(main, ["run", "--model", "tiny-dev", "--engines", str(folder), "--prompt", "x",
                                       "--steps", "1", "--height", "64", "--width", "64", "--max-sequence-length", "7",
                                       "--output", str(tmp_path / "x.png")])  # fmt: skip
    assert result.exit_code == 0 and (tmp_path / "x.png").is_file(), result.output
    _fix_text_length(folder, 9, 7)
    with pytest.raises(FluxExportError, match=r"graphs fix different text lengths \(7, 9\): download them from one"):
        open_export(folder)


def test_check_lints_each_published_graph_where_the_layout_puts_it(published):
    """`fluxexport check` on a published folder lints every graph of the layout for TensorRT's parser, named by
    where it sits."""
    from fluxexport.export.check import check_folder

    reports = check_folder(published)
    assert [report.name for report in reports] == ["clip.opt/model.onnx", "t5.opt/model.onnx",
                                                   "transformer.opt/bf16/model.onnx", "vae.opt/model.onnx",
                                                   "vae_encoder.opt/model.onnx"]  # fmt: skip
    assert all(report.ok for report in reports), [report.problems for report in reports]


def test_validate_writes_no_report_into_a_published_folder(tmp_path):
    """The folder is read as it is: without --report, validate refuses in one line before anything runs."""
    from click.testing import CliRunner

    from fluxexport.cli import main

    folder = tmp_path / "FLUX.1-dev-onnx"
    (folder / "vae.opt").mkdir(parents=True)
    result = CliRunner().invoke(main, ["validate", "--model", "tiny-dev", "--engines", str(folder)])
    assert result.exit_code == 1 and sorted(p.name for p in folder.iterdir()) == ["vae.opt"]
    assert result.output == (
        f"Error: {folder} is a published ONNX folder, read as it is: name the JSON report to write with --report FILE\n"
    )


@pytest.mark.parametrize("variant, condition", [("tiny-canny", {}), ("tiny-kontext", {"auto_resize_reference": False})],
                         ids=["canny", "kontext"])  # fmt: skip
def test_run_a_conditioned_model_on_a_published_folder(published, sources, tmp_path_factory, reference_image,
                                                       variant, condition):  # fmt: skip
    """Canny (refused before for lack of latent_std) and Kontext run on a folder whose encoder samples inside:
    Canny's control latents are the posterior sampled with the request's seed, Kontext's reference latents its
    mode, so one seed gives one image run after run, PyTorch bf16's within the bf16 image bound."""
    from fluxexport.compare import psnr
    from fluxexport.models.source import resolve_model
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.runtime.pipeline import GenerationRequest, generate
    from fluxexport.triton.repository import write_repository

    source = resolve_model(variant)
    folder = published_variant(variant, published, sources, tmp_path_factory)
    picture = {"tiny-canny": "control_image", "tiny-kontext": "image"}[variant]  # a small one: the suite's time
    request = GenerationRequest("a glass house", num_inference_steps=1, seed=5, height=64, width=64,
                                max_sequence_length=64, **{picture: reference_image.resize((64, 64))}, **condition)  # fmt: skip
    backend = OnnxRuntimeBackend(source, folder)
    first, again = (generate(backend, source, request).images for _ in range(2))
    reference = generate(TorchBackend(source, dtype="bf16", device="cpu"), source, request).images
    assert first.shape == reference.shape and first.std() > 0 and np.array_equal(first, again)
    assert psnr(first, reference) > 40, psnr(first, reference)  # measured at 2 steps, 64×96: 51.7 / 51.5 dB
    if variant == "tiny-canny":  # Triton's encoder component serves the posterior the pipeline samples with
        config = write_repository(source, folder, tmp_path_factory.mktemp("repo")) / "vae_encoder" / "config.pbtxt"
        assert 'name: "latent_std"' in config.read_text()


def test_the_demos_own_encoder_export_runs_as_the_posterior(sources, tmp_path):
    """The fact the stand-in copies: NVIDIA's demo exports `vae.encode(x).latent_dist.sample()` through TorchScript
    (demo/Diffusion `TorchVAEEncoder`), which draws inside the graph; exported so from tiny-dev's VAE, it is found
    by `posterior_sampling`, its `latent` differs run to run, and its cut copy gives diffusers' mean and std."""
    import onnx_ir as ir
    import onnxruntime
    import torch
    from diffusers import AutoencoderKL

    from fluxexport.artifacts.published import cut_posterior_sampling

    vae = AutoencoderKL.from_pretrained(sources["tiny-dev"].root, subfolder="vae").eval()

    class DemoEncoder(torch.nn.Module):  # the demo's module (the VAE its child), as its exporter calls it
        def __init__(self):
            super().__init__()
            self.vae_encoder = vae

        def forward(self, images):
            return self.vae_encoder.encode(images).latent_dist.sample()

    graph, cut = tmp_path / "model.onnx", tmp_path / "cut.onnx"
    axes = {"images": {0: "B", 2: "8H", 3: "8W"}, "latent": {0: "B", 2: "H", 3: "W"}}
    with torch.no_grad():
        torch.onnx.export(DemoEncoder(), (torch.zeros(1, 3, 32, 32),), str(graph), input_names=["images"],
                          output_names=["latent"], dynamic_axes=axes, opset_version=19, dynamo=False)  # fmt: skip
    model = ir.load(graph)
    assert cut_posterior_sampling(model) and [v.name for v in model.graph.outputs] == ["latent", "latent_std"]
    ir.save(model, cut)
    images = torch.rand(2, 3, 48, 80) * 2 - 1
    session = onnxruntime.InferenceSession(str(graph))
    draws = [session.run(None, {"images": images.numpy()})[0] for _ in range(2)]
    assert not np.array_equal(*draws)  # noise of the session's own generator, not the request's seed
    mean, std = onnxruntime.InferenceSession(str(cut)).run(None, {"images": images.numpy()})
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    assert np.allclose(mean, posterior.mean.numpy(), atol=1e-5) and np.allclose(std, posterior.std.numpy(), atol=1e-5)
