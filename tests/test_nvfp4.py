"""NVFP4 graphs (`quantize --precision nvfp4`): TensorRT's pattern, FP4 arithmetic checked against independent
oracles (ml_dtypes' casts, ONNX's reference evaluator), and `build --precision nvfp4` refused below Blackwell."""

import shutil

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from helpers import standin_tensorrt

from fluxexport.artifacts.folders import open_export
from fluxexport.dtypes import E2M1_GRID, round_e2m1
from fluxexport.errors import FluxExportError
from fluxexport.models.loaders import load_transformer
from fluxexport.quantize.calibrate import quantizable_linears
from fluxexport.quantize.nvfp4 import (
    DYNAMIC_QUANTIZE,
    NVFP4_MAX,
    nvfp4_emulate,
    reference_dynamic_quantize,
    reference_ops,
)
from fluxexport.quantize.nvfp4_export import nvfp4_transformer, quantize_nvfp4
from fluxexport.quantize.qdq_export import read_calibration
from fluxexport.specs import component_specs, sample_inputs

SHAPES = [{"B": 2, "N": 24, "L": 13}, {"B": 1, "N": 16, "L": 1}, {"B": 3, "N": 68, "L": 40}, {"B": 2, "N": 40, "L": 7}]


def rel_l2(a, b):
    return ((a - b).double().norm() / b.double().norm()).item()


def test_e2m1_rounding_is_the_float4_cast():
    """Our FP4 rounding equals ml_dtypes' FLOAT4E2M1 cast (nearest, ties to even, saturating), midpoints included."""
    grid = torch.tensor(E2M1_GRID)
    ties = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([torch.randn(20000) * 4, ties, -ties, grid, -grid, torch.tensor([6.5, 100.0, -7.0])])
    cast = values.numpy().astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert torch.equal(round_e2m1(values), torch.from_numpy(cast))


def test_dynamic_quantize_is_tensorrts_formula():
    """The reference evaluator's TRT_FP4DynamicQuantize: per 16 values, block scale = castToFp8(amax / 6 / global),
    values = castToFp4(x / (block · global)); recomputed here with ml_dtypes' casts alone."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 64, generator=generator) * torch.logspace(-3, 1, 64)).numpy()
    x[0, 0, :16] = 0  # an all-zero block: scale 0, values 0
    scale = np.float32(np.abs(x).max() / NVFP4_MAX)
    codes, blocks = reference_dynamic_quantize(x, scale)
    amax = np.abs(x.reshape(3, 5, 4, 16)).max(-1)
    expected_blocks = (amax / 6 / scale).astype(ml_dtypes.float8_e4m3fn)
    assert np.array_equal(blocks.astype(np.float32), expected_blocks.astype(np.float32))
    step = np.repeat(expected_blocks.astype(np.float32) * scale, 16, axis=-1)
    expected = (x / np.where(step == 0, 1, step)).astype(ml_dtypes.float4_e2m1fn)
    assert np.array_equal(codes.astype(np.float32), expected.astype(np.float32))
    dequantized = codes.astype(np.float32) * step
    assert np.allclose(nvfp4_emulate(torch.from_numpy(x), torch.tensor(scale)).numpy(), dequantized, rtol=0, atol=0)
    assert 0 < rel_l2(torch.from_numpy(dequantized), torch.from_numpy(x)) < 0.1  # FP4: coarse, but not broken


@pytest.fixture(scope="module")
def nvfp4_folder(sources, fp8_exports, tmp_path_factory):
    """tiny-dev's fp32 graphs plus an NVFP4 transformer on an fp32 base, with the FP8 export's calibration (the
    same amax: one calibration serves both formats); the module's one export. Its tests need fp8_exports, so
    conftest marks them slow and puts them in the flux1 worker group."""
    folder = tmp_path_factory.mktemp("nvfp4") / "tiny-dev"
    shutil.copytree(fp8_exports["tiny-dev"], folder)
    quantize_nvfp4(sources["tiny-dev"], folder, base_dtype="fp32", calibration_file=folder / "calibration.json",
                   components=["transformer"])  # fmt: skip
    return folder


def test_nvfp4_graph_is_tensorrts_pattern(sources, nvfp4_folder):
    """Every block Linear: its weight a FLOAT4E2M1 initializer [out, in] read by a block-16 DequantizeLinear whose
    scale is an E4M3 [out, in/16] initializer dequantized by a float32 scalar (amax / 2688); its input through
    trt::TRT_FP4DynamicQuantize (axis -1, block 16, FP8 scales) with the calibrated amax / 2688; opset 23."""
    record = open_export(nvfp4_folder).nvfp4["transformer"]
    assert (record.dtype, record.extra["quantization"]["format"], record.extra["quantization"]["block_size"]) == (
        "nvfp4",
        "nvfp4",
        16,
    )
    model = onnx.load(str(nvfp4_folder / record.file))
    assert {o.domain: o.version for o in model.opset_import} == {"": 23, "trt": 1}
    onnx.checker.check_model(model)
    init = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    calibration, _ = read_calibration(nvfp4_folder / "calibration.json", sources["tiny-dev"])
    linears = quantizable_linears(load_transformer(sources["tiny-dev"], torch.float32))
    assert record.extra["quantization"]["layers"] == len(linears)
    for name, linear in linears.items():
        codes, blocks = init[f"model.{name}.weight.fp4"], init[f"model.{name}.weight.fp4_block_scale"]
        assert (codes.data_type, list(codes.dims)) == (
            onnx.TensorProto.FLOAT4E2M1,
            [linear.out_features, linear.in_features],
        )
        assert len(codes.raw_data) == linear.weight.numel() // 2  # two FP4 values a byte
        assert (blocks.data_type, list(blocks.dims)) == (
            onnx.TensorProto.FLOAT8E4M3FN,
            [linear.out_features, linear.in_features // 16],
        )
        assert f"model.{name}.weight" not in init  # no float copy of a quantized weight
        global_scale = onnx.numpy_helper.to_array(init[f"model.{name}.weight.fp4_global_scale"])
        assert global_scale.shape == () and global_scale == np.float32(linear.weight.abs().max().item() / 2688)
    dq = {node.input[0]: node for node in model.graph.node if node.op_type == "DequantizeLinear"}
    for name in linears:
        weight_dq = dq[f"model.{name}.weight.fp4"]
        assert {a.name: a.i for a in weight_dq.attribute} == {"axis": -1, "block_size": 16}
        assert producers[weight_dq.input[1]].input == [
            f"model.{name}.weight.fp4_block_scale",
            f"model.{name}.weight.fp4_global_scale",
        ]
    dynamic = [node for node in model.graph.node if node.op_type == DYNAMIC_QUANTIZE]
    assert dynamic and all(node.domain == "trt" for node in dynamic)
    wanted_scales = {float(np.float32(value / 2688)) for value in calibration.input_amax.values()}
    for node in dynamic:
        assert {a.name: a.i for a in node.attribute} == {"axis": -1, "block_size": 16, "scale_type": 17}
        assert float(onnx.numpy_helper.to_array(init[node.input[1]])) in wanted_scales
        values_dq, blocks_dq = dq[node.output[0]], dq[node.output[1]]
        assert {a.name: a.i for a in values_dq.attribute} == {"axis": -1, "block_size": 16}
        assert values_dq.input[1] == blocks_dq.output[0] and blocks_dq.input[1] == node.input[1]


def test_reference_evaluator_runs_the_nvfp4_graph_as_pytorch_emulates_it(sources, nvfp4_folder, torch_backends):
    """ONNX's reference evaluator (its own FLOAT4E2M1 unpacking and block DequantizeLinear; TensorRT's dynamic
    quantization given as a function) equals the PyTorch NVFP4 emulation at shapes not used at export, and stays
    near the fp32 model."""
    from onnx.reference import ReferenceEvaluator

    source = sources["tiny-dev"]
    record = open_export(nvfp4_folder).nvfp4["transformer"]
    evaluator = ReferenceEvaluator(str(nvfp4_folder / record.file), new_ops=reference_ops())
    calibration, _ = read_calibration(nvfp4_folder / "calibration.json", source)
    emulated, fp32 = (
        nvfp4_transformer(source, calibration.input_amax),
        torch_backends["tiny-dev"].component("transformer"),
    )
    spec, to_emulation = component_specs(source)["transformer"], []
    for index, sizes in enumerate(SHAPES):
        feeds = sample_inputs(spec, sizes, seed=index)
        ours = torch.from_numpy(evaluator.run(None, {k: v.numpy() for k, v in feeds.items()})[0])
        with torch.no_grad():
            to_emulation.append(rel_l2(ours, emulated(*feeds.values())))
        assert 1e-3 < rel_l2(ours, fp32(feeds)["latent"]) <= 3e-2, sizes  # FP4: quantized (~1e-2), still the model
    # The same arithmetic, but float32 sums in another order can move an activation across an FP4 rounding
    # midpoint, and one FP4 step is coarse (seen: 2e-3 at one shape of four, ~1e-6 at the others)
    assert sum(value <= 1e-5 for value in to_emulation) >= 3, to_emulation
    assert max(to_emulation) <= 5e-3, to_emulation


def test_nvfp4_needs_blackwell():
    """`build --precision nvfp4` is refused in one line on the stand-in's Hopper device, accepted at 10.0."""
    from standin_tensorrt import HostDevice

    from fluxexport.specs import ExportBounds
    from fluxexport.tensorrt.builder import BuildOptions, check_build_host
    from fluxexport.tensorrt.precision import require_nvfp4

    with standin_tensorrt() as trt:
        options = BuildOptions("nvfp4", ExportBounds())
        with pytest.raises(FluxExportError) as error:
            check_build_host(options, HostDevice(trt).gpu)
        assert check_build_host(options, HostDevice(trt, compute_capability=(10, 0)).gpu).compute_capability == (10, 0)
    assert str(error.value) == (
        "NVFP4 needs compute capability 10.0 or newer (Blackwell: B200, RTX 50); stand-in GPU is 9.0: "
        "build with --precision fp8 or bf16"
    )
    require_nvfp4("NVIDIA GeForce RTX 5090", (12, 0))


def test_nvfp4_engines_are_built_from_the_nvfp4_graphs(nvfp4_folder):
    """The engine plan: the transformer from transformer.nvfp4.onnx, the rest bf16; a missing NVFP4 graph names
    the command that makes it."""
    from fluxexport.tensorrt.precision import engine_graphs, graph_dtypes, graph_problems

    folder = open_export(nvfp4_folder)
    wanted = graph_dtypes("nvfp4", ["transformer", "vae_decoder"])
    assert wanted == {"transformer": "nvfp4", "vae_decoder": "bf16"}
    assert engine_graphs(folder, wanted)["transformer"].file == "transformer.nvfp4.onnx"
    folder.nvfp4.clear()
    assert graph_problems(folder, {"transformer": "nvfp4"}) == [
        f"transformer: no graph in {nvfp4_folder} (run fluxexport quantize --model tiny-dev --precision nvfp4 "
        f"--out {nvfp4_folder})"
    ]


def test_quantize_refuses_what_nvfp4_cannot_do():
    """Refused in one line before any model is read: FP8 attention with NVFP4, and a precision quantize lacks."""
    from fluxexport.commands.common import ModelOptions
    from fluxexport.commands.quantize import QuantizeOptions, quantize_fp8

    model = ModelOptions("tiny-dev")
    with pytest.raises(FluxExportError) as error:
        quantize_fp8(QuantizeOptions(model, precision="nvfp4", fp8_attention=True))
    assert str(error.value) == "--fp8-attention is FP8's: NVFP4 quantizes the block Linears only (drop one of them)"
    with pytest.raises(FluxExportError) as error:
        quantize_fp8(QuantizeOptions(model, precision="int4"))
    assert str(error.value) == "quantize makes fp8 or nvfp4 graphs, not int4 (--precision)"


def test_check_knows_tensorrts_fp4_quantize(nvfp4_folder):
    """`check` of the NVFP4 graph: TensorRT 10.1 parses neither its opset nor trt::TRT_FP4DynamicQuantize (the line
    names 10.8, which does, and the operator list to check with); 10.15's parser takes the whole graph."""
    from fluxexport.export.check import check_graph

    record = open_export(nvfp4_folder).nvfp4["transformer"]
    path = nvfp4_folder / record.file
    quantizers = sum(
        node.op_type == DYNAMIC_QUANTIZE for node in onnx.load(str(path), load_external_data=False).graph.node
    )
    assert check_graph(path, record).problems == [
        "opset 23 is outside TensorRT 10.1's 9..20",
        f"trt::TRT_FP4DynamicQuantize ×{quantizers}: TensorRT's own op, parsed by TensorRT ≥ 10.8, not by 10.1: check "
        "with --tensorrt 10.15",
    ]
    report = check_graph(path, record, "10.15")
    assert (report.ok, report.tensorrt, report.ops[DYNAMIC_QUANTIZE]) == (True, "10.15", quantizers), report.problems


def test_nvfp4_engines_are_validated_at_their_bound():
    """`validate --engines` of an NVFP4 folder: the transformer held to NVFP4's bound against bf16 PyTorch and not
    run by ONNX Runtime (which has no FP4 kernels); the other engines against ONNX Runtime at their own bound."""
    from fluxexport.compare import TENSORRT_THRESHOLDS, THRESHOLDS, reference_dtype
    from fluxexport.validate.engines import base_precision, onnxruntime_limits

    precisions = {"transformer": "nvfp4", "vae_decoder": "bf16", "t5": "bf16"}
    assert reference_dtype(base_precision(p) for p in precisions.values()) == "bf16"
    assert TENSORRT_THRESHOLDS["nvfp4"] == THRESHOLDS["nvfp4"] == (0.25, 20.0)
    assert onnxruntime_limits(precisions) == {"vae_decoder": 1e-2, "t5": 1e-2}
    assert onnxruntime_limits({"transformer": "fp8"}, max_rel_l2=0.1) == {"transformer": 0.1}
