"""The transformer's parts (head, tail, out: what `--cache first-block` runs) in FP8 and with LoRAs: `quantize`
makes FP8 parts with the transformer's own scales, ONNX Runtime and `build` pick them where they pick the FP8
transformer, LoRAs swap into each part's weights (ONNX Runtime, Triton) and `refit` covers the parts' engines.

One module fixture quantizes tiny-dev's session graphs with the parts (`parts_export`) to FP8 on an fp32 base with
the calibration of the session's FP8 folder (the transformer and each part); engine folders are written by
`build`'s own code over the stand-in TensorRT (tests/standin_tensorrt.py)."""

import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest
import torch
from helpers import build_folder, manifest_json, standin_tensorrt
from safetensors.torch import save_file

from fluxexport.artifacts.folders import FP8_COMPONENTS, open_export
from fluxexport.errors import FluxExportError
from fluxexport.models.lora import parse_lora
from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
from fluxexport.runtime.cache import parse_cache
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.specs import TRANSFORMER_PARTS, component_specs, sample_inputs

SHAPES = [{"B": 2, "N": 24, "L": 13}, {"B": 1, "N": 256, "L": 77}, {"B": 3, "N": 68, "L": 40}]
ENGINE_SHAPES = [{"B": 1, "N": 256, "L": 40}, {"B": 2, "N": 96, "L": 77}]  # inside the engines' profiles
# the LoRA adapts layers of each part: the head (context_embedder, the first double block), the tail (the single
# block) and the output layers (proj_out)
SPREAD = ("context_embedder", "transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out", "proj_out")
HELD_BY = {"transformer_head": 2, "transformer_tail": 1, "transformer_out": 1}  # LoRA layers in each part


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).double().norm() / b.double().norm()).item()


def through_parts(component, feeds: dict) -> torch.Tensor:
    """head → tail → out, as First Block Cache computes a step it does not skip."""
    head = component("transformer_head")(feeds)
    tail = component("transformer_tail")(
        {key: head[key] for key in ("image_hidden", "text_hidden", "temb")}
        | {key: feeds[key] for key in ("img_ids", "txt_ids")}
    )
    return component("transformer_out")({"image_hidden": tail["tail_hidden"], "temb": head["temb"]})["latent"]


@pytest.fixture(scope="module")
def parts_folder(sources, fp8_exports, parts_export, tmp_path_factory):
    """tiny-dev's fp32 graphs with the transformer's parts (the session's `parts_export`), quantized to FP8 on an
    fp32 base with the session FP8 folder's calibration.json (`quantize --calibration FILE`, as a library call: the
    transformer and the parts the folder holds), so the parts are not exported a second time."""
    from fluxexport.quantize.qdq_export import quantize_transformer

    source, folder = sources["tiny-dev"], tmp_path_factory.mktemp("parts-fp8") / "onnx"
    shutil.copytree(parts_export, folder)
    quantize_transformer(source, folder, base_dtype="fp32",
                         calibration_file=fp8_exports["tiny-dev"] / "calibration.json")  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def lora(sources, tmp_path_factory):
    """A PEFT LoRA (rank 4) on the layers of `SPREAD`: every part holds some of them."""
    from fluxexport.models.loaders import load_transformer

    model, generator, state = load_transformer(sources["tiny-dev"]), torch.Generator().manual_seed(0), {}
    for name in SPREAD:
        linear = model.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(4, linear.in_features, generator=generator) * 0.2
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(linear.out_features, 4, generator=generator) * 0.2
    path = tmp_path_factory.mktemp("lora") / "spread.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def merged(sources, lora):
    """tiny-dev with the LoRA at 0.8."""
    return sources["tiny-dev"].with_loras([parse_lora(f"{lora}:0.8")])


def test_fp8_parts_use_the_transformers_scales(sources, fp8_exports, parts_folder):
    """Each FP8 part holds the FP8 transformer's own weights: the same FLOAT8E4M3FN bytes and scales, tensor by
    tensor, and together all of them; the manifest records them beside the transformer's."""
    from fluxexport.quantize.qdq_export import fp8_components

    assert ("transformer", *TRANSFORMER_PARTS) == FP8_COMPONENTS
    assert fp8_components(parts_folder) == list(FP8_COMPONENTS)  # quantize's default: the parts the folder has
    assert fp8_components(fp8_exports["tiny-dev"]) == ["transformer"]
    assert fp8_components(fp8_exports["tiny-dev"], ["transformer_out"]) == ["transformer", "transformer_out"]
    fp8 = manifest_json(parts_folder)["fp8"]
    assert set(fp8) == set(FP8_COMPONENTS)
    whole = ir.load(parts_folder / "transformer.fp8.onnx").graph.initializers
    by_tensor = {o["tensor"]: (name, o) for name, o in fp8["transformer"]["weights"].items() if "fp8_scale" in o}
    seen = []
    for part in TRANSFORMER_PARTS:
        entry = fp8[part]
        assert entry["file"] == f"{part}.fp8.onnx" and entry["dtype"] == "fp8" and entry["base_dtype"] == "fp32"
        assert entry["quantization"]["calibration"] == "calibration.json"
        held = ir.load(parts_folder / entry["file"]).graph.initializers
        quantized = {name: o for name, o in entry["weights"].items() if "fp8_scale" in o}
        assert entry["quantization"]["layers"] == len(quantized)
        for name, origin in quantized.items():
            theirs, their_origin = by_tensor[origin["tensor"]]
            assert origin["fp8_scale"] == their_origin["fp8_scale"]
            assert held[name].const_value.tobytes() == whole[theirs].const_value.tobytes()
            seen.append(origin["tensor"])
    assert sorted(seen) == sorted(by_tensor)  # every quantized weight is in exactly one part
    assert fp8["transformer_out"]["quantization"]["layers"] == 0  # the output layers stay in the base dtype


def test_fp8_parts_on_onnxruntime_equal_the_fp8_transformer(sources, parts_folder, torch_backends):
    """head → tail → out on the FP8 parts computes what the FP8 transformer computes (ONNX Runtime, fp32 base),
    within FP8's error of PyTorch fp32; with the cache at threshold 0 (every step through the parts) the image is
    the FP8 transformer's."""
    source = sources["tiny-dev"]
    spec, fp32 = component_specs(source)["transformer"], torch_backends["tiny-dev"].component("transformer")
    with OnnxRuntimeBackend(source, parts_folder) as graphs:
        assert {name: graphs.entries[name].file for name in FP8_COMPONENTS} == {
            name: f"{name}.fp8.onnx" for name in FP8_COMPONENTS
        }
        for index, sizes in enumerate(SHAPES):
            feeds = sample_inputs(spec, sizes, seed=index)
            parts = through_parts(graphs.component, feeds)
            assert rel_l2(parts, graphs.component("transformer")(feeds)["latent"]) <= 1e-6, sizes
            assert 1e-5 < rel_l2(parts, fp32(feeds)["latent"]) <= 6e-2, sizes
        request = GenerationRequest("a red fox", height=128, width=128, num_inference_steps=3, seed=1)
        cached = generate(graphs, source, request, cache=parse_cache("first-block:threshold=0"))
        assert cached.computed_steps == 3
        assert np.array_equal(cached.images, generate(graphs, source, request).images)
    with OnnxRuntimeBackend(source, parts_folder, fp8=False) as graphs:
        assert {graphs.entries[name].file for name in FP8_COMPONENTS} == {f"{name}.onnx" for name in FP8_COMPONENTS}


def test_an_fp8_run_never_mixes_fp8_and_base_parts(sources, parts_folder, tmp_path):
    """A folder whose FP8 transformer has no FP8 head (parts exported after quantize): an FP8 run refuses the
    head with the command that makes it, instead of running the base one beside FP8 ones; build says the same."""
    from fluxexport.tensorrt.precision import graph_dtypes, graph_problems

    folder = tmp_path / "onnx"
    shutil.copytree(parts_folder, folder)
    record = open_export(folder)
    del record.fp8["transformer_head"]
    record.write()
    record = open_export(folder)
    assert "transformer_head" not in record.graphs() and record.graphs()["transformer_tail"].is_fp8
    assert record.graphs(fp8=False)["transformer_head"].file == "transformer_head.onnx"
    with OnnxRuntimeBackend(sources["tiny-dev"], folder) as graphs, pytest.raises(FluxExportError) as refused:
        graphs.component("transformer_head")
    assert str(refused.value) == (
        f"{folder} has no FP8 transformer_head graph to run beside the FP8 transformer: run fluxexport quantize "
        f"--model tiny-dev --dtype fp32 --transformer-parts --out {folder}, or run with --no-fp8"
    )
    wanted = graph_dtypes("fp8", ["clip", *FP8_COMPONENTS])
    assert wanted == {"clip": "bf16"} | {name: "fp8" for name in FP8_COMPONENTS}
    assert graph_problems(record, wanted) == [
        "clip: the graph is fp32, a bf16 engine needs a bf16 graph (run fluxexport export --model tiny-dev --dtype "
        "bf16 --out DIR, then build --onnx DIR)",
        f"transformer_head: no graph in {folder} (run fluxexport quantize --model tiny-dev --transformer-parts --out "
        f"{folder})",
    ]


def test_build_quantizes_missing_parts_with_the_transformers_scales(sources, parts_folder, tmp_path, monkeypatch):
    """`build --precision fp8` on a folder with an FP8 transformer and parts without FP8 graphs quantizes only the
    parts, with the folder's calibration.json; without that file it calibrates anew and quantizes the transformer
    and every part, so that all share the new scales."""
    import fluxexport.build as build

    folder = tmp_path / "onnx"
    shutil.copytree(parts_folder, folder)
    record = open_export(folder)
    for part in TRANSFORMER_PARTS:
        del record.fp8[part]
    record.write()
    calls, logged = [], []
    monkeypatch.setattr(build, "quantize_transformer", lambda *args, **kwargs: calls.append(kwargs))
    build.export_missing_graphs(sources["tiny-dev"], folder, "fp8", list(FP8_COMPONENTS), log=logged.append)
    assert calls == [{"base_dtype": "bf16", "calibration_file": folder / "calibration.json",
                      "components": list(TRANSFORMER_PARTS)}]  # fmt: skip
    assert logged == [
        f"quantizing {', '.join(TRANSFORMER_PARTS)} to FP8 into {folder} with the scales of {folder}/calibration.json"
    ]
    (folder / "calibration.json").unlink()
    calls.clear()
    build.export_missing_graphs(sources["tiny-dev"], folder, "fp8", ["transformer_out"], log=logged.append)
    assert calls == [{"base_dtype": "bf16", "components": list(FP8_COMPONENTS)}]
    assert logged[-1] == f"calibrating and quantizing {', '.join(FP8_COMPONENTS)} to FP8 into {folder}"


def test_a_lora_swaps_into_the_parts(sources, parts_folder, merged, tmp_path):
    """Each part takes the LoRA deltas of the weights it holds: head → tail → out with the LoRA swapped equals the
    transformer with it swapped and the transformer exported with it merged, in fp32 and FP8; a long-lived backend
    swaps it into loaded parts; the cache through the parts gives the swapped transformer's image."""
    from fluxexport.export.onnx_export import export_model

    source = sources["tiny-dev"]
    export_model(merged, tmp_path / "merged", ["transformer"])
    spec = component_specs(source)["transformer"]
    with (
        OnnxRuntimeBackend(merged, parts_folder, fp8=False) as swapped,
        OnnxRuntimeBackend(merged, tmp_path / "merged") as exported,
        OnnxRuntimeBackend(merged, parts_folder, fp8=True) as fp8,
        OnnxRuntimeBackend(source, parts_folder, fp8=False) as base,
    ):
        for index, sizes in enumerate(SHAPES):
            feeds = sample_inputs(spec, sizes, seed=index)
            parts = through_parts(swapped.component, feeds)
            assert rel_l2(parts, swapped.component("transformer")(feeds)["latent"]) <= 1e-6, sizes
            assert rel_l2(parts, exported.component("transformer")(feeds)["latent"]) <= 1e-5, sizes
            assert rel_l2(parts, through_parts(base.component, feeds)) > 1e-2, sizes  # the LoRA is in
            fp8_parts = through_parts(fp8.component, feeds)
            assert rel_l2(fp8_parts, fp8.component("transformer")(feeds)["latent"]) <= 1e-6, sizes
            assert 1e-5 < rel_l2(fp8_parts, parts) <= 6e-2, sizes
        request = GenerationRequest("a red fox", height=128, width=128, num_inference_steps=3, seed=2)
        cached = generate(swapped, merged, request, cache=parse_cache("first-block:threshold=0"))
        assert np.array_equal(cached.images, generate(swapped, merged, request).images)
        feeds = sample_inputs(spec, SHAPES[0])
        before = through_parts(base.component, feeds)
        base.set_loras(merged.loras)  # the parts loaded above are recreated with the LoRA
        assert torch.equal(through_parts(base.component, feeds), through_parts(swapped.component, feeds))
        base.set_loras(())
        assert torch.equal(through_parts(base.component, feeds), before)


def test_a_lora_the_parts_do_not_hold_is_refused(sources, parts_folder, lora, tmp_path):
    """A part refuses a LoRA layer that neither it nor its sibling parts hold (here: the output layers are gone)."""
    folder = tmp_path / "onnx"
    shutil.copytree(parts_folder, folder)
    record = open_export(folder)
    del record.components["transformer_out"]
    record.write()
    source = sources["tiny-dev"].with_loras([parse_lora(f"{lora}:0.8")])
    with OnnxRuntimeBackend(source, folder, fp8=False) as graphs, pytest.raises(FluxExportError) as refused:
        graphs.component("transformer_head")
    assert str(refused.value) == (
        "transformer_head.onnx (nor any other part of the transformer) has no initializer for proj_out.weight: "
        "export with --lora instead"
    )


def latent(backend, sizes: dict, seed: int, parts: bool) -> torch.Tensor:
    """The transformer's output for sample inputs: from the whole graph or engine, or through the parts."""
    feeds = sample_inputs(component_specs(backend.source)["transformer"], sizes, seed=seed)
    return through_parts(backend.component, feeds) if parts else backend.component("transformer")(feeds)["latent"]


def test_refit_covers_the_parts(sources, parts_folder, merged, lora, tmp_path):
    """Refittable fp32 engines of the transformer and its parts: refit sets in each part the LoRA layers it holds;
    the refitted parts answer exactly as ONNX Runtime's parts with the LoRA swapped (and validate compares them
    with those); a part the LoRA does not touch keeps its base plan; --reset goes back."""
    from standin_tensorrt import HostDevice

    from fluxexport.tensorrt.backend import TensorRTBackend
    from fluxexport.tensorrt.refit import refit_engines
    from fluxexport.validate.engines import validate_engines

    source, names = sources["tiny-dev"], list(FP8_COMPONENTS)
    pipeline = ["clip", "t5", "vae_decoder", *names]  # validate makes images too
    engines = build_folder(source, parts_folder, tmp_path / "engines", components=pipeline, refittable=True)
    with standin_tensorrt() as trt:
        refitted = refit_engines(merged, engines)
        assert {name: refitted.components[name].refitted_weights for name in names} == {"transformer": 4} | HELD_BY
        with (
            TensorRTBackend(merged, engines, device=HostDevice(trt)) as ours,
            OnnxRuntimeBackend(merged, parts_folder, fp8=False) as swapped,
        ):
            for index, sizes in enumerate(ENGINE_SHAPES):
                for parts in (False, True):
                    expected = latent(swapped, sizes, index, parts)
                    assert torch.equal(latent(ours, sizes, index, parts), expected), (parts, sizes)
        # validate compares each refitted part with its graph with the same LoRA swapped in
        report, _ = validate_engines(merged, engines, components=list(TRANSFORMER_PARTS), steps=2,
                                     device=HostDevice(trt))  # fmt: skip
        rows = [row for row in report.components if row.against == "onnxruntime"]
        assert {row.component for row in rows} == set(TRANSFORMER_PARTS) and all(row.rel_l2 < 1e-5 for row in rows)
        first_block = source.with_loras([parse_lora(str(_first_block_lora(lora, tmp_path)))])
        partial = refit_engines(first_block, engines)
        assert {name: partial.components[name].refitted_weights for name in TRANSFORMER_PARTS} == {
            "transformer_head": 1, "transformer_tail": None, "transformer_out": None}  # fmt: skip
        assert partial.components["transformer_out"].file == "transformer_out_fp32.trt_10.13.0.35.plan"
        reset = refit_engines(source, engines, reset=True)
    assert all(not reset.components[name].is_refitted for name in names)
    assert sorted(p.name for p in engines.glob("*.lora.*")) == []


def _first_block_lora(lora, tmp_path):
    """The LoRA's layer in the first double block alone (the head's)."""
    from safetensors.torch import load_file

    state = {key: v for key, v in load_file(str(lora)).items() if key.startswith("transformer.transformer_blocks.0.")}
    save_file(state, str(tmp_path / "first_block.safetensors"))
    return tmp_path / "first_block.safetensors"


def test_fp8_engines_build_from_the_fp8_parts_and_refuse_a_block_lora(sources, parts_folder, merged, tmp_path):
    """`build --precision fp8` makes the parts' engines from their FP8 graphs, as the transformer's; a refit of a
    LoRA that adapts the parts' FP8 weights is refused as it is for the transformer (NVIDIA's guidance: fuse the
    LoRA, then quantize), before any plan is written."""
    from pathlib import Path

    from fluxexport.tensorrt.refit import refit_engines

    source, names = sources["tiny-dev"], list(FP8_COMPONENTS)
    engines = build_folder(source, parts_folder, tmp_path / "fp8", precision="fp8", components=names,
                           refittable=True)  # fmt: skip
    built = manifest_json(engines)["components"]
    assert {name: (Path(built[name]["onnx"]).name, built[name]["precision"]) for name in names} == {
        name: (f"{name}.fp8.onnx", "fp8") for name in names
    }
    before = {path.name: path.read_bytes() for path in engines.iterdir()}
    with standin_tensorrt(), pytest.raises(FluxExportError) as error:
        refit_engines(merged, engines)
    message = str(error.value)
    assert "in FP8: a refit would quantize the LoRA-merged weight with the base model's scale" in message
    assert message.split(" holds ")[0].startswith(("transformer_fp8", "transformer_head_fp8", "transformer_tail_fp8"))
    assert "\n" not in message and "fluxexport quantize --model tiny-dev --lora" in message
    assert {path.name: path.read_bytes() for path in engines.iterdir()} == before  # nothing written


def test_triton_repository_swaps_request_loras_into_the_parts(sources, parts_folder, merged, lora, tmp_path):
    """A repository with per-request LoRAs serves the parts too: each part's component records the LoRA folder
    and the tensors its siblings hold, and swapping the LoRA as its component does (base weights read from its own
    graph) gives the ONNX Runtime backend's swapped part. From the FP8 graphs, the FP8 parts are served."""
    from fluxexport.artifacts.repository import ServedGraph
    from fluxexport.artifacts.weights import graph_base
    from fluxexport.models.lora import LoraSet
    from fluxexport.onnxruntime.backend import create_session, lora_overrides, session_runner
    from fluxexport.triton.repository import write_repository

    source = sources["tiny-dev"]
    repository = write_repository(source, parts_folder, tmp_path / "repo", fp8=False, request_loras=merged.loras)
    spec = component_specs(source)["transformer"]
    feeds = sample_inputs(spec, SHAPES[0])
    with OnnxRuntimeBackend(merged, parts_folder, fp8=False) as swapped:
        expected = swapped.component("transformer_head")(feeds)
        runners = {}
        for part in TRANSFORMER_PARTS:
            version = repository / part / "1"
            served = ServedGraph.read(version)
            assert served.lora_folder == "flux_pipeline/1/loras" and served.lora_module == "transformer"
            others = [swapped.entries[name] for name in TRANSFORMER_PARTS if name != part]
            assert set(served.lora_elsewhere) == {o.tensor for graph in others for o in graph.weights.values()}
            path, weights = version / "model.onnx", served.graph.require_weight_origins("write it again")
            overrides = lora_overrides(served.graph, "transformer", LoraSet(merged.loras), graph_base(path, weights),
                                       served.lora_elsewhere)  # fmt: skip
            assert len(overrides) == HELD_BY[part]
            runners[part] = session_runner(create_session(path, overrides=overrides), served.graph, part)
        ours = runners["transformer_head"](feeds)
        assert all(torch.equal(ours[key], expected[key]) for key in expected)
        assert torch.equal(through_parts(runners.__getitem__, feeds), through_parts(swapped.component, feeds))
    fp8_repository = write_repository(source, parts_folder, tmp_path / "fp8")
    for name in FP8_COMPONENTS:
        assert json.loads((fp8_repository / name / "1" / "component.json").read_text())["dtype"] == "fp8"
    with pytest.raises(FluxExportError, match="whose graph here is FP8: write the repository with --no-fp8$"):
        write_repository(source, parts_folder, tmp_path / "refused", request_loras=merged.loras)
