"""Published FP8 checkpoints in, Q/DQ graphs out (issue 30 item 3): layouts detected from a file's header,
unreadable ones refused in one line, the weights read as diffusers' BFL quantizer reads them, and the FP8 graph
made with the checkpoint's own scales and FP8 bytes, equal to the checkpoint run in PyTorch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fluxexport.errors import FluxExportError

# the tests that need `checkpoint_graphs` (a tiny export per layout) run on one xdist worker, in the slow set
EXPORTS = "quantized_checkpoints"


@pytest.fixture(scope="module")
def klein(cache_root):
    from fluxexport.models.source import resolve_model

    return resolve_model("tiny-klein")


@pytest.fixture(scope="module")
def checkpoints(klein, tmp_path_factory):
    """tiny-klein's transformer written by our tiny writer in each layout: layout → single file (activation
    scales from no calibration: these files are for detection and refusals)."""
    from fluxexport.models.tiny_quantized import QUANTIZED_LAYOUTS, write_quantized_single_file

    root = tmp_path_factory.mktemp("quantized-checkpoints")
    return {layout: write_quantized_single_file(klein, root / f"klein-{layout}.safetensors", layout, {})
            for layout in QUANTIZED_LAYOUTS}  # fmt: skip


@pytest.fixture(scope="module")
def exported_checkpoints(klein, checkpoints, tmp_path_factory) -> dict[str, Path]:
    """The layouts the graphs are made from: fp8r as written, per-tensor FP8 with input scales from a short
    calibration of tiny-klein (2 prompts × 2 steps)."""
    from fluxexport.models.tiny_quantized import write_quantized_single_file
    from fluxexport.quantize.calibrate import CALIBRATION_PROMPTS, CalibrationSettings
    from fluxexport.quantize.qdq_export import calibrate_transformer

    amax = calibrate_transformer(klein, CalibrationSettings(CALIBRATION_PROMPTS[:2], steps=2)).input_amax
    path = tmp_path_factory.mktemp("calibrated") / "klein-fp8.safetensors"
    nvfp4 = write_quantized_single_file(klein, path.with_name("klein-nvfp4.safetensors"), "nvfp4", amax)
    return {"fp8r": checkpoints["fp8r"], "fp8": write_quantized_single_file(klein, path, "fp8", amax), "nvfp4": nvfp4}


def opened(path: Path, base: str = "tiny-klein"):
    from fluxexport.models.source import resolve_model

    return resolve_model(str(path), base)


def test_published_fp8_layouts_are_detected_from_their_keys(checkpoints):
    assert opened(checkpoints["fp8r"]).quantized_layout == "fp8r"
    assert opened(checkpoints["fp8"]).quantized_layout == "fp8"
    assert opened(checkpoints["nvfp4"]).quantized_layout == "nvfp4"
    with safe_open(str(checkpoints["fp8r"]), framework="pt") as handle:  # BFL's layout: E4M3 rows, fp32 row scales
        assert handle.get_tensor("double_blocks.0.img_attn.qkv.weight").dtype == torch.float8_e4m3fn
        rows = handle.get_slice("double_blocks.0.img_attn.qkv.weight").get_shape()[0]
        assert handle.get_slice("double_blocks.0.img_attn.qkv.weight_scale").get_shape() == [rows]


def test_unreadable_layouts_are_refused_in_one_line_naming_them(checkpoints, tmp_path):
    with pytest.raises(FluxExportError) as legacy:
        opened(checkpoints["scaled_fp8"])
    assert str(legacy.value) == (
        "klein-scaled_fp8.safetensors is ComfyUI's legacy scaled_fp8 (scale_weight keys), which fluxexport cannot "
        "read: pass its FP8 (float8_e4m3fn, weight_scale), NVFP4 or bf16 release"
    )
    # a ComfyUI marker naming another format (an INT8 file's marker on our FP8 layer)
    state = load_file(str(checkpoints["fp8"]))
    marker = next(key for key in state if key.endswith(".comfy_quant"))
    state[marker] = torch.tensor(list(json.dumps({"format": "int8_blockwise"}).encode()), dtype=torch.uint8)
    save_file(state, str(tmp_path / "int8.safetensors"))
    with pytest.raises(FluxExportError) as int8:
        opened(tmp_path / "int8.safetensors")
    assert str(int8.value) == (
        "int8.safetensors is ComfyUI's int8_blockwise layout, which fluxexport cannot read: pass a float8_e4m3fn "
        "or bf16 checkpoint"
    )
    assert all("\n" not in str(error.value) for error in (legacy, int8))


def test_a_quantized_diffusers_folder_is_refused(klein, checkpoints, tmp_path):
    from fluxexport.models.source import load_folder

    folder = tmp_path / "folder"
    shutil.copytree(klein.root, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    shutil.copy(checkpoints["fp8r"], weights)  # the keys do not matter: the E4M3 tensors are refused first
    with pytest.raises(FluxExportError) as refused:
        load_folder(folder)
    assert str(refused.value) == (
        f"{folder / 'transformer'} holds quantized weights (diffusion_pytorch_model.safetensors): fluxexport reads "
        "published FP8 transformers as single files: pass the .safetensors file as --model with --base-model for "
        "the rest"
    )


@pytest.mark.parametrize(
    ("option", "flag"),
    [({"calib_steps": 2}, "--calib-steps"), ({"fp8_attention": True}, "--fp8-attention"),
     ({"precision": "nvfp4"}, "--precision nvfp4"), ({"calibration_file": Path("calibration.json")}, "--calibration")],
)  # fmt: skip
def test_calibration_options_are_refused_for_a_checkpoint_with_its_own_scales(option, flag, checkpoints, tmp_path):
    """A per-tensor FP8 file has activation scales: nothing to calibrate (a weight-only fp8r file takes a
    calibration: test_a_weight_only_checkpoint_takes_calibrated_activation_scales)."""
    from fluxexport.commands.common import ModelOptions
    from fluxexport.commands.quantize import QuantizeOptions, quantize_fp8

    model = ModelOptions(model=str(checkpoints["fp8"]), base_model="tiny-klein")
    with pytest.raises(FluxExportError) as refused:
        quantize_fp8(QuantizeOptions(model=model, out=tmp_path / "out", **option))
    assert str(refused.value) == f"klein-fp8 is an FP8 checkpoint (fp8) quantized with its own scales: drop {flag}"
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_fp8_attention_for_a_checkpoint_with_its_own_scales(checkpoints, tmp_path):
    """`quantize --fp8-attention` of a published FP8 checkpoint: one line, exit status 1, nothing written."""
    from helpers import cli_refusal

    refused = cli_refusal("quantize", "--model", checkpoints["fp8"], "--base-model", "tiny-klein", "--fp8-attention",
                          "--out", tmp_path / "out")  # fmt: skip
    assert refused == "Error: klein-fp8 is an FP8 checkpoint (fp8) quantized with its own scales: drop --fp8-attention"
    assert not (tmp_path / "out").exists()


def diffusers_bfl(source):
    """The checkpoint as diffusers loads it: `from_single_file` with `BFLQuantizationConfig` (fp32 compute)."""
    from diffusers import BFLQuantizationConfig, Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_single_file(
        str(source.transformer_file), config=str(source.root), subfolder="transformer", torch_dtype=torch.float32,
        quantization_config=BFLQuantizationConfig(compute_dtype=torch.float32),
    ).eval()  # fmt: skip


def test_fp8r_weights_read_as_diffusers_dequantizes_them(checkpoints):
    from diffusers.quantizers.bfl.utils import BFLFP8RLinear, dequantize_fp8r

    from fluxexport.models.loaders import load_transformer

    source = opened(checkpoints["fp8r"])
    ours, theirs = load_transformer(source).state_dict(), diffusers_bfl(source)
    quantized = {name: module for name, module in theirs.named_modules() if isinstance(module, BFLFP8RLinear)}
    assert len(quantized) == 14  # every block Linear of tiny-klein (q, k, v split from the fused qkv)
    for name, module in quantized.items():
        assert torch.equal(ours[f"{name}.weight"], dequantize_fp8r(module.weight, module.weight_scale)), name


def test_a_fused_bfl_linear_takes_the_rows_of_its_row_scales(tmp_path):
    """FLUX.1's single-block linear1 (q, k, v and the MLP input) is split by rows: each part takes its rows of
    the per-row scale."""
    from fluxexport.models.checkpoint import CheckpointTensors
    from fluxexport.models.source import resolve_model
    from fluxexport.models.tiny_quantized import write_quantized_single_file

    path = write_quantized_single_file(resolve_model("tiny-schnell"), tmp_path / "schnell-fp8r.safetensors")
    tensors = CheckpointTensors(opened(path, "tiny-schnell"), "transformer")
    with safe_open(str(path), framework="pt") as handle:
        fused = handle.get_tensor("single_blocks.0.linear1.weight").float()
        fused = fused * handle.get_tensor("single_blocks.0.linear1.weight_scale")[:, None]
    parts = ["to_q", "to_k", "to_v", "proj_mlp"]
    split = torch.cat([tensors.load(f"single_transformer_blocks.0.{'attn.' * (p != 'proj_mlp')}{p}.weight")
                       for p in parts])  # fmt: skip
    assert torch.equal(split, fused)


@pytest.fixture(scope="module")
def checkpoint_graphs(exported_checkpoints, tmp_path_factory):
    """layout → the folder `quantize` made from that checkpoint (fp32 base: ONNX Runtime runs it), the
    transformer's FP8 graph only: one tiny export per layout, made when a test first asks."""
    from helpers import OnDemand

    from fluxexport.commands.common import ModelOptions
    from fluxexport.commands.quantize import QuantizeOptions, quantize_fp8

    root = tmp_path_factory.mktemp("checkpoint-graphs")

    def quantized(key: str) -> Path:
        layout, _, calibrated = key.partition("+")  # fp8r+calibrated: activation scales calibrated (1 prompt, 1 step)
        model = ModelOptions(model=str(exported_checkpoints[layout]), base_model="tiny-klein")
        precision = "nvfp4" if layout == "nvfp4" else "fp8"
        calibration = {"calib_size": 1, "calib_steps": 1} if calibrated else {}
        options = QuantizeOptions(model=model, out=root / key, dtype="fp32", precision=precision, **calibration)
        return quantize_fp8(options).out

    return OnDemand({"fp8r": None, "fp8": None, "nvfp4": None, "fp8r+calibrated": None}, quantized)


def fp8_graph(folder: Path):
    from fluxexport.artifacts.folders import open_export

    return open_export(folder).fp8["transformer"]


def initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def dequantize_nodes(path: Path) -> dict[str, tuple[str, int | None]]:
    """FP8 initializer → (its DequantizeLinear's scale initializer, axis)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith(".fp8"):
            axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), None)
            found[node.input[0]] = (node.input[1], axis)
    return found


@pytest.mark.slow
@pytest.mark.xdist_group(EXPORTS)
@pytest.mark.parametrize("layout", ["fp8r", "fp8"])
def test_the_graph_holds_the_checkpoints_fp8_bytes_and_scales(layout, exported_checkpoints, checkpoint_graphs):
    from fluxexport.quantize.from_checkpoint import checkpoint_scales

    folder = checkpoint_graphs[layout]
    record = fp8_graph(folder)
    assert record.extra["quantization"] == {
        "format": "fp8_e4m3",
        "layout": layout,
        "layers": 14,
        "scales": "checkpoint",
    }
    source = opened(exported_checkpoints[layout])
    scales = checkpoint_scales(source)
    values, readers = initializers(folder / record.file), dequantize_nodes(folder / record.file)
    assert len(readers) == 14
    from fluxexport.models.checkpoint import CheckpointTensors

    locations = CheckpointTensors(source, "transformer").locations
    for fp8_name, (scale_name, axis) in readers.items():
        layer = fp8_name.split(".", 1)[1].removesuffix(".weight.fp8")  # under the adapter's module name
        weight_scale, _ = scales[layer]
        assert np.array_equal(values[scale_name], weight_scale.numpy()), layer  # the checkpoint's float32 scales
        if layout == "fp8r":  # per row: ONNX's per-axis DequantizeLinear on the weight's output rows
            assert axis == 0 and values[scale_name].shape == (len(values[fp8_name]),), layer
        else:
            assert values[scale_name].shape == (), layer
        location = locations[f"{layer}.weight"]
        with safe_open(str(location.file), framework="pt") as handle:
            raw = handle.get_slice(location.key)
            raw = raw[location.rows[0] : location.rows[1]] if location.rows else raw[:]
        assert values[fp8_name].tobytes() == raw.view(torch.uint8).numpy().tobytes(), layer  # its very FP8 bytes


@pytest.mark.slow
@pytest.mark.xdist_group(EXPORTS)
def test_per_tensor_activations_are_quantized_with_the_checkpoints_input_scale(exported_checkpoints, checkpoint_graphs):
    import onnx
    from onnx import numpy_helper

    from fluxexport.quantize.from_checkpoint import checkpoint_scales

    record = fp8_graph(checkpoint_graphs["fp8"])
    model = onnx.load(str(checkpoint_graphs["fp8"] / record.file))
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    activation_scales = {float(constants[node.input[1]]) for node in model.graph.node
                         if node.op_type == "QuantizeLinear" and node.input[1] in constants}  # fmt: skip
    expected = {value for _, value in checkpoint_scales(opened(exported_checkpoints["fp8"])).values()}
    assert {np.float32(value) for value in expected} == {np.float32(value) for value in activation_scales}


@pytest.mark.slow
@pytest.mark.xdist_group(EXPORTS)
def test_a_weight_only_checkpoint_takes_calibrated_activation_scales(exported_checkpoints, checkpoint_graphs):
    """`quantize --calib-*` of BFL's weight-only fp8r file: the same FP8 weights and row scales as without
    calibration (the file's), and each of its 14 Linears' input through Q/DQ with the saved calibration's scale:
    an FP8 GEMM graph."""
    import onnx

    folder = checkpoint_graphs["fp8r+calibrated"]
    record = fp8_graph(folder)
    assert record.extra["quantization"] == {
        "format": "fp8_e4m3",
        "layout": "fp8r",
        "layers": 14,
        "scales": "checkpoint, calibrated activations",
    }
    ours, weight_only = initializers(folder / record.file), initializers(checkpoint_graphs["fp8r"] / fp8_graph(
        checkpoint_graphs["fp8r"]).file)  # fmt: skip
    readers = dequantize_nodes(folder / record.file)
    theirs = dequantize_nodes(checkpoint_graphs["fp8r"] / fp8_graph(checkpoint_graphs["fp8r"]).file)
    assert readers.keys() == theirs.keys() and len(readers) == 14
    for fp8_name, (scale_name, axis) in readers.items():
        assert ours[fp8_name].tobytes() == weight_only[fp8_name].tobytes(), fp8_name
        assert axis == theirs[fp8_name][1] == 0, fp8_name  # per row, as without calibration
        assert np.array_equal(ours[scale_name], weight_only[theirs[fp8_name][0]]), fp8_name
    from fluxexport.quantize.placement import qdq_problems

    model = onnx.load(str(folder / record.file), load_external_data=False)
    assert qdq_problems(model) == []
    producer = {output: node for node in model.graph.node for output in node.output}
    weights = {
        node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear" and node.input[0] in readers
    }
    weights |= {node.output[0] for node in model.graph.node if node.op_type == "Transpose" and node.input[0] in weights}
    gemms = [node for node in model.graph.node if node.op_type in ("MatMul", "Gemm") and node.input[1] in weights]
    assert len(gemms) == 14  # each FP8 weight's GEMM takes an FP8 (dequantized) activation: an FP8 GEMM
    assert all(producer[node.input[0]].op_type == "DequantizeLinear" for node in gemms)
    activations = [float(ours[node.input[1]]) for node in model.graph.node if node.op_type == "QuantizeLinear"]
    saved = json.loads((folder / "calibration.json").read_text())["input_scale"]
    from fluxexport.quantize.from_checkpoint import checkpoint_scales

    layers = checkpoint_scales(opened(exported_checkpoints["fp8r"]))
    # Linears reading one input (q, k, v) share its scale, so its Q/DQ once: compared as sets, as the per-tensor
    # file's input scales are (test_per_tensor_activations_are_quantized_with_the_checkpoints_input_scale)
    assert len(layers) == 14 and activations
    assert {np.float32(value) for value in activations} == {np.float32(saved[name]) for name in layers}


def run_graph(path: Path, spec, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {value.name for value in session.get_inputs()}
    return session.run(None, {key: value.numpy() for key, value in feeds.items() if key in names})[0]


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow
@pytest.mark.xdist_group(EXPORTS)
def test_the_fp8r_graph_equals_the_checkpoint_as_diffusers_runs_it(exported_checkpoints, checkpoint_graphs):
    """ONNX Runtime runs the graph; diffusers runs the file through its BFL quantizer (dequantized weights on a
    CPU), at shapes the export never saw."""
    from fluxexport.adapters import adapter_for
    from fluxexport.specs import component_specs, sample_inputs, validation_sizes

    source = opened(exported_checkpoints["fp8r"])
    spec = component_specs(source)["transformer"]
    reference = adapter_for(source, "transformer", diffusers_bfl(source))
    path = checkpoint_graphs["fp8r"] / fp8_graph(checkpoint_graphs["fp8r"]).file
    for sizes, _ in validation_sizes(spec):
        feeds = sample_inputs(spec, sizes)
        with torch.no_grad():
            expected = reference(*[feeds[tensor.name] for tensor in spec.inputs]).numpy()
        assert rel_l2(run_graph(path, spec, feeds), expected) < 1e-5, sizes


@pytest.mark.slow
@pytest.mark.xdist_group(EXPORTS)
def test_the_per_tensor_graph_equals_its_pytorch_qdq(exported_checkpoints, checkpoint_graphs):
    from fluxexport.quantize.from_checkpoint import checkpoint_fp8_transformer
    from fluxexport.specs import component_specs, sample_inputs, validation_sizes

    source = opened(exported_checkpoints["fp8"])
    spec = component_specs(source)["transformer"]
    reference = checkpoint_fp8_transformer(source)
    path = checkpoint_graphs["fp8"] / fp8_graph(checkpoint_graphs["fp8"]).file
    for sizes, _ in validation_sizes(spec):
        feeds = sample_inputs(spec, sizes)
        with torch.no_grad():
            expected = reference(*[feeds[tensor.name] for tensor in spec.inputs]).numpy()
        assert rel_l2(run_graph(path, spec, feeds), expected) < 1e-5, sizes


def fp8_transformer_backend(source, folder: Path):
    """A PyTorch backend whose transformer is ONNX Runtime on the folder's FP8 graph: the pipeline's images with
    only the transformer changed."""
    from fluxexport.onnxruntime.backend import create_session, session_runner
    from fluxexport.pytorch.backend import TorchBackend

    record = fp8_graph(folder)

    class Fp8Transformer(TorchBackend):
        def _load(self, name: str):
            if name != "transformer":
                return super()._load(name)
            return session_runner(create_session(folder / record.file), record, name)

    return Fp8Transformer(source, device="cpu")


@pytest.mark.slow
@pytest.mark.xdist_group(EXPORTS)
def test_images_of_the_fp8r_graph_equal_the_checkpoints_pytorch_images(exported_checkpoints, checkpoint_graphs):
    """tiny-klein's 4-step image: the PyTorch run of the checkpoint (dequantized weights, as diffusers runs it) vs
    the same pipeline with the transformer in ONNX Runtime on the FP8 graph."""
    from fluxexport.compare import psnr
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.runtime.pipeline import generate
    from fluxexport.runtime.request import GenerationRequest

    source = opened(exported_checkpoints["fp8r"])
    request = GenerationRequest("a red fox in the snow", seed=3)
    reference = generate(TorchBackend(source, device="cpu"), source, request).images
    images = generate(fp8_transformer_backend(source, checkpoint_graphs["fp8r"]), source, request).images
    assert psnr(images, reference) >= 80.0  # 90.3 dB measured (fp32 base)


@pytest.mark.slow
@pytest.mark.xdist_group(EXPORTS)
@pytest.mark.parametrize("layout", ["fp8r", "fp8"])
def test_the_graph_holds_no_high_precision_copy_of_the_quantized_weights(layout, checkpoint_graphs):
    """The FP8 weights go to FP8 initializers (a quarter of their fp32 bytes): no float copy of a quantized
    Linear's weight is in the graph, and the folder holds the FP8 graph alone (no base export was written)."""
    folder = checkpoint_graphs[layout]
    values = initializers(folder / fp8_graph(folder).file)
    fp8 = [name for name in values if name.endswith(".fp8")]
    assert len(fp8) == 14 and all(values[name].dtype.itemsize == 1 for name in fp8)
    assert not [name.removesuffix(".fp8") for name in fp8 if name.removesuffix(".fp8") in values]
    assert sorted(path.name for path in folder.iterdir() if path.suffix in (".onnx", ".onnx_data")) == [
        "transformer.fp8.onnx"
    ]


def test_nvfp4_weights_read_as_diffusers_dequantizes_them(checkpoints):
    from diffusers.quantizers.bfl.utils import BFLNVFP4Linear, dequantize_nvfp4

    from fluxexport.models.loaders import load_transformer

    source = opened(checkpoints["nvfp4"])
    ours, theirs = load_transformer(source).state_dict(), diffusers_bfl(source)
    quantized = {name: module for name, module in theirs.named_modules() if isinstance(module, BFLNVFP4Linear)}
    assert len(quantized) == 14
    for name, module in quantized.items():
        expected = dequantize_nvfp4(module.weight, module.weight_scale, module.weight_scale_2)
        assert torch.equal(ours[f"{name}.weight"], expected), name


def test_an_nvfp4_checkpoint_needs_precision_nvfp4(checkpoints, tmp_path):
    from fluxexport.commands.common import ModelOptions
    from fluxexport.commands.quantize import QuantizeOptions, quantize_fp8

    model = ModelOptions(model=str(checkpoints["nvfp4"]), base_model="tiny-klein")
    with pytest.raises(FluxExportError) as refused:
        quantize_fp8(QuantizeOptions(model=model, out=tmp_path / "out"))
    assert str(refused.value) == (
        "klein-nvfp4 is an NVFP4 checkpoint: quantize it with --precision nvfp4 (FP8 graphs come from FP8 or bf16 "
        "releases)"
    )


@pytest.mark.slow
@pytest.mark.xdist_group(EXPORTS)
def test_the_nvfp4_graph_holds_the_checkpoints_codes_and_scales(exported_checkpoints, checkpoint_graphs):
    """`quantize --precision nvfp4` of an NVFP4 checkpoint: each weight's FLOAT4E2M1 codes and E4M3 block scales
    are the file's, its per-tensor scale the file's `weight_scale_2`, the activations' the file's `input_scale`."""
    import onnx

    from fluxexport.artifacts.folders import open_export
    from fluxexport.models.quantized_checkpoint import e2m1_values

    folder = checkpoint_graphs["nvfp4"]
    record = open_export(folder).nvfp4["transformer"]
    assert record.extra["quantization"]["scales"] == "checkpoint" and record.extra["quantization"]["layers"] == 14
    values = initializers(folder / record.file)
    model = onnx.load(str(folder / record.file), load_external_data=False)
    dynamic = {float(values[node.input[1]]) for node in model.graph.node if node.op_type == "TRT_FP4DynamicQuantize"}
    with safe_open(str(exported_checkpoints["nvfp4"]), framework="pt") as handle:
        expected_inputs = {float(handle.get_tensor(k)) for k in handle.keys() if k.endswith(".input_scale")}  # noqa: SIM118
        for key in [k for k in handle.keys() if k.endswith("qkv.weight")]:  # noqa: SIM118 - fused: rows split
            packed, blocks = handle.get_tensor(key), handle.get_tensor(key.removesuffix("weight") + "weight_scale")
            block, name = key.split(".")[1], "img" if "img_attn" in key else "txt"
            parts = ("to_q", "to_k", "to_v") if name == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
            codes = np.concatenate([values[f"model.transformer_blocks.{block}.attn.{p}.weight.fp4"] for p in parts])
            assert np.array_equal(codes.astype(np.float32), e2m1_values(packed).numpy()), key
            scales = np.concatenate([values[f"model.transformer_blocks.{block}.attn.{p}.weight.fp4_block_scale"]
                                     for p in parts])  # fmt: skip
            assert scales.tobytes() == blocks.view(torch.uint8).numpy().tobytes(), key
            global_scale = values[f"model.transformer_blocks.{block}.attn.{parts[0]}.weight.fp4_global_scale"]
            assert float(global_scale) == float(handle.get_tensor(key.removesuffix("weight") + "weight_scale_2"))
    assert dynamic == expected_inputs


@pytest.mark.slow
@pytest.mark.xdist_group(EXPORTS)
def test_the_nvfp4_graph_passes_the_tensorrt_check_it_is_made_for(checkpoint_graphs):
    """`quantize` lints an NVFP4 checkpoint's graph for TensorRT 10.15 (opset 23, trt::TRT_FP4DynamicQuantize)."""
    from fluxexport.artifacts.folders import open_export
    from fluxexport.commands.quantize import nvfp4_check_version
    from fluxexport.export.check import check_graph

    record = open_export(checkpoint_graphs["nvfp4"]).nvfp4["transformer"]
    report = check_graph(checkpoint_graphs["nvfp4"] / record.file, record, nvfp4_check_version())
    assert (nvfp4_check_version(), report.ok) == ("10.15", True), report.problems


@pytest.mark.slow
@pytest.mark.xdist_group(EXPORTS)
def test_the_nvfp4_graph_runs_as_the_checkpoint_with_nvfp4_activations(exported_checkpoints, checkpoint_graphs):
    """ONNX's reference evaluator runs the graph; the reference is the checkpoint's dequantized weights with the
    activations through NVFP4 at the file's input scales (what diffusers' Blackwell path computes)."""
    from onnx.reference import ReferenceEvaluator

    from fluxexport.adapters import adapter_for
    from fluxexport.artifacts.folders import open_export
    from fluxexport.models.loaders import load_transformer
    from fluxexport.quantize.from_checkpoint import checkpoint_scales
    from fluxexport.quantize.nvfp4 import nvfp4_qdq, reference_ops
    from fluxexport.specs import component_specs, sample_inputs

    class NVFP4Inputs(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear, scale: float):
            super().__init__()
            self.linear, self.scale = linear, torch.tensor(scale, dtype=torch.float32)

        def forward(self, x):
            return self.linear(nvfp4_qdq(x, self.scale))

    source = opened(exported_checkpoints["nvfp4"])
    model = load_transformer(source)
    for name, (_, input_scale) in checkpoint_scales(source).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, NVFP4Inputs(model.get_submodule(name), input_scale))
    reference = adapter_for(source, "transformer", model).eval()
    record = open_export(checkpoint_graphs["nvfp4"]).nvfp4["transformer"]
    evaluator = ReferenceEvaluator(str(checkpoint_graphs["nvfp4"] / record.file), new_ops=reference_ops())
    spec = component_specs(source)["transformer"]
    feeds = sample_inputs(spec, {"B": 1, "N": 16, "L": 5})
    ours = evaluator.run(None, {key: value.numpy() for key, value in feeds.items()})[0]
    with torch.no_grad():
        expected = reference(*[feeds[tensor.name] for tensor in spec.inputs]).numpy()
    assert rel_l2(ours, expected) <= 5e-3  # one FP4 step across a rounding midpoint moves it (test_nvfp4.py)
