"""The TensorRT path as a GPU user runs it, on engine folders `build` itself wrote, over a stand-in TensorRT that
executes each engine with ONNX Runtime (tests/standin_tensorrt.py): the backend's profiles, buffers, contexts and
CUDA graphs, weight streaming, validation, refit and the Triton repository. Images must equal the ONNX Runtime
backend's on the same graphs."""

import gc
import json
import re
import shutil
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import H100, build_folder, manifest_json, standin_tensorrt
from standin_tensorrt import HostDevice, read_plan

from fluxexport.errors import FluxExportError
from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.specs import TRANSFORMER_PARTS, component_specs, sample_inputs
from fluxexport.tensorrt.backend import MAX_SHAPES, TensorRTBackend
from fluxexport.tensorrt.weight_streaming import AUTO_HEADROOM, WeightBudget, automatic_budget, parse_budget

A, B, LARGE = (256, 256), (144, 272), (640, 640)  # LARGE lies in the second resolution bucket (544–1024 px)


@pytest.fixture(scope="module")
def engines(sources, exports, tmp_path_factory):
    """tiny-dev engines in two resolution buckets, refittable, able to stream weights."""
    out = tmp_path_factory.mktemp("trt") / "engines"
    return build_folder(sources["tiny-dev"], exports["tiny-dev"], out, resolution_buckets=2, refittable=True,
                        weight_streaming=True)  # fmt: skip


@pytest.fixture
def trt():
    with standin_tensorrt() as module:
        yield module


def images(backend, source, size, steps=3, seed=1, **kwargs):
    request = GenerationRequest("a red fox", height=size[0], width=size[1], num_inference_steps=steps, seed=seed,
                                **kwargs)  # fmt: skip
    return generate(backend, source, request).images


@pytest.mark.slow
def test_build_writes_the_configured_engines(engines, exports):
    manifest = manifest_json(engines)
    assert manifest["builder"]["bounds"]["max_resolution"] == 1024 and manifest["builder"]["resolution_buckets"] == 2
    transformer = read_plan(engines / manifest["components"]["transformer"]["file"])
    # TF32 stays on (polygraphy's CreateConfig would clear it), strongly typed, refit and streaming as asked
    assert {"TF32", "REFIT", "WEIGHT_STREAMING"} <= set(transformer["flags"]) and transformer["strongly_typed"]
    assert len(transformer["profiles"]) == 2 and transformer["optimization_level"] == 2
    assert transformer["profiles"][1]["img_ids"][2] == [4096, 3]  # 1024² px: (1024/16)² tokens
    assert len(read_plan(engines / manifest["components"]["clip"]["file"])["profiles"]) == 1  # no image axes
    assert (engines / "timing.cache").is_file()


@pytest.mark.slow
def test_images_equal_onnxruntime_at_alternating_sizes_and_buckets(trt, engines, sources, ort_backends):
    """Sizes A, A, B, A, LARGE with CUDA graphs: each repeated shape is captured on a context of its own, a replay
    never follows another shape on its context, and every image equals ONNX Runtime's on the same graphs."""
    source = sources["tiny-dev"]
    backend = TensorRTBackend(source, engines, device=HostDevice(trt))
    for size in (A, A, B, A, LARGE):
        assert np.array_equal(images(backend, source, size), images(ort_backends["tiny-dev"], source, size)), size
    state = trt.state
    assert state.replays > 0 and state.stale_replays == 0 and state.failed_captures == 0
    transformer = backend.runners["transformer"]
    assert len(transformer.captured) == 3  # one context and graph per transformer shape
    assert len({id(c.context) for c in transformer.captured.values()} | {id(transformer.plain)}) == 4
    assert state.errors == []
    # without CUDA graphs: the same images, nothing captured
    plain = TensorRTBackend(source, engines, cuda_graphs=False, device=HostDevice(trt))
    assert np.array_equal(images(plain, source, B), images(backend, source, B))
    assert not plain.runners["transformer"].captured


@pytest.mark.slow
def test_the_stand_in_catches_a_graph_replayed_after_another_shape(trt, engines, sources):
    """What the backend did before: one context, a graph captured for A, then B run on the same context, then A
    replayed — wrong answers (NaN here). The stand-in must see it, or the test above proves nothing."""
    import torch

    from fluxexport.specs import component_specs, sample_inputs

    manifest = manifest_json(engines)
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(
        (engines / manifest["components"]["vae_decoder"]["file"]).read_bytes()
    )
    context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    memory = torch.empty(engine.device_memory_size_v2, dtype=torch.uint8)
    context.set_device_memory(memory.data_ptr(), memory.numel())
    spec = component_specs(sources["tiny-dev"])["vae_decoder"]
    device = HostDevice(trt)

    def bind(side):
        latent = sample_inputs(spec, {"B": 1, "h": side, "w": side})["latent"]
        context.set_input_shape("latent", tuple(latent.shape))
        out = torch.empty(context.get_tensor_shape("images"), dtype=torch.float32)
        context.set_tensor_address("latent", latent.data_ptr())
        context.set_tensor_address("images", out.data_ptr())
        return latent, out

    a = bind(16)
    assert context.execute_async_v3(0)
    with device.capture() as holder:
        assert context.execute_async_v3(0)
    holder.graph.replay()
    assert torch.isfinite(a[1]).all() and trt.state.stale_replays == 0
    b = bind(24)  # noqa: F841 - keeps B's buffers alive while it runs
    assert context.execute_async_v3(0)
    holder.graph.replay()  # A's graph, after the context ran B
    assert trt.state.stale_replays == 1 and torch.isnan(a[1]).all()
    # capturing right after a shape change (no launch in between) is refused
    bind(16)
    with pytest.raises(RuntimeError), device.capture():
        if not context.execute_async_v3(0):
            raise RuntimeError("capture failed")
    assert "cannot be captured" in trt.state.errors[-1]


@pytest.mark.slow
def test_a_new_memory_block_drops_the_graphs_and_low_vram_keeps_one_engine(trt, engines, sources, ort_backends):
    source = sources["tiny-dev"]
    device = HostDevice(trt)
    backend = TensorRTBackend(source, engines, device=device)
    transformer = backend.component("transformer")
    reference = images(ort_backends["tiny-dev"], source, A)
    assert np.array_equal(images(backend, source, A), reference)
    assert transformer.captured
    # a component needing more scratch than the block holds: a new block, every context rebound
    transformer.memory = None
    backend.shared_memory = device.memory_block(16)
    for runner in backend.runners.values():
        runner.bind_memory(backend.shared_memory)
    assert not transformer.captured  # graphs pointed into the old block
    backend.runners.pop("vae_decoder")
    backend.component("vae_decoder")  # needs more than 16 bytes: the block grows and everything is rebound
    assert backend.shared_memory.numel() > 16 and transformer.memory is backend.shared_memory
    assert np.array_equal(images(backend, source, A), reference) and trt.state.stale_replays == 0
    backend.close()
    del backend, transformer
    gc.collect()
    before = trt.state.live_engines

    low = TensorRTBackend(source, engines, low_vram=True, device=HostDevice(trt))
    assert np.array_equal(images(low, source, A), reference)
    gc.collect()
    assert len(low.runners) == 1 and trt.state.live_engines == before + 1  # the others were freed as each stage began


@pytest.mark.slow
def test_a_failing_capture_falls_back_to_plain_launches(trt, engines, sources, ort_backends):
    source = sources["tiny-dev"]
    device = HostDevice(trt)
    capture = device.capture

    def failing_capture():
        trt.state.fail_launches = 1  # the launch inside the capture fails
        return capture()

    device.capture = failing_capture
    backend = TensorRTBackend(source, engines, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = images(backend, source, A)
    assert np.array_equal(ours, images(ort_backends["tiny-dev"], source, A))
    assert [str(w.message) for w in caught if "CUDA graph" in str(w.message)] == [
        "transformer: no CUDA graph for shapes ((1, 256, 64), (1, 512, 32), (1, 32), (1,), (256, 3), (512, 3), (1,)) "
        "(execute_async_v3 failed inside the capture); running them without one"
    ]
    assert trt.state.failed_captures == 1 and not backend.runners["transformer"].captured
    images(backend, source, A)
    assert trt.state.failed_captures == 1  # never tried again for that shape


@pytest.mark.slow
def test_refusals_of_the_runtime_are_one_line(trt, engines, sources, monkeypatch):
    source = sources["tiny-dev"]
    backend = TensorRTBackend(source, engines, device=HostDevice(trt))
    trt.state.fail_launches = 1
    with pytest.raises(FluxExportError, match=r"^TensorRT failed to run clip \(see its log above\)$"):
        images(backend, source, A)
    monkeypatch.setattr(trt.IExecutionContext, "set_tensor_address", lambda self, name, address: False)
    with pytest.raises(FluxExportError, match=r"^TensorRT refused to bind input_ids for clip \(see its log above\)$"):
        images(backend, source, A)


@pytest.mark.slow
def test_weight_streaming_budget_is_set_before_any_context(trt, engines, exports, sources, ort_backends, tmp_path):
    source = sources["tiny-dev"]
    backend = TensorRTBackend(source, engines, weight_streaming_budget=parse_budget("50%"), device=HostDevice(trt))
    assert np.array_equal(images(backend, source, A), images(ort_backends["tiny-dev"], source, A))
    budget, streamable = backend.streamed["transformer"]
    assert streamable > 0 and budget == streamable // 2
    assert backend.runners["transformer"].engine.weight_streaming_budget_v2 == budget
    assert not backend.runners["transformer"].captured  # a streaming launch is not capturable: no graphs
    assert trt.state.errors == []  # the budget was accepted: set before any context existed
    # engines built without --weight-streaming refuse a budget in one line
    plain = build_folder(source, exports["tiny-dev"], tmp_path / "plain", components=["clip"])
    with pytest.raises(FluxExportError) as error:
        TensorRTBackend(source, plain, weight_streaming_budget=WeightBudget("auto"), device=HostDevice(trt))
    assert str(error.value) == (
        f"the engines in {plain} were built without --weight-streaming: rebuild them with fluxexport build "
        "--weight-streaming, or run without --weight-streaming-budget"
    )


@pytest.mark.parametrize(("text", "budget"), [("auto", WeightBudget("auto")), ("50%", WeightBudget("percent", 50)),
                                              ("12GiB", WeightBudget("bytes", 12 * 2**30)),
                                              ("8000MB", WeightBudget("bytes", 8e9)), ("4096", WeightBudget("bytes", 4096))])  # fmt: skip
def test_weight_streaming_budgets_parse(text, budget):
    assert parse_budget(text) == budget
    assert WeightBudget("percent", 25).bytes_for(1000, 700) == 250 and WeightBudget("auto").bytes_for(1000, 700) == 700
    assert WeightBudget("bytes", 5000).bytes_for(1000, 700) == 1000


@pytest.mark.parametrize("text", ["lots", "150%", "12 parsecs"])
def test_bad_weight_streaming_budgets_are_refused(text):
    with pytest.raises(FluxExportError, match=r"^--weight-streaming-budget takes BYTES \(e\.g\. 12GiB, 8000MB\)"):
        parse_budget(text)


@pytest.mark.slow
def test_run_on_the_engines_from_the_command_line(trt, engines, sources, ort_backends, monkeypatch, tmp_path):
    """`run --backend tensorrt` on a built folder (the CUDA calls on the host), its image equal to ONNX Runtime's."""
    from PIL import Image

    import fluxexport.tensorrt.cuda as cuda
    from fluxexport.cli import main

    monkeypatch.setattr(cuda, "CudaDevice", lambda: HostDevice(trt))
    common = ["run", "--model", "tiny-dev", "--prompt", "a red fox", "--steps", "3", "--seed", "1"]
    result = CliRunner().invoke(main, [*common, "--backend", "tensorrt", "--engines", str(engines),
                                       "--weight-streaming-budget", "auto", "--output", str(tmp_path / "trt.png")])  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = images(ort_backends["tiny-dev"], sources["tiny-dev"], A)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "trt.png"))[None], expected)
    bad = CliRunner().invoke(main, [*common, "--backend", "tensorrt", "--engines", str(engines),
                                    "--weight-streaming-budget", "lots"])  # fmt: skip
    assert bad.exit_code == 1 and bad.output.startswith("Error: --weight-streaming-budget takes BYTES")
    wrong = CliRunner().invoke(main, [*common, "--backend", "torch", "--no-cuda-graphs"])
    assert wrong.exit_code == 1 and wrong.output == "Error: --no-cuda-graphs applies to --backend tensorrt only\n"


@pytest.mark.slow
def test_validate_engines_in_every_bucket(trt, engines, sources):
    from fluxexport.validate.engines import validate_engines

    report, reference = validate_engines(sources["tiny-dev"], engines, steps=2, device=HostDevice(trt))
    assert reference == "fp32" and report.passed, [c for c in report.components if not c.passed]
    against_onnxruntime = [c for c in report.components if c.against == "onnxruntime"]
    assert {c.component for c in against_onnxruntime} == set(manifest_json(engines)["components"])
    # the large validation shape of the VAE lies in the second profile: it ran there
    decoder = [c for c in against_onnxruntime if c.component == "vae_decoder"]
    assert max(c.sizes["h"] for c in decoder) * 8 > 544 and all(c.rel_l2 < 1e-5 for c in decoder)
    assert {c.against for c in report.components} == {"pytorch", "onnxruntime"} and report.images


def _lora(path, source):
    import torch
    from safetensors.torch import save_file

    from fluxexport.models.loaders import load_transformer

    config = load_transformer(source).config
    width = config.num_attention_heads * config.attention_head_dim
    generator = torch.Generator().manual_seed(4)
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, width, generator=generator),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(width, 2, generator=generator) * 0.2,
               "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(1.0)}, str(path))  # fmt: skip
    return path


@pytest.mark.slow
def test_refit_then_run_and_validate(trt, engines, sources, exports, tmp_path):
    """Refit a LoRA into the built engines: TensorRT asks for every other weight too (the stand-in does), which
    refit supplies from the graph; the refitted engines run the LoRA exactly as ONNX Runtime swaps it into the
    same graphs, and validate compares them with that graph, not with the base one."""
    from fluxexport.models.lora import parse_lora
    from fluxexport.tensorrt.refit import refit_engines
    from fluxexport.validate.engines import validate_engines

    source = sources["tiny-dev"]
    folder = tmp_path / "engines"
    shutil.copytree(engines, folder)
    merged = source.with_loras([parse_lora(f"{_lora(tmp_path / 'style.safetensors', source)}:0.8")])
    refitted_folder = refit_engines(merged, folder)
    assert refitted_folder.components["transformer"].refitted_weights == 1  # the one layer the LoRA adapts
    swapped = OnnxRuntimeBackend(merged, exports["tiny-dev"])
    refitted = TensorRTBackend(merged, folder, device=HostDevice(trt))
    ours = images(refitted, merged, A)
    assert np.array_equal(ours, images(swapped, merged, A))
    base = OnnxRuntimeBackend(source, exports["tiny-dev"])
    assert not np.array_equal(ours, images(base, source, A))  # the LoRA changes the image
    report, _ = validate_engines(merged, folder, components=["transformer"], steps=2, device=HostDevice(trt))
    rows = [c for c in report.components if c.against == "onnxruntime"]
    assert rows and all(c.passed and c.rel_l2 < 1e-5 for c in rows)


def _proj_out_lora(path, source):
    """A PEFT LoRA on `proj_out`, a layer the FP8 recipe keeps in high precision."""
    import torch
    from safetensors.torch import save_file

    from fluxexport.models.loaders import load_transformer

    out, width = load_transformer(source).proj_out.weight.shape
    generator = torch.Generator().manual_seed(5)
    save_file({"transformer.proj_out.lora_A.weight": torch.randn(2, width, generator=generator),
               "transformer.proj_out.lora_B.weight": torch.randn(out, 2, generator=generator) * 0.2}, str(path))  # fmt: skip
    return path


@pytest.mark.slow
def test_fp8_refit_of_a_high_precision_layer_equals_the_fp8_swap(trt, sources, fp8_exports, tmp_path):
    """An FP8 transformer engine built from quantize's graph takes a LoRA on a layer the recipe keeps in high
    precision (the FP8 weights TensorRT asks for again are set to the graph's own bytes): it answers as the ONNX
    Runtime swap into the same graph, at two shapes. A LoRA on an FP8 weight is refused (test_tensorrt_plan)."""
    from fluxexport.models.lora import parse_lora
    from fluxexport.tensorrt.refit import refit_engines

    source = sources["tiny-dev"]
    folder = build_folder(source, fp8_exports["tiny-dev"], tmp_path / "fp8", precision="fp8",
                          components=["transformer"], refittable=True)  # fmt: skip
    merged = source.with_loras([parse_lora(f"{_proj_out_lora(tmp_path / 'out.safetensors', source)}:0.8")])
    assert refit_engines(merged, folder).components["transformer"].refitted_weights == 1
    refitted = TensorRTBackend(merged, folder, device=HostDevice(trt)).component("transformer")
    swapped = OnnxRuntimeBackend(merged, fp8_exports["tiny-dev"], fp8=True).component("transformer")
    base = OnnxRuntimeBackend(source, fp8_exports["tiny-dev"], fp8=True).component("transformer")
    spec = component_specs(source)["transformer"]
    for index, sizes in enumerate(({"B": 1, "N": 256, "L": 40}, {"B": 2, "N": 96, "L": 77})):
        feeds = sample_inputs(spec, sizes, seed=index)
        ours = refitted(feeds)["latent"]
        assert torch.equal(ours, swapped(feeds)["latent"])
        assert not torch.equal(ours, base(feeds)["latent"])  # the LoRA is in


@pytest.mark.slow
def test_refit_refusals_name_the_weight(trt, engines, sources, tmp_path, monkeypatch):
    from fluxexport.models.lora import parse_lora
    from fluxexport.tensorrt.refit import refit_engines

    source = sources["tiny-dev"]
    folder = tmp_path / "engines"
    shutil.copytree(engines, folder)
    merged = source.with_loras([parse_lora(f"{_lora(tmp_path / 'style.safetensors', source)}:0.8")])
    prototype = trt.Refitter.get_weights_prototype
    monkeypatch.setattr(trt.Refitter, "get_weights_prototype",
                        lambda self, name: trt.Weights(trt.DataType.FLOAT, 0, -1) if "to_out" in name
                        else prototype(self, name))  # fmt: skip
    with pytest.raises(FluxExportError) as error:
        refit_engines(merged, folder)
    assert str(error.value).startswith("transformer_fp32.trt_10.13.0.35.plan: TensorRT folded ")
    assert str(error.value).endswith(
        "into other layers at build time, so it cannot be refitted: merge this LoRA at export instead "
        "(fluxexport export --lora)"
    )
    assert manifest_json(folder)["model"]["loras"] == []  # nothing changed


@pytest.mark.slow
def test_refittable_builds_refused_on_tensorrt_11_3(sources, exports, tmp_path):
    with pytest.raises(FluxExportError) as error:
        build_folder(sources["tiny-dev"], exports["tiny-dev"], tmp_path / "e", tensorrt="11.3.0.1", refittable=True)
    assert str(error.value) == (
        "TensorRT 11.3.0.1 may drop a GEMM bias from engines built refittable (a known issue of its release "
        "notes): build --refittable with another TensorRT release, or merge LoRAs at export (export --lora)"
    )
    assert not (tmp_path / "e").exists()
    build_folder(sources["tiny-dev"], exports["tiny-dev"], tmp_path / "f", tensorrt="11.3.0.1", components=["clip"])


@pytest.mark.slow
def test_triton_repository_from_built_engines_serves_every_bucket(engines, sources):
    """`fluxexport triton --engines` on a folder `build` wrote (it raised KeyError: 'resolution' before): every
    plan model lists every profile of its plan, so Triton serves all resolution buckets."""
    from test_triton import parse

    from fluxexport.specs import component_specs
    from fluxexport.triton.repository import write_repository

    repository = write_repository(sources["tiny-dev"], engines, engines.parent / "repository")
    specs = component_specs(sources["tiny-dev"])
    manifest = manifest_json(engines)
    for name in ("clip", "t5", "transformer", "vae_decoder"):
        config = parse(repository / name, specs[name])
        assert config.platform == "tensorrt_plan"
        expected = ["0", "1"] if name in ("transformer", "vae_decoder") else ["0"]
        assert list(config.instance_group[0].profile) == expected
        plan = (repository / name / "1" / "model.plan").read_bytes()
        assert plan == (engines / manifest["components"][name]["file"]).read_bytes()
    settings = json.loads((repository / "flux_pipeline" / "1" / "pipeline.json").read_text())
    bounds = {key: settings["bounds"][key] for key in ("min_resolution", "max_resolution", "max_batch")}
    assert bounds == {"min_resolution": 64, "max_resolution": 1024, "max_batch": 2}  # (and the reference budget)


@pytest.mark.slow
def test_engines_for_another_gpu_are_refused(trt, engines, sources):
    with pytest.raises(FluxExportError, match=r"built for NVIDIA H100 80GB HBM3 \(compute capability 9\.0\), this "
                       r"GPU is stand-in GPU \(8\.9\): rebuild them on this GPU"):  # fmt: skip
        TensorRTBackend(sources["tiny-dev"], engines, device=HostDevice(trt, compute_capability=(8, 9)))
    assert H100.compute_capability == (9, 0)


@pytest.mark.slow
def test_an_fp8_weight_needs_an_fp8_prototype(trt, sources, fp8_exports, tmp_path, monkeypatch):
    """Quantized bytes set into a weight the engine holds in another type would be read as numbers of that type."""
    from fluxexport.models.lora import parse_lora
    from fluxexport.tensorrt.refit import refit_engines

    source = sources["tiny-dev"]
    folder = build_folder(source, fp8_exports["tiny-dev"], tmp_path / "fp8", precision="fp8",
                          components=["transformer"], refittable=True)  # fmt: skip
    prototype = trt.Refitter.get_weights_prototype

    def as_bf16(self, name):
        found = prototype(self, name)
        return trt.Weights(trt.DataType.BF16, 0, found.size) if found.dtype == trt.DataType.FP8 else found

    monkeypatch.setattr(trt.Refitter, "get_weights_prototype", as_bf16)
    merged = source.with_loras([parse_lora(f"{_proj_out_lora(tmp_path / 'out.safetensors', source)}:0.8")])
    with pytest.raises(FluxExportError) as error:
        refit_engines(merged, folder)
    assert re.fullmatch(
        r"transformer_fp8\.trt_10\.13\.0\.35\.plan: model\.\S+\.weight\.fp8 is an FP8 weight of the graph, but the "
        r"engine holds it as BF16: rebuild the engine from this graph \(fluxexport build --refittable\)",
        str(error.value),
    ), str(error.value)


@pytest.mark.slow
def test_an_automatic_budget_past_2_gib_is_computed_from_free_memory(trt, engines, sources, ort_backends):
    """The binding returns TensorRT's automatic budget cast to int32: 3 GiB comes back as -1 GiB (refused before,
    on every FLUX engine). `auto` computes the budget from the GPU's free memory instead: on an 80 GB GPU every
    weight stays (nothing streams, CUDA graphs on); with room for a third of the weights beside the engine's
    scratch and the margin, a third stays and the rest streams."""
    from fluxexport.tensorrt.backend import _device_memory_size

    trt.state.automatic_budget = 3 * 2**30
    source = sources["tiny-dev"]
    manifest = manifest_json(engines)
    plan = (engines / manifest["components"]["transformer"]["file"]).read_bytes()
    assert trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan).get_weight_streaming_automatic_budget() == -(2**30)
    expected = images(ort_backends["tiny-dev"], source, A)
    roomy = TensorRTBackend(source, engines, weight_streaming_budget=WeightBudget("auto"), device=HostDevice(trt))
    assert np.array_equal(images(roomy, source, A), expected)
    budget, streamable = roomy.streamed["transformer"]
    assert budget == streamable > 0 and roomy.runners["transformer"].captured and trt.state.errors == []

    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)
    scratch = _device_memory_size(engine) + engine.weight_streaming_scratch_memory_size
    device = HostDevice(trt, free_bytes=AUTO_HEADROOM + scratch + streamable // 3)
    tight = TensorRTBackend(source, engines, weight_streaming_budget=WeightBudget("auto"), device=device)
    transformer = tight.component("transformer")  # the first engine: no shared scratch held yet
    assert tight.streamed["transformer"] == (streamable // 3, streamable)
    assert transformer.engine.weight_streaming_budget_v2 == streamable // 3 and not transformer.use_cuda_graphs
    assert np.array_equal(images(tight, source, A), expected) and trt.state.errors == []


@pytest.mark.slow
def test_engines_with_nothing_streamable_take_any_budget(trt, engines, sources, ort_backends):
    """TensorRT may find nothing to stream in an engine built with --weight-streaming (streamable size 0): no budget
    is set on it (TensorRT would refuse one), and the transformer keeps its CUDA graphs."""
    trt.state.streamable_bytes = 0
    source = sources["tiny-dev"]
    for budget in ("auto", "50%", "1GiB"):
        backend = TensorRTBackend(source, engines, weight_streaming_budget=parse_budget(budget), device=HostDevice(trt))
        assert np.array_equal(images(backend, source, A), images(ort_backends["tiny-dev"], source, A))
        assert backend.streamed == {} and backend.runners["transformer"].captured and trt.state.errors == []


def test_the_automatic_budget_is_what_free_memory_holds():
    assert automatic_budget(10 * 2**30, 2**30) == 10 * 2**30 - 2**30 - AUTO_HEADROOM
    assert automatic_budget(2**30, 2**30) == 0  # less free than scratch and margin: everything streams
    auto = WeightBudget("auto")
    assert auto.bytes_for(1000, 10**12) == 1000 and auto.bytes_for(1000, 400) == 400 and auto.bytes_for(1000, -5) == 0


def _polygraphy_forgets_tensorrt() -> None:
    """polygraphy's lazy modules import `tensorrt` once per process and keep it: make them import it again (the
    stand-in of the build at hand)."""
    import sys

    for name, module in list(sys.modules.items()):
        if name.startswith("polygraphy"):
            for value in list(vars(module).values()):
                held = vars(value).get("module") if type(value).__name__ == "LazyModule" else None
                if getattr(held, "__name__", None) == "tensorrt":
                    object.__setattr__(value, "module", None)


@pytest.mark.slow
def test_tensorrt_11_contexts_need_no_runtime_config_kept_alive(sources, exports, tmp_path):
    """TensorRT 11: a context made from `create_runtime_config()` does not keep that config alive (the binding's
    keep_alive ties the context to the engine only); the stand-in refuses to run a context whose config was freed.
    The backend creates its contexts with the strategy overload (as trtexec does), so nothing dangles."""
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    source = sources["tiny-dev"]
    _polygraphy_forgets_tensorrt()  # or it builds with the first stand-in it saw, another version
    folder = build_folder(source, exports["tiny-dev"], tmp_path / "engines", tensorrt="11.1.0.4",
                          components=["vae_decoder"])  # fmt: skip
    _polygraphy_forgets_tensorrt()
    feeds = sample_inputs(component_specs(source)["vae_decoder"], {"B": 1, "h": 32, "w": 32})
    expected = OnnxRuntimeBackend(source, exports["tiny-dev"]).component("vae_decoder")(feeds)["images"]
    with standin_tensorrt("11.1.0.4") as trt, TensorRTBackend(source, folder, device=HostDevice(trt)) as backend:
        decoder = backend.component("vae_decoder")
        gc.collect()
        assert torch.equal(decoder(feeds)["images"], expected) and torch.equal(decoder(feeds)["images"], expected)
        assert trt.state.errors == []


@pytest.mark.slow
def test_a_refused_profile_switch_is_one_line_and_capture_falls_back(trt, engines, sources, ort_backends,
                                                                     monkeypatch):  # fmt: skip
    """The binding raises RuntimeError from `set_optimization_profile_async` (it never returns False): on the plain
    context that is a one-line refusal naming the engine, the profile and the shapes; on the context a CUDA graph
    would be captured on, the shape runs without a graph, as for any failing capture."""
    source = sources["tiny-dev"]
    switch = trt.IExecutionContext.set_optimization_profile_async

    def refused(self, index, stream):
        raise RuntimeError("Error in set optimization profile async.")

    monkeypatch.setattr(trt.IExecutionContext, "set_optimization_profile_async", refused)
    backend = TensorRTBackend(source, engines, device=HostDevice(trt))
    with pytest.raises(FluxExportError) as error:
        images(backend, source, A)
    assert str(error.value) == (
        "TensorRT refused optimization profile 0 of clip (clip_fp32.trt_10.13.0.35.plan) for input_ids (1, 77) "
        "(see its log above)"
    )

    def refused_beside_the_plain_context(self, index, stream):
        if any(other.ordinal < self.ordinal for other in self.engine.contexts):  # not the engine's first context
            raise RuntimeError("Error in set optimization profile async.")
        return switch(self, index, stream)

    monkeypatch.setattr(trt.IExecutionContext, "set_optimization_profile_async", refused_beside_the_plain_context)
    backend = TensorRTBackend(source, engines, device=HostDevice(trt))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert np.array_equal(images(backend, source, A), images(ort_backends["tiny-dev"], source, A))
        images(backend, source, A)
    (warning,) = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]  # once: never tried again
    assert warning.startswith("transformer: no CUDA graph for shapes ((1, 256, 64), ")
    assert "(TensorRT refused optimization profile 0 of transformer (transformer_fp32.trt_10.13.0.35.plan) " in warning
    assert not backend.runners["transformer"].captured and trt.state.stale_replays == 0


@pytest.mark.slow
def test_buffers_of_twenty_shapes_stay_bounded(trt, engines, sources, ort_backends):
    """A server sees many sizes: each engine keeps the buffers of its MAX_SHAPES most recently used shapes only,
    with the contexts and graphs captured on them; an evicted shape gets new buffers and the right answer."""
    source = sources["tiny-dev"]
    backend = TensorRTBackend(source, engines, device=HostDevice(trt))
    transformer = backend.component("transformer")
    reference = ort_backends["tiny-dev"].component("transformer")
    spec = component_specs(source)["transformer"]
    feeds = [sample_inputs(spec, {"B": 1, "N": 96 + 8 * index, "L": 40}, seed=index) for index in range(20)]
    for index, shape in enumerate([*feeds, feeds[-1], feeds[0]]):
        for _ in range(2):  # the second call of a shape captures it
            assert torch.equal(transformer(shape)["latent"], reference(shape)["latent"]), index
    keys = list(transformer.buffers)
    assert len(keys) == MAX_SHAPES == 8 and set(transformer.captured) <= set(keys)
    assert [key[0][1] for key in keys] == [96 + 8 * index for index in (13, 14, 15, 16, 17, 18, 19, 0)]
    assert set(transformer.calls) <= set(keys) and len(transformer.captured) == MAX_SHAPES
    assert trt.state.replays > 0 and trt.state.stale_replays == 0 and trt.state.errors == []


@pytest.mark.slow
def test_low_vram_loads_each_part_engine_once_per_generation(trt, sources, parts_export, parts_engines):
    """`--low-vram --cache first-block`: the head, tail and output engines run at every step; they stay in memory
    together (the transformer's size) instead of being read from disk again at each step (the head was loaded 9
    times in 8 steps)."""
    from fluxexport.runtime.cache import parse_cache

    source, graphs, engines = sources["tiny-dev"], parts_export, parts_engines  # conftest's session fixtures
    cache = parse_cache("first-block:threshold=0.2")
    request = GenerationRequest("a red fox", height=256, width=256, num_inference_steps=8, seed=2,
                                guidance_scale=3.5)  # fmt: skip
    backend = TensorRTBackend(source, engines, low_vram=True, device=HostDevice(trt))
    loads: Counter[str] = Counter()
    load = backend._load
    backend._load = lambda name: loads.update([name]) or load(name)  # type: ignore[method-assign]
    ours = generate(backend, source, request, cache=cache)
    assert loads == Counter(["clip", "t5", "vae_decoder", *TRANSFORMER_PARTS])  # each once
    assert set(backend.runners) == {"vae_decoder"}  # still one component's engines at a time
    with OnnxRuntimeBackend(source, graphs) as reference:
        expected = generate(reference, source, request, cache=cache)
    assert ours.computed_steps == expected.computed_steps < 8
    assert np.array_equal(ours.images, expected.images)
