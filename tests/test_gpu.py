"""The TensorRT path on a GPU (`pytest -m gpu`): two resolution buckets, alternating sizes with CUDA graphs, weight
streaming, --low-vram, refit against a build with the LoRA merged, step caches on the part engines, the FLUX.2 tiny
models. They skip here ('needs an NVIDIA GPU and TensorRT').

Every TensorRT test body runs twice: on real TensorRT and a GPU (`rig` "tensorrt", marked gpu), and on this machine
over the stand-in TensorRT (tests/standin_tensorrt.py: it replaces only TensorRT, its plans run in ONNX Runtime on
the host), so that each body is exercised where no GPU exists. Both build engines with `build`'s own code and run
them with the public backend; the stand-in's images must equal ONNX Runtime's on the same graphs bit for bit, real
TensorRT's (TF32, its own kernels) must be within the PSNR or rel-L2 each test names. Properties of one engine
folder (CUDA graphs against none, --low-vram against the default) are bit for bit on both."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from helpers import build_folder, manifest_json, standin_tensorrt, write_peft

from fluxexport.compare import psnr
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.tensorrt.environment import tensorrt_available

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and tensorrt_available()), reason="needs an NVIDIA GPU and TensorRT"
)
A, B, LARGE, WIDE = (256, 256), (144, 272), (640, 640), (576, 768)  # LARGE, WIDE: the second bucket (544–1024 px)


@dataclass
class Rig:
    """Where the engines are built and run: real TensorRT on this host's GPU, or the stand-in on the host."""

    trt: ModuleType | None  # the stand-in module, None for real TensorRT

    @property
    def real(self) -> bool:
        return self.trt is None

    def build(self, source, onnx_folder: Path, out: Path, components=None, **options) -> Path:
        """Engines from `onnx_folder` by `build`'s own code: fp32 (TF32 on a GPU), the export's bounds, batch 2."""
        from fluxexport.specs import ExportBounds
        from fluxexport.tensorrt.builder import BuildOptions, build_engines

        options.setdefault("precision", "fp32")
        options.setdefault("bounds", ExportBounds.for_model(source, max_batch=2))
        options.setdefault("optimization_level", 2)
        if not self.real:
            return build_folder(source, onnx_folder, out, components=components, **options)
        build_engines(source, onnx_folder, out, BuildOptions(**options), components)
        return out

    def backend(self, source, engines: Path, **options):
        from fluxexport.tensorrt.backend import TensorRTBackend

        if not self.real:
            from standin_tensorrt import HostDevice

            options["device"] = HostDevice(self.trt)
        return TensorRTBackend(source, engines, **options)

    def assert_images_close(self, ours: np.ndarray, reference: np.ndarray, min_psnr: float, what: str) -> None:
        """Stand-in: bit for bit (the same graphs in the same ONNX Runtime); GPU: at least `min_psnr` dB."""
        assert ours.shape == reference.shape, what
        if self.real:
            assert psnr(ours, reference) >= min_psnr, f"{what}: {psnr(ours, reference):.1f} dB < {min_psnr}"
        else:
            assert np.array_equal(ours, reference), what

    def rel_l2_limit(self) -> float:
        return 2e-3 if self.real else 1e-6  # TF32 matmuls on the GPU; float32 rounding of the merge on the host


@pytest.fixture(scope="module", params=["standin", pytest.param("tensorrt", marks=[pytest.mark.gpu, needs_gpu])])
def rig(request):
    if request.param == "tensorrt":
        yield Rig(None)
        return
    with standin_tensorrt() as trt:
        yield Rig(trt)


def images(backend, source, size, steps=3, seed=1, cache=None, **kwargs):
    request = GenerationRequest("a red fox", height=size[0], width=size[1], num_inference_steps=steps, seed=seed,
                                **kwargs)  # fmt: skip
    return generate(backend, source, request, cache=cache).images


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def dev_engines(rig, sources, exports, tmp_path_factory):
    """tiny-dev engines in two resolution buckets, able to stream weights."""
    out = tmp_path_factory.mktemp("gpu-trt") / "engines"
    return rig.build(sources["tiny-dev"], exports["tiny-dev"], out, resolution_buckets=2, weight_streaming=True)


# ---- FLUX.1 on the engines ----------------------------------------------------------------------------------------


def test_alternating_sizes_in_two_buckets_with_cuda_graphs(rig, dev_engines, sources, ort_backends):
    """Sizes alternating between the buckets in one process: one CUDA graph per transformer shape, every image equal
    to the same engines without CUDA graphs bit for bit, and to ONNX Runtime on the same graphs (35 dB on a GPU)."""
    source = sources["tiny-dev"]
    assert manifest_json(dev_engines)["builder"]["resolution_buckets"] == 2
    sizes = [A, LARGE, B, A, WIDE, LARGE]
    with rig.backend(source, dev_engines) as graphs:
        captured = [images(graphs, source, size, seed=i) for i, size in enumerate(sizes)]
        assert len(graphs.runners["transformer"].captured) == 4  # A, LARGE, B, WIDE: one graph each
    with rig.backend(source, dev_engines, cuda_graphs=False) as plain:
        for i, (size, image) in enumerate(zip(sizes, captured, strict=True)):
            assert np.array_equal(image, images(plain, source, size, seed=i)), size
        assert not plain.runners["transformer"].captured
    for i, (size, image) in enumerate(zip(sizes, captured, strict=True)):
        rig.assert_images_close(image, images(ort_backends["tiny-dev"], source, size, seed=i), 35, f"{size}")


def test_weight_streaming_at_half_the_weights(rig, dev_engines, sources):
    """A 50% budget streams half of the transformer's streamable weights (no CUDA graphs then), and gives the
    unstreamed images in both buckets (40 dB on a GPU)."""
    from fluxexport.tensorrt.weight_streaming import parse_budget

    source = sources["tiny-dev"]
    with rig.backend(source, dev_engines, cuda_graphs=False) as plain:
        expected = {size: images(plain, source, size) for size in (A, LARGE)}
    with rig.backend(source, dev_engines, weight_streaming_budget=parse_budget("50%")) as streamed:
        for size, image in expected.items():
            rig.assert_images_close(images(streamed, source, size), image, 40, f"streamed {size}")
        budget, streamable = streamed.streamed["transformer"]
        assert streamable > 0 and abs(budget - streamable / 2) <= 1
        assert streamed.runners["transformer"].engine.weight_streaming_budget_v2 == budget
        assert not streamed.runners["transformer"].captured  # a streaming launch is not capturable


def test_low_vram_keeps_one_engine_and_the_images(rig, dev_engines, sources):
    source = sources["tiny-dev"]
    with rig.backend(source, dev_engines) as default:
        expected = {size: images(default, source, size) for size in (A, LARGE)}
        assert len(default.runners) == 4  # clip, t5, transformer, vae_decoder stay loaded
    with rig.backend(source, dev_engines, low_vram=True) as low:
        for size, image in expected.items():
            assert np.array_equal(images(low, source, size), image), size
        assert list(low.runners) == ["vae_decoder"]  # each stage freed the engine before it


def test_refit_equals_a_build_with_the_lora_merged(rig, sources, exports, tmp_path):
    """A LoRA refitted into refittable engines answers as engines built from the graph exported with the LoRA merged
    (`export --lora`), at two shapes, and not as the base engine; its images equal ONNX Runtime with the LoRA
    swapped into the same graphs."""
    from fluxexport.export.onnx_export import export_model
    from fluxexport.models.loaders import load_transformer
    from fluxexport.models.lora import parse_lora
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.specs import component_specs, sample_inputs
    from fluxexport.tensorrt.refit import refit_engines

    source = sources["tiny-dev"]
    lora = write_peft(tmp_path / "style.safetensors", load_transformer(source), None)
    merged = source.with_loras([parse_lora(f"{lora}:0.8")])
    refittable = rig.build(source, exports["tiny-dev"], tmp_path / "refittable", refittable=True)
    base = tmp_path / "base"
    shutil.copytree(refittable, base)
    folder = refit_engines(merged, refittable)
    assert folder.components["transformer"].refitted_weights > 0
    export_model(merged, tmp_path / "merged-onnx", components=["transformer"])
    built = rig.build(merged, tmp_path / "merged-onnx", tmp_path / "merged", components=["transformer"])

    spec = component_specs(source)["transformer"]
    with (
        rig.backend(merged, refittable) as refitted,
        rig.backend(merged, built) as merged_build,
        rig.backend(source, base) as unrefitted,
    ):  # fmt: skip
        for seed, sizes in enumerate(({"B": 1, "N": 256, "L": 40}, {"B": 2, "N": 1600, "L": 77})):  # 256², 640²
            feeds = {name: value.to(refitted.device) for name, value in sample_inputs(spec, sizes, seed=seed).items()}
            ours = refitted.component("transformer")(feeds)["latent"]
            assert rel_l2(ours, merged_build.component("transformer")(feeds)["latent"]) <= rig.rel_l2_limit(), sizes
            assert rel_l2(ours, unrefitted.component("transformer")(feeds)["latent"]) > 1e-3  # the LoRA is in
        ours = images(refitted, merged, A)
    with OnnxRuntimeBackend(merged, exports["tiny-dev"]) as swapped:
        rig.assert_images_close(ours, images(swapped, merged, A), 35, "refitted vs the ONNX Runtime swap")


# ---- step caches on the engines (the transformer's parts for First Block Cache) --------------------------------


@pytest.mark.parametrize("cache_text", ["first-block:threshold=1.0", "taylorseer:interval=3,warmup=2"])
def test_step_caches_on_the_engines(rig, cache_text, flux2_sources, flux2_parts_export, tmp_path):
    """A step cache around the engines (FLUX.2 [klein]; First Block Cache runs the transformer's part engines,
    TaylorSeer the whole transformer's) computes the steps ONNX Runtime computes on the same graphs, fewer than
    all, with its image (35 dB on a GPU); with --low-vram the same steps and image bit for bit."""
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.runtime.cache import parse_cache
    from fluxexport.specs import TRANSFORMER_PARTS

    source, cache, steps = flux2_sources["tiny-klein"], parse_cache(cache_text), 10
    engines = rig.build(source, flux2_parts_export, tmp_path / "engines",
                        components=["text_encoder", "vae_decoder", "transformer", *TRANSFORMER_PARTS])  # fmt: skip
    request = GenerationRequest("a red fox", height=128, width=160, num_inference_steps=steps, seed=1)
    with rig.backend(source, engines) as backend:
        ours = generate(backend, source, request, cache=cache)
    with OnnxRuntimeBackend(source, flux2_parts_export) as graphs:
        expected = generate(graphs, source, request, cache=cache)
    assert ours.computed_steps == expected.computed_steps < steps
    rig.assert_images_close(ours.images, expected.images, 35, cache_text)
    with rig.backend(source, engines, low_vram=True) as low:
        lean = generate(low, source, request, cache=cache)
    assert lean.computed_steps == ours.computed_steps and np.array_equal(lean.images, ours.images)


# ---- FLUX.2 tiny models ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # its export fixture is asked for by name, which the automatic slow mark cannot see
@pytest.mark.parametrize(
    ("variant", "export"), [("tiny-klein", "flux2_export"), ("tiny-flux2-dev", "flux2_dev_export")]
)
def test_flux2_tiny_models_on_the_engines(rig, variant, export, flux2_sources, reference_image, tmp_path, request):
    """FLUX.2 [klein] and [dev] engines in two buckets: their images equal ONNX Runtime's on the same graphs at a size
    in each bucket and with a reference image (35 dB on a GPU); CUDA graphs change nothing."""
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend

    source, graphs_folder = flux2_sources[variant], request.getfixturevalue(export)
    engines = rig.build(source, graphs_folder, tmp_path / "engines", resolution_buckets=2)
    cases = [(B, {}), (LARGE, {}), (A, {"image": reference_image})]
    with rig.backend(source, engines) as backend, OnnxRuntimeBackend(source, graphs_folder) as reference:
        ours = [images(backend, source, size, steps=2, **extra) for size, extra in cases]
        for (size, extra), image in zip(cases, ours, strict=True):
            expected = images(reference, source, size, steps=2, **extra)
            rig.assert_images_close(image, expected, 35, f"{variant} {size} {sorted(extra)}")
    with rig.backend(source, engines, cuda_graphs=False) as plain:
        assert np.array_equal(images(plain, source, B, steps=2), ours[0])


# ---- PyTorch on CUDA, and FP8 engines against PyTorch (GPU only) ----------------------------------------------------


@pytest.mark.gpu
def test_torch_backend_on_cuda_matches_cpu(sources, torch_backends):
    from fluxexport.pytorch.backend import TorchBackend

    request = GenerationRequest("a red fox", height=144, width=272, num_inference_steps=4, seed=3)
    cuda = generate(TorchBackend(sources["tiny-dev"], device="cuda"), sources["tiny-dev"], request).images
    cpu = generate(torch_backends["tiny-dev"], sources["tiny-dev"], request).images
    assert psnr(cuda, cpu) >= 40


@pytest.mark.gpu
def test_bench_reports_peak_gpu_memory(sources):
    from fluxexport.benchmark import run_benchmark
    from fluxexport.pytorch.backend import TorchBackend

    result = run_benchmark(TorchBackend(sources["tiny-dev"], "bf16", "cuda"), sources["tiny-dev"],
                           GenerationRequest("x", num_inference_steps=4), warmup=1, repeats=2)  # fmt: skip
    assert result["peak_gpu_memory_bytes"] > 0 and result["median_ms"]["denoise_per_step"] > 0


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_gpu
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_tensorrt_engines_match_pytorch(precision, sources, tmp_path):
    """bf16 graphs (and quantize's FP8 transformer) built on the GPU: images within 30 dB (FP8: 22 dB) of PyTorch
    bf16 on CUDA, CUDA-graph replays stable, and validate --engines passing against PyTorch and ONNX Runtime."""
    from fluxexport.export.onnx_export import export_model
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings
    from fluxexport.quantize.qdq_export import quantize_transformer
    from fluxexport.specs import ExportBounds
    from fluxexport.tensorrt.builder import BuildOptions, build_engines
    from fluxexport.tensorrt.environment import current_gpu, require_fp8
    from fluxexport.validate.engines import validate_engines

    source = sources["tiny-dev"]
    if precision == "fp8":
        require_fp8(current_gpu())
    onnx_dir = tmp_path / "onnx"
    export_model(source, onnx_dir, dtype="bf16")
    if precision == "fp8":
        quantize_transformer(source, onnx_dir, CalibrationSettings(CALIBRATION_PROMPTS[:4], steps=4))
    bounds = ExportBounds(min_resolution=64, opt_resolution=256, max_resolution=1024)
    build_engines(source, onnx_dir, tmp_path / "engines", BuildOptions(precision, bounds, optimization_level=2))
    with Rig(None).backend(source, tmp_path / "engines") as backend:
        ours = images(backend, source, A, steps=4)
        reference = images(TorchBackend(source, "bf16", "cuda"), source, A, steps=4)
        assert psnr(ours, reference) >= (30 if precision == "bf16" else 22)
        assert np.array_equal(ours, images(backend, source, A, steps=4))  # CUDA-graph replays are stable
    report, _ = validate_engines(source, tmp_path / "engines", steps=2)
    assert report.passed, [c for c in report.components if not c.passed]
    assert {c.against for c in report.components} == {"pytorch", "onnxruntime"} and report.images
