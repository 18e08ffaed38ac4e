"""`quantize --precision nvfp4`: the transformer (and its parts) as NVFP4 graphs for TensorRT on Blackwell.

The scales come from the same calibration as FP8 (`quantize/calibrate.py`: each block Linear's input amax over
the runtime's own trajectories; the weights' amax from the checkpoint): NVFP4 needs one per-tensor scale per
tensor, amax / (6 · 448), and computes its block scales from the values (weights at export, activations at run
time). The graph pattern is described in `quantize/nvfp4.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor

from fluxexport.artifacts.folders import open_export
from fluxexport.artifacts.records import GraphRecord
from fluxexport.dtypes import ELEMENT_TORCH, NVFP4_BLOCK, torch_dtype
from fluxexport.errors import FluxExportError
from fluxexport.export.onnx_export import ExportedComponent, export_component, graph_record, open_folder_for
from fluxexport.models.source import ModelSource
from fluxexport.quantize.calibrate import Calibration, CalibrationSettings, kept_high_precision, replace_linears
from fluxexport.quantize.nvfp4 import (
    DYNAMIC_QUANTIZE,
    MIN_NVFP4_OPSET,
    NVFP4_DOMAIN,
    TRANSLATIONS,
    TRT_DOMAIN,
    NVFP4Linear,
    block_scales,
    quantize_blocks,
)
from fluxexport.quantize.qdq_export import (
    _check_fp8_components,
    calibrate_transformer,
    calibrated_weight_amax,
    choose_sequential,
    keep_calibration,
    quantized_components,
    read_calibration,
    write_calibration,
)
from fluxexport.specs import ComponentSpec, ExportBounds, component_specs

NVFP4 = "nvfp4"
FP4_SUFFIX = ".fp4"  # a weight's FLOAT4E2M1 initializer: `….to_q.weight.fp4`
BLOCK_SCALE_SUFFIX = ".fp4_block_scale"  # its FLOAT8E4M3FN block scales
GLOBAL_SCALE_SUFFIX = ".fp4_global_scale"  # its float32 per-tensor scale


def nvfp4_stem(component: str) -> str:
    """The file stem of an NVFP4 graph: transformer.nvfp4(.onnx, .onnx_data), transformer_head.nvfp4, …"""
    return f"{component}.{NVFP4}"


def fake_quantize_nvfp4(
    transformer: torch.nn.Module, amax: dict[str, float], weight_amax: dict[str, float] | None = None
) -> torch.nn.Module:
    """Replace each calibrated block Linear by an NVFP4Linear, in place; returns the transformer."""
    replace_linears(transformer, amax, weight_amax, NVFP4Linear)
    return transformer


def nvfp4_transformer(source: ModelSource, amax: dict[str, float], dtype: str = "fp32") -> torch.nn.Module:
    """The PyTorch reference of the NVFP4 graph: the transformer with its block Linears in NVFP4 emulation,
    behind its family's transformer adapter (float32 RoPE, as exported)."""
    from fluxexport.adapters import adapter_for
    from fluxexport.models.loaders import load_transformer

    model = fake_quantize_nvfp4(load_transformer(source, torch_dtype(dtype)), amax)
    return adapter_for(source, "transformer", model).eval()


def _constant(name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(array, name=name)
    return ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


def _scale_of(node: ir.Node) -> np.ndarray:
    scale = ir.convenience.get_const_tensor(node.inputs[1])
    if scale is None:
        raise FluxExportError(f"NVFP4 node {node.name} has no constant per-tensor scale: quantize again")
    return scale.numpy().astype(np.float32).reshape(())


def _weight_tensors(weight: ir.TensorProtocol, scale: np.ndarray, name: str) -> tuple[ir.LazyTensor, ir.LazyTensor]:
    """(FLOAT4E2M1 values, FLOAT8E4M3FN block scales) of a weight initializer, computed lazily as they are
    written (the weight itself may stream from the checkpoint)."""
    import ml_dtypes

    step = torch.tensor(scale)
    rows, columns = weight.shape[0], weight.shape[1]

    def values() -> torch.Tensor:
        return torch.from_numpy(weight.numpy().astype(np.float32)).to(ELEMENT_TORCH[weight.dtype.name.lower()])

    def codes() -> ir.Tensor:
        data = values()
        grid = quantize_blocks(data, block_scales(data, step), step).numpy()
        return ir.Tensor(grid.astype(ml_dtypes.float4_e2m1fn), dtype=ir.DataType.FLOAT4E2M1, name=name + FP4_SUFFIX)

    def blocks() -> TorchTensor:
        return TorchTensor(block_scales(values(), step), name + BLOCK_SCALE_SUFFIX)

    return (
        ir.LazyTensor(codes, dtype=ir.DataType.FLOAT4E2M1, shape=ir.Shape([rows, columns]), name=name + FP4_SUFFIX),
        ir.LazyTensor(blocks, dtype=ir.DataType.FLOAT8E4M3FN, shape=ir.Shape([rows, columns // NVFP4_BLOCK]),
                      name=name + BLOCK_SCALE_SUFFIX),
    )  # fmt: skip


def _dequantize(graph: ir.Graph, node: ir.Node, values: ir.Value, blocks: ir.Value, scale: ir.Value) -> ir.Value:
    """The two DequantizeLinear (block scales, then values), cast to the placeholder's dtype; returns the output
    that replaces the placeholder's."""
    step = ir.node("DequantizeLinear", [blocks, scale], name=f"{node.name}/block_scale")
    step.outputs[0].dtype, step.outputs[0].shape = ir.DataType.FLOAT, blocks.shape
    dq = ir.node("DequantizeLinear", [values, step.outputs[0]], {"axis": -1, "block_size": NVFP4_BLOCK},
                 name=f"{node.name}/dequantize")  # fmt: skip
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.outputs[0].shape = node.outputs[0].shape
    nodes, out = [step, dq], dq.outputs[0]
    dtype = node.inputs[0].dtype
    if dtype is not None and dtype != ir.DataType.FLOAT:
        cast = ir.node("Cast", [out], {"to": dtype}, name=f"{node.name}/cast")
        cast.outputs[0].dtype, cast.outputs[0].shape = dtype, node.outputs[0].shape
        nodes.append(cast)
        out = cast.outputs[0]
    graph.insert_after(node, nodes)
    return out


def _blocked(shape: ir.Shape | None) -> ir.Shape | None:
    """The shape of the block scales of a tensor of `shape`: its last axis divided into blocks of 16."""
    if shape is None or not isinstance(shape[-1], int):
        return None
    return ir.Shape([*shape[:-1], shape[-1] // NVFP4_BLOCK])


def _rewrite(graph: ir.Graph, node: ir.Node) -> bool:
    """Replace one placeholder by the TensorRT pattern; True for a weight (pre-quantized)."""
    source, scale = node.inputs[0], _scale_of(node)
    is_weight = source.is_initializer() and source.const_value is not None
    base = source.name if is_weight else node.name
    global_value = _constant(base + GLOBAL_SCALE_SUFFIX, np.asarray(scale, dtype=np.float32))
    graph.register_initializer(global_value)
    if is_weight:
        codes, blocks = _weight_tensors(source.const_value, scale, source.name)
        values, block_values = _constant(codes.name, codes), _constant(blocks.name, blocks)
        graph.register_initializer(values)
        graph.register_initializer(block_values)
    else:
        quantize = ir.node(
            DYNAMIC_QUANTIZE, [source, global_value], {"axis": -1, "block_size": NVFP4_BLOCK,
            "scale_type": ir.DataType.FLOAT8E4M3FN.value}, domain=TRT_DOMAIN, num_outputs=2,
            name=f"{node.name}/dynamic_quantize",
        )  # fmt: skip
        values, block_values = quantize.outputs
        values.dtype, block_values.dtype = ir.DataType.FLOAT4E2M1, ir.DataType.FLOAT8E4M3FN
        values.shape, block_values.shape = source.shape, _blocked(source.shape)
        graph.insert_before(node, quantize)
    out = _dequantize(graph, node, values, block_values, global_value)
    node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if is_weight and not source.uses() and source.name in graph.initializers:
        graph.initializers.pop(source.name)
    return is_weight


def nvfp4_graph_pass(model: ir.Model) -> str:
    """Every traced NVFP4 placeholder becomes TensorRT's pattern: weights stored as FLOAT4E2M1 + FP8 block scales,
    activations through `trt::TRT_FP4DynamicQuantize`; the default domain is raised to opset 23 (FLOAT4E2M1
    DequantizeLinear). Returns the manifest note."""
    graph = model.graph
    placeholders = [node for node in graph if node.domain == NVFP4_DOMAIN]
    weights = sum(_rewrite(graph, node) for node in placeholders)
    model.opset_imports.pop(NVFP4_DOMAIN, None)
    model.opset_imports[""] = max(model.opset_imports.get("", MIN_NVFP4_OPSET), MIN_NVFP4_OPSET)
    model.opset_imports[TRT_DOMAIN] = 1
    dynamic = len(placeholders) - weights
    return f"{weights} weights stored as FLOAT4E2M1 in blocks of 16; {dynamic} activations quantized dynamically"


def _export_nvfp4_graph(
    source: ModelSource, spec: ComponentSpec, out_dir: Path, scales: tuple[dict[str, float], dict[str, float]],
    base_dtype: str, opset: int, external_data: bool | None, on_bytes: Callable[[int, int], None] | None,
) -> ExportedComponent:  # fmt: skip
    amax, weight_amax = scales
    return export_component(
        source, spec, out_dir, base_dtype, opset, external_data, translations=TRANSLATIONS,
        graph_pass=nvfp4_graph_pass, on_bytes=on_bytes, stem=nvfp4_stem(spec.name),
        prepare=lambda transformer: fake_quantize_nvfp4(transformer, amax, weight_amax),
    )  # fmt: skip


def _nvfp4_record(
    spec: ComponentSpec, exported: ExportedComponent, opset: int, base_dtype: str, calibration_path: Path,
    layers: int, kept_layers: Sequence[str],
) -> GraphRecord:  # fmt: skip
    kept = f"NVFP4 (FP4 E2M1, blocks of 16, E4M3 block scales) on {layers} block Linear layers; kept in {base_dtype}: "
    exported = replace(exported, notes=(kept + ", ".join(kept_layers), *exported.notes))
    quantization = {"format": NVFP4, "layers": layers, "block_size": NVFP4_BLOCK, "calibration": calibration_path.name}
    return replace(graph_record(spec, exported, opset, base_dtype, quantization=quantization), dtype=NVFP4)


def _initializer_names(path: Path) -> list[str]:
    """The initializer names of a written graph (its structure only: external data is not read)."""
    import onnx

    return [tensor.name for tensor in onnx.load(str(path), load_external_data=False).graph.initializer]


def check_nvfp4_options(base_dtype: str, opset: int) -> None:
    if base_dtype not in ("bf16", "fp32", "fp16"):
        raise FluxExportError(f"unknown base dtype {base_dtype!r}: choose bf16, fp16 or fp32 (--dtype)")
    if opset < 18:
        raise FluxExportError(f"NVFP4 graphs are traced at opset ≥ 18 (and written at {MIN_NVFP4_OPSET}), got {opset}")


def export_nvfp4(
    source: ModelSource,
    out_dir: Path,
    calibration: Calibration,
    calibration_path: Path,
    base_dtype: str = "bf16",
    opset: int | None = None,
    bounds: ExportBounds | None = None,
    external_data: bool | None = None,
    on_bytes: Callable[[str, int, int], None] | None = None,
    components: Sequence[str] | None = None,
) -> GraphRecord:
    """Export `out_dir/transformer.nvfp4.onnx` (and the parts the folder holds, as `export_quantized` does for
    FP8) with `calibration`'s amax; recorded in the manifest's `nvfp4` section beside the base graphs. The
    graphs are traced at `opset` (default: the export's) and written at opset 23. Returns the transformer's
    record."""
    from fluxexport.export.onnx_export import DEFAULT_OPSET

    opset = opset or DEFAULT_OPSET
    check_nvfp4_options(base_dtype, opset)
    out_dir, bounds = Path(out_dir), bounds or ExportBounds.for_model(source)
    names = quantized_components(source, out_dir, components)
    amax, weight_amax = calibration.input_amax, calibrated_weight_amax(source, calibration, base_dtype)
    specs, folder = component_specs(source, bounds), open_folder_for(source, out_dir, base_dtype, bounds)
    for name in names:
        progress = (lambda done, total, name=name: on_bytes(name, done, total)) if on_bytes else None
        exported = _export_nvfp4_graph(
            source, specs[name], out_dir, (amax, weight_amax), base_dtype, opset, external_data, progress
        )
        layers = sum(name.endswith(FP4_SUFFIX) for name in _initializer_names(exported.path))
        record = _nvfp4_record(specs[name], exported, MIN_NVFP4_OPSET, base_dtype, calibration_path, layers,
                               kept_high_precision(source))  # fmt: skip
        folder.nvfp4[name] = record
        folder.write()
    return open_export(out_dir).nvfp4[names[0]]


def quantize_nvfp4(
    source: ModelSource,
    out_dir: Path,
    settings: CalibrationSettings | None = None,
    base_dtype: str = "bf16",
    opset: int | None = None,
    bounds: ExportBounds | None = None,
    external_data: bool | None = None,
    calibration_device: str | None = None,
    calibration_file: Path | None = None,
    sequential: bool | None = None,
    log: Callable[[str], None] = lambda _: None,
    calibration_progress: Callable[[str], AbstractContextManager[Callable[[int, int], None]]] | None = None,
    on_bytes: Callable[[str, int, int], None] | None = None,
    components: Sequence[str] | None = None,
) -> GraphRecord:
    """`quantize_transformer`'s NVFP4 twin: calibrate on the runtime's trajectories (or reuse `calibration_file`,
    the same `calibration.json` FP8 writes: one calibration serves both formats), then `export_nvfp4`."""
    check_nvfp4_options(base_dtype, opset or MIN_NVFP4_OPSET)
    if components is not None:  # refused before calibration runs
        _check_fp8_components(components, source)
    settings, out_dir = settings or CalibrationSettings(), Path(out_dir)
    if calibration_file is not None:
        calibration, _ = read_calibration(calibration_file, source)
        path = keep_calibration(out_dir, calibration_file)
        log(f"reusing the scales of {calibration_file}: no calibration run")
    else:
        if sequential is None:
            sequential, why = choose_sequential(source, calibration_device)
            log(why)
        unit = "block passes" if sequential else "steps"
        title = f"calibrate {source.name} on {len(settings.prompts)} prompts ({unit})"
        with calibration_progress(title) if calibration_progress else nullcontext(None) as advance:
            calibration = calibrate_transformer(source, settings, calibration_device, sequential, on_progress=advance)
        path = write_calibration(out_dir, source, settings, calibration)
        log(f"calibration saved to {path} (reuse it with --calibration)")
    return export_nvfp4(
        source, out_dir, calibration, path, base_dtype, opset, bounds, external_data, on_bytes, components
    )
