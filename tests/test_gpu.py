"""Checks that need a GPU (and TensorRT): they run on GPU hosts and skip here with the reason."""

import numpy as np
import pytest

from fluxexport.compare import psnr
from fluxexport.runtime.pipeline import GenerationRequest, generate


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


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_tensorrt_engines_match_pytorch(precision, sources, tmp_path):
    from fluxexport.export.onnx_export import export_model
    from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings
    from fluxexport.quantize.qdq_export import quantize_transformer
    from fluxexport.specs import ExportBounds
    from fluxexport.tensorrt.backend import TensorRTBackend
    from fluxexport.tensorrt.builder import BuildOptions, build_engines
    from fluxexport.tensorrt.environment import current_gpu, require_fp8

    source = sources["tiny-dev"]
    if precision == "fp8":
        require_fp8(current_gpu())
    onnx_dir = tmp_path / "onnx"
    export_model(source, onnx_dir, dtype="bf16")
    if precision == "fp8":
        quantize_transformer(source, onnx_dir, CalibrationSettings(CALIBRATION_PROMPTS[:4], steps=4))
    bounds = ExportBounds(min_resolution=64, opt_resolution=256, max_resolution=1024)
    options = BuildOptions(precision, bounds, optimization_level=2)
    build_engines(source, onnx_dir, tmp_path / "engines", options)
    backend = TensorRTBackend(source, tmp_path / "engines")
    request = GenerationRequest("a red fox", height=256, width=256, num_inference_steps=4, seed=1)
    images = generate(backend, source, request).images
    from fluxexport.pytorch.backend import TorchBackend

    reference = generate(TorchBackend(source, "bf16", "cuda"), source, request).images
    assert images.shape == reference.shape
    assert psnr(images, reference) >= (30 if precision == "bf16" else 22)
    assert np.array_equal(images, generate(backend, source, request).images)  # CUDA-graph replays are stable
    backend.close()
    from fluxexport.validate.engines import validate_engines

    report, _ = validate_engines(source, tmp_path / "engines", steps=2)
    assert report.passed, [c for c in report.components if not c.passed]
    against = {c.against for c in report.components}
    assert against == {"pytorch", "onnxruntime"} and report.images


@pytest.mark.tensorrt
def test_tensorrt_alternating_sizes_across_buckets_and_weight_streaming(sources, tmp_path):
    """On a real GPU: two resolution buckets, sizes alternating between them with CUDA graphs equal to CUDA
    graphs off, and weight streaming at 50% equal to no streaming."""
    from fluxexport.export.onnx_export import export_model
    from fluxexport.specs import ExportBounds
    from fluxexport.tensorrt.backend import TensorRTBackend
    from fluxexport.tensorrt.builder import BuildOptions, build_engines
    from fluxexport.tensorrt.weight_streaming import parse_budget

    source = sources["tiny-dev"]
    export_model(source, tmp_path / "onnx", dtype="bf16")
    bounds = ExportBounds(min_resolution=64, opt_resolution=256, max_resolution=1024, max_batch=2)
    options = BuildOptions("bf16", bounds, resolution_buckets=2, optimization_level=2, weight_streaming=True)
    build_engines(source, tmp_path / "onnx", tmp_path / "engines", options)
    sizes = [(256, 256), (640, 640), (144, 272), (256, 256), (768, 512), (640, 640)]

    def images(backend):
        return [generate(backend, source, GenerationRequest("a red fox", height=h, width=w, num_inference_steps=3,
                                                            seed=i)).images for i, (h, w) in enumerate(sizes)]  # fmt: skip

    with TensorRTBackend(source, tmp_path / "engines") as graphs:
        captured = images(graphs)
        assert len(graphs.runners["transformer"].captured) == 4
    with TensorRTBackend(source, tmp_path / "engines", cuda_graphs=False) as plain:
        for size, a, b in zip(sizes, captured, images(plain), strict=True):
            assert np.array_equal(a, b), size
    with TensorRTBackend(source, tmp_path / "engines", weight_streaming_budget=parse_budget("50%")) as streamed:
        for size, a, b in zip(sizes, captured, images(streamed), strict=True):
            assert psnr(a, b) >= 40, size
        assert streamed.streamed["transformer"][0] < streamed.streamed["transformer"][1]
