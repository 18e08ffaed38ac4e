"""`fluxexport optimize`: ONNX Runtime's fusions in ENGINES/ort/, used by run/bench/validate, never by TensorRT."""

import json
import shutil

import pytest
from click.testing import CliRunner
from helpers import manifest_json

from fluxexport.artifacts.folders import open_export
from fluxexport.cli import main
from fluxexport.compare import psnr
from fluxexport.errors import FluxExportError
from fluxexport.export.check import check_graph
from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
from fluxexport.onnxruntime.optimize import optimize_graphs
from fluxexport.runtime.pipeline import GenerationRequest, generate
from fluxexport.validate.graphs import validate_folder

REQUEST = GenerationRequest("a lighthouse at dusk", height=192, width=320, num_inference_steps=3, seed=5)


@pytest.fixture(scope="module")
def optimized(sources, exports, tmp_path_factory):
    folder = tmp_path_factory.mktemp("optimized") / "tiny-dev"
    shutil.copytree(exports["tiny-dev"], folder)
    result = CliRunner().invoke(main, ["optimize", "--model", "tiny-dev", "--engines", str(folder)])
    assert result.exit_code == 0, result.output
    return folder


def test_the_optimizer_fuses_what_onnxruntime_fuses(optimized):
    section = manifest_json(optimized)["onnxruntime"]
    assert sorted(section) == ["clip", "t5", "transformer"]  # the VAE has only CUDA fusions: none kept for CPU
    assert section["transformer"]["fusions"] == {"LayerNormalization": 6, "SimplifiedLayerNormalization": 6}
    assert section["t5"]["fusions"]["SkipSimplifiedLayerNormalization"] == 3
    assert section["clip"]["fusions"]["SkipLayerNormalization"] == 4
    for name, entry in section.items():
        assert entry["model_type"] == {"transformer": "mmdit", "t5": "t5", "clip": "clip"}[name]
        assert entry["parity_rel_l2"] <= 1e-4 and (optimized / entry["file"]).is_file()
    assert not (optimized / "ort" / "vae_decoder.onnx").exists()


def test_tensorrt_never_gets_the_fused_graphs(optimized):
    """The fused graphs hold com.microsoft ops the TensorRT check refuses; the portable ones still pass."""
    manifest = manifest_json(optimized)
    fused = check_graph(optimized / manifest["onnxruntime"]["t5"]["file"])
    assert not fused.ok and any("com.microsoft::SkipSimplifiedLayerNormalization" in p for p in fused.problems)
    assert check_graph(optimized / manifest["components"]["t5"]["file"], open_export(optimized).components["t5"]).ok


def test_run_uses_the_fused_graphs_and_they_match(sources, optimized, torch_backends):
    source = sources["tiny-dev"]
    with (
        OnnxRuntimeBackend(source, optimized) as fused,
        OnnxRuntimeBackend(source, optimized, optimized=False) as plain,
    ):
        assert fused.optimized == ["clip", "t5", "transformer"] and plain.optimized == []
        assert "ONNX Runtime-optimized: 6 LayerNormalization" in fused.transformer_graph
        images = generate(fused, source, REQUEST).images
        assert psnr(images, generate(plain, source, REQUEST).images) >= 50
    assert psnr(images, generate(torch_backends["tiny-dev"], source, REQUEST).images) >= 50


def test_validate_checks_the_fused_graphs(sources, optimized):
    report, dtype = validate_folder(sources["tiny-dev"], optimized, steps=2)
    assert report.passed and dtype == "fp32"
    assert report.graphs["transformer"] == "ort/transformer.onnx" and report.graphs["vae_decoder"] == "vae_decoder.onnx"
    assert all(c.rel_l2 <= 1e-5 for c in report.components)


def test_a_stale_optimization_is_not_used(sources, optimized, tmp_path):
    folder = tmp_path / "stale"
    shutil.copytree(optimized, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["onnxruntime"]["transformer"]["from_sha256"] = "0" * 64  # made from another export
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with OnnxRuntimeBackend(sources["tiny-dev"], folder) as backend:
        assert backend.entries["transformer"].file == "transformer.onnx" and backend.optimized == ["clip", "t5"]


def test_refusals(sources, exports, bf16_export, tmp_path):
    with pytest.raises(FluxExportError, match=r"has no optimized graphs \(none\): run fluxexport optimize --model tiny-\S+ --engines"):
        OnnxRuntimeBackend(sources["tiny-dev"], exports["tiny-dev"], optimized=True)
    with pytest.raises(FluxExportError, match="exported from 'tiny-dev', not from 'tiny-schnell'"):
        optimize_graphs(sources["tiny-schnell"], exports["tiny-dev"])
    folder = tmp_path / "bf16"
    shutil.copytree(bf16_export, folder)
    with pytest.raises(FluxExportError, match=r"is bf16: ONNX Runtime's optimizer takes the float32 export"):
        optimize_graphs(sources["tiny-dev"], folder)
    result = CliRunner().invoke(main, ["run", "--model", "tiny-dev", "--backend", "onnxruntime", "--engines",
                                       str(exports["tiny-dev"]), "--optimized", "--prompt", "a fox"])  # fmt: skip
    assert result.exit_code == 1 and "has no optimized graphs (none)" in result.output
