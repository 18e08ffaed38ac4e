"""Everything around the TensorRT calls, on any machine: profiles, policy, naming, manifests, refusals."""

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import build_folder, flux1_source, manifest_json, standin_tensorrt

from fluxexport.cli import main
from fluxexport.dtypes import ENGINE_PRECISIONS, PRECISIONS, component_precision
from fluxexport.errors import FluxExportError
from fluxexport.families.flux1.runtime import PREFERRED_KONTEXT_RESOLUTIONS
from fluxexport.specs import ExportBounds, component_specs
from fluxexport.tensorrt.builder import BuildOptions, build_bounds
from fluxexport.tensorrt.engines import (
    check_engine_set,
    engine_filename,
    new_engine_folder,
    profiles_from_json,
    profiles_to_json,
)
from fluxexport.tensorrt.environment import Gpu, require_fp8, tensorrt_available
from fluxexport.tensorrt.precision import graph_dtypes, graph_problems
from fluxexport.tensorrt.profiles import build_profiles, resolution_buckets, select_profile

H100 = Gpu("NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30)
A100 = Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 80 * 2**30)
L40S = Gpu("NVIDIA L40S", (8, 9), 48 * 2**30)


def transformer_shapes(height, width, reference=None, batch=1, text=512):
    tokens = (height // 16) * (width // 16) + (0 if reference is None else (reference[0] // 16) * (reference[1] // 16))
    return {"hidden_states": (batch, tokens, 64), "encoder_hidden_states": (batch, text, 4096),
            "pooled_projections": (batch, 768), "timestep": (batch,), "img_ids": (tokens, 3), "txt_ids": (text, 3),
            "guidance": (batch,)}  # fmt: skip


def profiles(source, component, **options):
    return build_profiles(source, component, BuildOptions(bounds=ExportBounds(), **options).profile_bounds())


def test_default_profiles_follow_the_specs(tmp_path):
    source = flux1_source(tmp_path)
    (profile,) = profiles(source, "transformer")
    assert profile.shapes["hidden_states"] == ((1, 256, 64), (1, 4096, 64), (4, 7225, 64))
    assert profile.shapes["img_ids"] == ((256, 3), (4096, 3), (7225, 3))  # N tied across inputs
    assert profile.shapes["encoder_hidden_states"] == ((1, 1, 4096), (1, 512, 4096), (4, 512, 4096))
    (decoder,) = profiles(source, "vae_decoder")
    assert decoder.shapes["latent"] == ((1, 16, 32, 32), (1, 16, 128, 128), (4, 16, 170, 170))
    (clip,) = profiles(source, "clip", resolution_buckets=3)
    assert clip.shapes["input_ids"] == ((1, 77), (1, 77), (4, 77))  # no image axes: one profile


def test_profiles_are_the_specs_axes_of_each_bucket(tmp_path):
    """One source of truth: every profile entry is `component_specs(source, bucket)`'s axis bounds."""
    source = flux1_source(tmp_path, kontext=True)
    options = BuildOptions(bounds=ExportBounds(min_batch=2, opt_batch=2, max_batch=3), resolution_buckets=3)
    for name in ("transformer", "vae_decoder", "vae_encoder"):
        built = build_profiles(source, name, options.profile_bounds())
        assert len(built) == 3
        for profile, bucket in zip(built, options.profile_bounds(), strict=True):
            spec = component_specs(source, bucket)[name]
            assert profile.shapes == {tensor.name: spec.shape_range(tensor) for tensor in spec.inputs}
            assert all(low[0] == 2 and high[0] == 3 for low, _, high in profile.shapes.values() if len(low) > 2)


def test_build_defaults_come_from_the_export_bounds(tmp_path, sources, exports):
    # a folder exported with the tiny defaults: the engines serve the same range unless told otherwise
    exported = manifest_json(exports["tiny-dev"])["bounds"]
    bounds = build_bounds(sources["tiny-dev"], exports["tiny-dev"])
    assert vars(bounds) == exported
    assert bounds.resolution == (64, 256, 1024)
    narrowed = build_bounds(sources["tiny-dev"], exports["tiny-dev"], max_resolution=512, min_batch=2, opt_batch=2)
    assert narrowed.resolution == (64, 256, 512) and narrowed.batch == (2, 2, 4)
    # no export yet: the model's export defaults
    assert build_bounds(flux1_source(tmp_path), tmp_path / "none") == ExportBounds(opt_text_length=512)
    with pytest.raises(FluxExportError, match=r"batch needs 1 ≤ MIN ≤ OPT ≤ MAX, got 3:2:4 \(--batch\)"):
        build_bounds(sources["tiny-dev"], exports["tiny-dev"], min_batch=3, opt_batch=2)


def test_every_kontext_preferred_size_falls_in_a_profile(tmp_path):
    source = flux1_source(tmp_path, kontext=True)
    for buckets in (1, 3):
        transformer = profiles(source, "transformer", resolution_buckets=buckets)
        encoder = profiles(source, "vae_encoder", resolution_buckets=buckets)
        for width, height in PREFERRED_KONTEXT_RESOLUTIONS:
            # the target at the reference's own size, with the reference, in batch 1 and 4
            for batch in (1, 4):
                shapes = transformer_shapes(height, width, (width, height), batch)
                index = select_profile(transformer, shapes, "transformer")
                assert transformer[index].contains(shapes)
                # its bucket is the one whose resolution range holds the target
                if buckets == 1:
                    assert index == 0
            assert encoder[select_profile(encoder, {"images": (1, 3, height, width)}, "vae_encoder")].contains(
                {"images": (1, 3, height, width)}
            )
        # the largest target with a reference larger than any the runtime sends (its own size, capped at the
        # target's, or a preferred one) does not fit: the profiles are tight, not unbounded
        too_large = transformer_shapes(1360, 1360, (1360 + 16, 1360), 4)
        with pytest.raises(FluxExportError, match="outside the engine's profiles"):
            select_profile(transformer, too_large, "transformer")


def test_resolution_buckets_cover_the_range():
    buckets = resolution_buckets(256, 1024, 1360, 3)
    assert buckets[0][0] == 256 and buckets[-1][2] == 1360
    assert all(a[2] == b[0] for a, b in zip(buckets, buckets[1:], strict=False))
    assert all(low <= opt <= high and low % 16 == 0 for low, opt, high in buckets)
    assert resolution_buckets(256, 1024, 1360, 1) == [(256, 1024, 1360)]
    with pytest.raises(FluxExportError, match="at least one resolution bucket"):
        resolution_buckets(256, 1024, 1360, 0)


def test_select_profile_picks_the_bucket_and_refuses_outside(tmp_path):
    built = profiles(flux1_source(tmp_path), "transformer", resolution_buckets=3)
    assert select_profile(built, transformer_shapes(256, 256), "transformer") == 0
    assert select_profile(built, transformer_shapes(1360, 1360), "transformer") == 2
    with pytest.raises(FluxExportError) as error:
        select_profile(built, transformer_shapes(2048, 2048), "transformer")
    message = str(error.value)
    assert message.startswith("transformer: shapes hidden_states (1, 16384, 64)")
    assert message.endswith("rebuild with a wider --min/--max-resolution, --batch or --text-len")
    with pytest.raises(FluxExportError, match="outside the engine's profiles"):
        select_profile(built, transformer_shapes(1024, 1024, batch=8), "transformer")


def test_precision_policy():
    assert graph_dtypes("fp8", ["clip", "t5", "transformer", "vae_decoder"]) == {
        "clip": "bf16", "t5": "bf16", "transformer": "fp8", "vae_decoder": "bf16"}  # fmt: skip
    every = PRECISIONS + ENGINE_PRECISIONS
    assert all(component_precision("t5", p)[0] != "fp16" for p in every)  # T5 overflows fp16
    assert all(component_precision(vae, p)[0] != "fp16" for p in every for vae in ("vae_decoder", "vae_encoder"))
    with pytest.raises(FluxExportError, match="unknown precision 'int4': choose one of bf16, fp8, fp16, fp32"):
        graph_dtypes("int4", ["clip"])


def test_graph_problems_name_the_fixing_command():
    from fluxexport.artifacts.folders import ExportFolder
    from fluxexport.artifacts.records import GraphRecord, ModelRecord

    def graph(file: str, dtype: str) -> GraphRecord:
        return GraphRecord(file, dtype, "bf16", 20, (), ())

    bf16 = {"transformer": graph("transformer.onnx", "bf16"), "clip": graph("clip.onnx", "bf16")}
    folder = ExportFolder(Path("out/onnx"), ModelRecord("tiny-dev", "0"), "bf16", {}, bf16)
    problems = graph_problems(folder, {"transformer": "fp8", "clip": "bf16", "t5": "bf16"})
    assert problems == [
        "transformer: no graph in out/onnx (run fluxexport quantize --model tiny-dev --out out/onnx)",  # bf16 stays
        "t5: no graph in out/onnx (run fluxexport export --model tiny-dev --components t5 --dtype bf16 --out out/onnx)",
    ]
    folder.fp8 = {"transformer": graph("transformer.fp8.onnx", "fp8")}
    assert graph_problems(folder, {"transformer": "fp8", "clip": "bf16"}) == []
    assert graph_problems(folder, {"transformer": "bf16", "clip": "bf16"}) == []


def test_engine_names_carry_precision_and_version():
    assert engine_filename("transformer", "fp8", "10.13.2") == "transformer_fp8.trt_10.13.2.plan"


def test_fp8_needs_ada_or_hopper():
    require_fp8(H100)
    require_fp8(L40S)
    with pytest.raises(FluxExportError) as error:
        require_fp8(A100)
    assert str(error.value) == (
        "FP8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); NVIDIA A100-SXM4-80GB is 8.0: "
        "build with --precision bf16"
    )


def test_engine_sets_refuse_other_tensorrt_and_other_gpus(tmp_path, sources):
    from fluxexport.artifacts.folders import ExportFolder, open_engines
    from fluxexport.artifacts.records import ModelRecord

    model = ModelRecord("tiny-dev", "0")
    new_engine_folder(tmp_path / "engines", model, "10.13.2", H100, "fp8", {}).write()
    folder = open_engines(tmp_path / "engines")
    check_engine_set(folder, "10.13.2", H100)
    with pytest.raises(FluxExportError, match="built with TensorRT 10.13.2, this is 11.0.0: rebuild them"):
        check_engine_set(folder, "11.0.0", H100)
    with pytest.raises(
        FluxExportError,
        match=r"built for NVIDIA H100 80GB HBM3 \(compute capability 9.0\), this GPU is NVIDIA L40S \(8.9\)",
    ):
        check_engine_set(folder, "10.13.2", L40S)
    ExportFolder(tmp_path / "graphs", model, "fp32", {}).write()
    with pytest.raises(FluxExportError, match="holds no TensorRT engines"):
        open_engines(tmp_path / "graphs")


def test_profiles_round_trip_through_the_manifest(tmp_path):
    built = profiles(flux1_source(tmp_path, kontext=True), "transformer", resolution_buckets=2)
    assert profiles_from_json(profiles_to_json(built)) == built


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here: the refusal cannot be observed")
def test_build_without_tensorrt_says_how_to_get_it(tmp_path, sources, exports):
    result = CliRunner().invoke(
        main, ["build", "--model", "tiny-dev", "--onnx", str(exports["tiny-dev"]), "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == 1
    # "(only its type stubs are)" where tensorrt-stubs is installed, as the README's install does
    assert re.match(r"Error: TensorRT is not installed( \(only its type stubs are\))?: build inside the "
                    r"Dockerfile's NGC image", result.output)  # fmt: skip
    assert not (tmp_path / "e").exists()
    run = CliRunner().invoke(
        main,
        [
            "run",
            "--prompt",
            "x",
            "--backend",
            "tensorrt",
            "--engines",
            str(tmp_path),
            "--output",
            str(tmp_path / "o.png"),
        ],
    )
    assert run.exit_code == 1 and "TensorRT is not installed" in run.output
    # validate on an engine folder: the same one line
    build_folder(sources["tiny-dev"], exports["tiny-dev"], tmp_path / "engines", components=["clip"])
    checked = CliRunner().invoke(main, ["validate", "--model", "tiny-dev", "--engines", str(tmp_path / "engines")])
    assert checked.exit_code == 1 and checked.output.startswith("Error: TensorRT is not installed")
    refit = CliRunner().invoke(main, ["refit", "--model", "tiny-dev", "--engines", str(tmp_path / "engines")])
    assert refit.exit_code == 1 and refit.output.startswith("Error: TensorRT is not installed")


def test_only_the_tensorrt_stubs_are_not_tensorrt(monkeypatch):
    """tensorrt-stubs leaves a `tensorrt` folder that imports as an empty namespace package."""
    from fluxexport.tensorrt.environment import import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(FluxExportError, match=r"^TensorRT is not installed \(only its type stubs are\): build"):
        import_tensorrt()
    old = types.ModuleType("tensorrt")
    old.__version__ = "8.6.1"
    from fluxexport.tensorrt.environment import require_tensorrt_version

    with pytest.raises(FluxExportError, match=r"^TensorRT 8\.6\.1 is too old: fluxexport needs 10\.1 or newer"):
        require_tensorrt_version(old)


def test_engine_against_onnxruntime_rows_come_from_polygraphy_results(sources):
    """What validate --engines makes of polygraphy's Comparator results: one row per shape and output,
    rel-L2 of the engine against ONNX Runtime, failing past the threshold (and on NaN)."""
    import numpy as np
    from polygraphy.comparator import IterationResult, RunResults

    from fluxexport.specs import validation_sizes
    from fluxexport.validate.engines import comparisons_from_results

    spec = component_specs(sources["tiny-dev"])["clip"]
    sizes = validation_sizes(spec)
    rng = np.random.default_rng(0)
    graph = [{t.name: rng.standard_normal((2, 8)).astype(np.float32) for t in spec.outputs} for _ in sizes]
    engine = [{name: value * (1 + 1e-3) for name, value in outputs.items()} for outputs in graph]
    engine[-1][spec.outputs[0].name] = np.full((2, 8), np.nan, dtype=np.float32)
    results = RunResults([
        ("clip-tensorrt", [IterationResult(outputs, runner_name="clip-tensorrt") for outputs in engine]),
        ("clip-onnxruntime", [IterationResult(outputs, runner_name="clip-onnxruntime") for outputs in graph]),
    ])  # fmt: skip
    rows = comparisons_from_results(spec, results, sizes, max_rel_l2=1e-2)
    assert len(rows) == len(sizes) * len(spec.outputs)
    assert all(row.against == "onnxruntime" and row.component == "clip" for row in rows)
    assert [row.sizes for row in rows[:: len(spec.outputs)]] == [shape for shape, _ in sizes]
    assert [row.passed for row in rows] == [True] * (len(rows) - len(spec.outputs)) + [False] + [True] * (
        len(spec.outputs) - 1
    )
    assert rows[0].rel_l2 == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize(("value", "expected"), [("4", (4, 4, 4)), ("1:4", (1, 4, 4)), ("1:2:4", (1, 2, 4))])
def test_range_options(value, expected):
    from fluxexport.cli import _range

    assert _range(value, "--batch") == expected


@pytest.mark.parametrize("value", ["0", "4:1", "a:b", "1:2:3:4"])
def test_bad_range_options(value):
    from fluxexport.cli import _range

    with pytest.raises(FluxExportError, match="--batch"):
        _range(value, "--batch")


def test_fp8_graphs_handed_to_the_builder_pass_the_check(fp8_exports):
    from fluxexport.export.check import check_folder

    assert all(report.ok for report in check_folder(fp8_exports["tiny-kontext"]))


def test_build_prepares_missing_graphs_fp8_implies_quantize(sources, exports, tmp_path):
    import shutil

    from fluxexport.build import export_missing_graphs
    from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings

    folder = tmp_path / "onnx"
    shutil.copytree(exports["tiny-dev"], folder)  # fp32 graphs: none fits an fp8 engine set
    before = manifest_json(folder)["components"]["t5"]["sha256"]
    calibration = CalibrationSettings(CALIBRATION_PROMPTS[:2], steps=2, height=128, width=128)
    logged = []
    prepared = export_missing_graphs(
        sources["tiny-dev"], folder, "fp8", ["clip", "transformer"], calibration, log=logged.append
    )
    components = prepared.components
    assert components["clip"].dtype == "bf16" and prepared.fp8["transformer"].dtype == "fp8"
    assert components["transformer"].dtype == "fp32"  # the base transformer stays beside the FP8 one
    assert components["t5"].sha256 == before  # not asked for: untouched
    assert logged == [
        f"exporting clip as bf16 into {folder}",
        f"calibrating and quantizing the transformer to FP8 into {folder}",
    ]
    assert graph_problems(prepared, graph_dtypes("fp8", ["clip", "transformer"])) == []
    # a second call finds nothing to do
    logged.clear()
    export_missing_graphs(sources["tiny-dev"], folder, "fp8", ["clip", "transformer"], calibration, log=logged.append)
    assert logged == []


def test_build_engine_drives_tensorrt_through_polygraphy(tmp_path, sources, exports):
    """polygraphy's real NetworkFromOnnxPath, CreateConfig and EngineBytesFromNetwork over the stand-in TensorRT
    (tests/standin_tensorrt.py): what the plan was built with is what we asked for."""
    from standin_tensorrt import read_plan

    import fluxexport.tensorrt.builder as builder

    spec = component_specs(sources["tiny-dev"])["transformer"]
    options = BuildOptions("bf16", ExportBounds.for_model(sources["tiny-dev"]), resolution_buckets=2, refittable=True,
                           weight_streaming=True, workspace_gib=1.5)  # fmt: skip
    built = build_profiles(sources["tiny-dev"], "transformer", options.profile_bounds())
    onnx_path = exports["tiny-dev"] / "transformer.onnx"
    with standin_tensorrt():
        seconds = builder.build_engine(onnx_path, tmp_path / "t.plan", built, options, tmp_path / "timing.cache")
    assert seconds >= 0
    plan = read_plan(tmp_path / "t.plan")
    assert plan["source"] == str(onnx_path) and plan["strongly_typed"]  # external data found beside it
    assert {"REFIT", "WEIGHT_STREAMING", "TF32"} <= set(plan["flags"]) and plan["optimization_level"] == 3
    assert plan["memory_pools"]["WORKSPACE"] == int(1.5 * 2**30)
    assert [set(profile) for profile in plan["profiles"]] == [{t.name for t in spec.inputs}] * 2
    # buckets 64–544 px and 544–1024 px: N = (side/16)² tokens, tied between hidden_states and img_ids
    assert [profile["img_ids"] for profile in plan["profiles"]] == [
        [[16, 3], [256, 3], [1156, 3]],
        [[1156, 3], [1156, 3], [4096, 3]],
    ]
    assert (tmp_path / "timing.cache").read_bytes() == b"standin-timing-cache"  # persisted for the next build
    with standin_tensorrt():  # the next build loads it
        builder.build_engine(onnx_path, tmp_path / "u.plan", built, options, tmp_path / "timing.cache")
    assert read_plan(tmp_path / "u.plan")["timing_cache"] == "standin-timing-cache"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_profile_naming_an_input_the_graph_lacks_is_refused(tmp_path, sources, exports):
    """polygraphy checks our profiles against the parsed network's inputs; its error becomes our one line."""
    import fluxexport.tensorrt.builder as builder
    from fluxexport.tensorrt.profiles import Profile

    options = BuildOptions("bf16", ExportBounds.for_model(sources["tiny-dev"]))
    wrong = [Profile({"hidden_states_x": ((1, 16, 64), (1, 256, 64), (2, 4096, 64))})]
    with (
        standin_tensorrt(),
        pytest.raises(FluxExportError, match=r"^TensorRT failed to build transformer\.onnx: Invalid inputs"),
    ):
        builder.build_engine(
            exports["tiny-dev"] / "transformer.onnx", tmp_path / "t.plan", wrong, options, tmp_path / "c"
        )
    assert not (tmp_path / "t.plan").exists()


def test_refit_sets_only_the_lora_weights_by_initializer_name(tmp_path, sources, exports):
    """Kohya LoRA at 0.8 into an fp32 transformer engine `build` wrote: the touched initializer holds the merged
    model's weight as the graph holds it (transposed), every other weight its own value; the base plan stays;
    --reset goes back."""
    from standin_tensorrt import read_plan_weights

    from fluxexport.models.loaders import load_transformer
    from fluxexport.models.lora import parse_lora
    from fluxexport.tensorrt.refit import refit_engines

    source = sources["tiny-dev"]
    lora = _kohya_proj_lora(tmp_path / "kohya.safetensors", source)
    merged_source = source.with_loras([parse_lora(f"{lora}:0.8")])
    engines = build_folder(source, exports["tiny-dev"], tmp_path / "engines", components=["transformer"],
                           refittable=True)  # fmt: skip
    base_plan = engines / "transformer_fp32.trt_10.13.0.35.plan"
    before = base_plan.read_bytes()
    weights = manifest_json(exports["tiny-dev"])["components"]["transformer"]["weights"]
    with standin_tensorrt() as trt:
        refit_engines(merged_source, engines)
        assert trt.IHostMemory.copies == 0  # the serialized plan is written from TensorRT's buffer, never copied
    entry = manifest_json(engines)["components"]["transformer"]
    assert entry["file"] == "transformer_fp32.lora.trt_10.13.0.35.plan" and entry["refitted_weights"] == 1
    refitted, base = read_plan_weights(engines / entry["file"]), read_plan_weights(base_plan)
    changed = [name for name in base if not np.array_equal(base[name], refitted[name])]
    (name,) = changed  # only the one layer the LoRA adapts
    assert weights[name]["tensor"] == "transformer_blocks.0.attn.to_out.0.weight"
    expected = load_transformer(merged_source).transformer_blocks[0].attn.to_out[0].weight.detach().T
    np.testing.assert_allclose(refitted[name], expected.numpy(), rtol=1e-6, atol=1e-6)
    assert base_plan.read_bytes() == before  # the base stays
    after = manifest_json(engines)
    assert after["model"]["fingerprint"] == merged_source.fingerprint()  # run --lora finds these engines
    assert after["model"]["loras"][0]["scale"] == 0.8

    with standin_tensorrt():
        reset = refit_engines(source, engines, reset=True)
    assert reset.components["transformer"].file == "transformer_fp32.trt_10.13.0.35.plan"
    assert reset.model.fingerprint == source.fingerprint() and reset.model.loras == ()
    assert manifest_json(engines) == reset.to_json()  # what it returns is what it wrote
    assert not (engines / "transformer_fp32.lora.trt_10.13.0.35.plan").exists()

    plain = build_folder(source, exports["tiny-dev"], tmp_path / "plain", components=["transformer"])
    with pytest.raises(FluxExportError, match=r"are not refittable: rebuild them with fluxexport build --refittable$"):
        refit_engines(merged_source, plain)


def _kohya_proj_lora(path, source):
    from safetensors.torch import save_file

    from fluxexport.models.loaders import load_transformer

    base = load_transformer(source)
    width = base.config.num_attention_heads * base.config.attention_head_dim
    generator = torch.Generator().manual_seed(4)
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, width, generator=generator),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(width, 2, generator=generator) * 0.01,
               "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(1.0)}, str(path))  # fmt: skip
    return path


def test_refit_refuses_a_lora_on_fp8_weights(tmp_path, sources, fp8_exports):
    """NVIDIA's guidance (ModelOpt, its diffusion demo): fuse a LoRA, then quantize. Refitting it into an FP8 engine
    would quantize the merged weight with the base model's scale (saturating past the base amax): refused in one
    line that gives the commands, before any plan is written; --reset still works."""
    from fluxexport.models.lora import parse_lora
    from fluxexport.tensorrt.refit import refit_engines

    source, folder = sources["tiny-dev"], fp8_exports["tiny-dev"]
    lora = _kohya_proj_lora(tmp_path / "kohya.safetensors", source)
    engines = build_folder(source, folder, tmp_path / "engines", precision="fp8", components=["transformer"],
                           refittable=True)  # fmt: skip
    before = {path.name: path.read_bytes() for path in engines.iterdir()}
    merged_source = source.with_loras([parse_lora(f"{lora}:0.8")])
    with standin_tensorrt(), pytest.raises(FluxExportError) as error:
        refit_engines(merged_source, engines)
    assert str(error.value) == (
        "transformer_fp8.trt_10.13.0.35.plan holds transformer_blocks.0.attn.to_out.0.weight in FP8: a refit would "
        "quantize the LoRA-merged weight with the base model's scale; fuse the LoRAs before quantizing instead "
        f"(fluxexport quantize --model tiny-dev --lora {lora}:0.8 --out NEW_ONNX, then fluxexport build --precision "
        f"fp8 --model tiny-dev --lora {lora}:0.8 --onnx NEW_ONNX), or refit bf16 engines"
    )
    assert {path.name: path.read_bytes() for path in engines.iterdir()} == before  # nothing written
    with standin_tensorrt():
        assert refit_engines(source, engines, reset=True).components["transformer"].file == (
            "transformer_fp8.trt_10.13.0.35.plan"
        )
