"""A published FP8 or NVFP4 checkpoint (`models/quantized_checkpoint.py`) straight to our FP8 Q/DQ graph, or to
`quantize --precision nvfp4`'s graph, with the checkpoint's own scales: no calibration, no high-precision copy of
the weights on disk. (NVFP4: `export_checkpoint_nvfp4`, the file's codes and block scales written as they are.)

Each Linear whose weight the checkpoint quantized becomes a `CheckpointFP8Linear`: its weight passes through
Q/DQ with the checkpoint's `weight_scale` (per row, ONNX's per-axis Q/DQ on axis 0, for black-forest-labs'
fp8r; per tensor for ComfyUI's / ModelOpt's FP8), its input through Q/DQ with the checkpoint's `input_scale` where
the layout has one (fp8r has none: the graph is weight-only there, as diffusers runs it). The trace runs on fake
weights; each weight's QuantizeLinear is then replaced by its FP8 initializer, computed as it is written from
the dequantized checkpoint tensor: q · s / s rounds back to q exactly (the product's error is far below half an
E4M3 step), so the initializer holds the checkpoint's very FP8 bytes (tests/test_quantized_checkpoints.py checks
them). Layers the checkpoint kept in high precision stay so.

In a bf16 graph the scales are bf16 as the rest of its Q/DQ (TensorRT fuses DQ into the GEMM in the compute
type); an fp32 graph keeps them exact, and equals the checkpoint run in PyTorch as diffusers runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import onnx
import torch
from onnx_ir.tensor_adapters import TorchTensor
from onnxscript import opset20 as op
from torch import nn

from fluxexport.artifacts.folders import fp8_stem
from fluxexport.artifacts.records import GraphRecord
from fluxexport.dtypes import quantize_e4m3, torch_dtype
from fluxexport.errors import FluxExportError
from fluxexport.export.onnx_export import DEFAULT_OPSET, export_component, graph_record, open_folder_for
from fluxexport.models.source import ModelSource
from fluxexport.quantize.fp8 import TRANSLATIONS, fp8_qdq
from fluxexport.specs import ComponentSpec, ExportBounds, component_specs


@torch.library.custom_op("fluxexport::fp8_qdq_rows", mutates_args=())
def fp8_qdq_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An `[N, K]` weight rounded to the E4M3 grid of its row's scale (`scale` `[N]`) and back."""
    step = scale[:, None]
    return quantize_e4m3(weight, step).to(weight.dtype) * step.to(weight.dtype)


@fp8_qdq_rows.register_fake
def _(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(weight)


def fp8_qdq_rows_onnx(weight, scale):
    step = op.CastLike(scale, weight)
    # zeros shaped as the scale (per-axis Q/DQ), folded into an initializer (ONNX Runtime has no FP8 ConstantOfShape)
    zero_point = op.Cast(op.Mul(scale, op.Constant(value_float=0.0)), to=onnx.TensorProto.FLOAT8E4M3FN)
    return op.DequantizeLinear(op.QuantizeLinear(weight, step, zero_point, axis=0), step, zero_point, axis=0)


CHECKPOINT_TRANSLATIONS = {**TRANSLATIONS, torch.ops.fluxexport.fp8_qdq_rows.default: fp8_qdq_rows_onnx}


class CheckpointFP8Linear(nn.Linear):
    """A Linear computing as its checkpoint's FP8 layer: the weight through Q/DQ with the checkpoint's weight
    scale (`[N]` per row, or a scalar), the input through Q/DQ with its input scale if it has one. It shares the
    Linear's parameters under their names, so the checkpoint's tensors and the initializers keep them."""

    def __init__(self, linear: nn.Linear, weight_scale: torch.Tensor, input_scale: float | None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("weight_scale", weight_scale.float().clone())
        scale = None if input_scale is None else torch.tensor(input_scale, dtype=torch.float32)
        self.register_buffer("input_scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.weight_scale.dim() == 1
        weight = (fp8_qdq_rows if rows else fp8_qdq)(self.weight, self.weight_scale)
        if self.input_scale is not None:
            x = fp8_qdq(x, self.input_scale)
        return nn.functional.linear(x, weight, self.bias)


def checkpoint_scales(source: ModelSource) -> dict[str, tuple[torch.Tensor, float | None]]:
    """Each quantized Linear of the checkpoint (diffusers names): (weight scale, input scale or None), the scales
    cut to the rows of a fused BFL tensor the Linear takes."""
    from safetensors import safe_open

    from fluxexport.models.checkpoint import CheckpointTensors
    from fluxexport.models.quantized_checkpoint import read_scales

    if source.quantized_layout is None:
        raise FluxExportError(f"{source.name} has no FP8 weights with scales: quantize it (calibration) instead")
    scales = {}
    for name, location in CheckpointTensors(source, "transformer").locations.items():
        if location.scale is None:
            continue
        with safe_open(str(location.file), framework="pt") as handle:
            scales[name.removesuffix(".weight")] = read_scales(handle, location.scale, location.rows)
    return scales


def with_input_scales(
    scales: dict[str, tuple[torch.Tensor, float | None]], input_amax: dict[str, float]
) -> dict[str, tuple[torch.Tensor, float | None]]:
    """The checkpoint's scales with a calibrated per-tensor input scale (amax / 448, as `quantize` calibrates) for
    each layer that has none and whose input was calibrated: a weight-only FP8 layer (BFL's fp8r) becomes an FP8
    GEMM. The weight scales, and any input scale the checkpoint has, stay the checkpoint's."""
    from fluxexport.dtypes import E4M3_MAX

    return {
        name: (weight, float(input_amax[name]) / E4M3_MAX if given is None and name in input_amax else given)
        for name, (weight, given) in scales.items()
    }


def apply_checkpoint_scales(transformer: nn.Module, scales: dict[str, tuple[torch.Tensor, float | None]]) -> nn.Module:
    """Replace each quantized Linear by a CheckpointFP8Linear, in place; returns the transformer."""
    for name, (weight_scale, input_scale) in scales.items():
        parent, _, child = name.rpartition(".")
        linear = transformer.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise FluxExportError(f"the checkpoint quantizes {name}, which is no Linear of the transformer")
        setattr(transformer.get_submodule(parent), child, CheckpointFP8Linear(linear, weight_scale, input_scale))
    return transformer


def checkpoint_fp8_transformer(source: ModelSource, dtype: str = "fp32") -> nn.Module:
    """The PyTorch reference of the graph: the checkpoint's transformer (dequantized weights) with its quantized
    layers' Q/DQ, behind the family's transformer adapter."""
    from fluxexport.adapters import adapter_for
    from fluxexport.models.loaders import load_transformer

    model = apply_checkpoint_scales(load_transformer(source, torch_dtype(dtype)), checkpoint_scales(source))
    return adapter_for(source, "transformer", model).eval()


def store_checkpoint_weights(model) -> str | None:
    """Each weight's QuantizeLinear (per tensor, or per row on axis 0) replaced by its FLOAT8E4M3FN initializer
    `<weight>.fp8`, quantized lazily from the dequantized checkpoint tensor with the node's scale: the
    checkpoint's own FP8 values."""
    from fluxexport.quantize.qdq_export import store_weights_in_fp8

    return store_weights_in_fp8(model, "checkpoint FP8 weights")


def _record(
    source: ModelSource, spec: ComponentSpec, exported, opset: int, base_dtype: str, layers: int, calibrated: int = 0
) -> GraphRecord:
    """The manifest record: the layers the checkpoint quantized, its layout and file, and how many of their inputs
    took calibrated scales in the model (`calibrated`; 0: no calibration)."""
    layout, file = source.quantized_layout, source.transformer_file
    added = f", activation scales calibrated for the {calibrated} the checkpoint left weight-only" if calibrated else ""
    note = (f"FP8 E4M3 Q/DQ with the checkpoint's own scales ({layout}: {file.name if file else source.name}) on "
            f"{layers} Linear layers{added}; the rest kept in {base_dtype}")  # fmt: skip
    exported = replace(exported, notes=(note, *exported.notes))
    quantization = {"format": "fp8_e4m3", "layout": layout, "layers": layers,
                    "scales": "checkpoint, calibrated activations" if calibrated else "checkpoint"}  # fmt: skip
    return replace(graph_record(spec, exported, opset, base_dtype, quantization=quantization), dtype="fp8")


def export_checkpoint_fp8(
    source: ModelSource,
    out_dir: Path,
    base_dtype: str = "bf16",
    opset: int = DEFAULT_OPSET,
    bounds: ExportBounds | None = None,
    external_data: bool | None = None,
    on_bytes: Callable[[str, int, int], None] | None = None,
    components: Sequence[str] | None = None,
    input_amax: dict[str, float] | None = None,
) -> GraphRecord:
    """`out_dir/transformer.fp8.onnx` (and each of `components`' `<part>.fp8.onnx`, default as `quantize`'s) from
    the checkpoint's FP8 weights and scales, recorded in the manifest's `fp8` section; no model runs. `input_amax`
    (a calibration's) gives the layers without an input scale one (`with_input_scales`). Returns the first
    graph's record."""
    from fluxexport.quantize.qdq_export import _check_fp8_components, check_quantize_options, fp8_components

    check_quantize_options(base_dtype, opset)
    out_dir, bounds = Path(out_dir), bounds or ExportBounds.for_model(source)
    names = list(fp8_components(out_dir) if components is None else components)
    _check_fp8_components(names, source)
    own = checkpoint_scales(source)
    scales = with_input_scales(own, input_amax) if input_amax else own
    calibrated = sum(given is None and scales[name][1] is not None for name, (_, given) in own.items())
    specs, folder = component_specs(source, bounds), open_folder_for(source, out_dir, base_dtype, bounds)
    for name in names:
        progress = (lambda done, total, name=name: on_bytes(name, done, total)) if on_bytes else None
        exported = export_component(
            source, specs[name], out_dir, base_dtype, opset, external_data, translations=CHECKPOINT_TRANSLATIONS,
            graph_pass=store_checkpoint_weights, on_bytes=progress, stem=fp8_stem(name),
            prepare=lambda transformer: apply_checkpoint_scales(transformer, scales),
        )  # fmt: skip
        layers = sum(origin.fp8_scale is not None for origin in (exported.weights or {}).values())
        folder.fp8[name] = _record(source, specs[name], exported, opset, base_dtype, layers, calibrated)
        folder.write()
    return folder.fp8[names[0]]


def apply_checkpoint_nvfp4(transformer: nn.Module, scales: dict[str, tuple[torch.Tensor, float | None]]) -> nn.Module:
    """Replace each NVFP4 Linear of the checkpoint by an `NVFP4Linear` (quantize/nvfp4.py) whose per-tensor scales
    are the checkpoint's own: `weight_scale_2` for the weight, `input_scale` for the activations' dynamic blocks."""
    from fluxexport.quantize.nvfp4 import NVFP4Linear

    for name, (global_scale, input_scale) in scales.items():
        parent, _, child = name.rpartition(".")
        module = NVFP4Linear(transformer.get_submodule(name), 1.0, 1.0)
        module.weight_scale.fill_(float(global_scale))
        module.input_scale.fill_(float(input_scale if input_scale is not None else 0.0))
        setattr(transformer.get_submodule(parent), child, module)
    return transformer


def checkpoint_nvfp4_pass(source: ModelSource) -> Callable:
    """The NVFP4 graph pass (`nvfp4_graph_pass`: TensorRT's pattern) with each weight's FLOAT4E2M1 codes and E4M3
    block scales then read from the checkpoint as they are written, instead of computed again from the weight."""
    import ml_dtypes
    import onnx_ir as ir
    from safetensors import safe_open

    from fluxexport.models.checkpoint import CheckpointTensors
    from fluxexport.models.quantized_checkpoint import e2m1_values
    from fluxexport.quantize.nvfp4_export import BLOCK_SCALE_SUFFIX, FP4_SUFFIX, nvfp4_graph_pass

    locations = CheckpointTensors(source, "transformer").locations

    def read(location, key: str) -> torch.Tensor:
        with safe_open(str(location.file), framework="pt") as handle:
            tensor = handle.get_slice(key)
            return tensor[location.rows[0] : location.rows[1]] if location.rows else tensor[:]

    def codes(location, name: str) -> ir.Tensor:
        values = e2m1_values(read(location, location.key)).numpy().astype(ml_dtypes.float4_e2m1fn)
        return ir.Tensor(values, dtype=ir.DataType.FLOAT4E2M1, name=name)

    def blocks(location, name: str) -> TorchTensor:
        return TorchTensor(read(location, location.scale.weight_scale).contiguous(), name)

    def graph_pass(model) -> str:
        note, replaced = nvfp4_graph_pass(model), 0
        for name, value in model.graph.initializers.items():
            suffix = next((end for end in (FP4_SUFFIX, BLOCK_SCALE_SUFFIX) if name.endswith(end)), None)
            if suffix is None:
                continue
            location = locations[name.removesuffix(suffix).split(".", 1)[1]]  # under the adapter's module name
            make = codes if suffix == FP4_SUFFIX else blocks
            lazy = lambda make=make, location=location, name=name: make(location, name)  # noqa: E731
            value.const_value = ir.LazyTensor(lazy, dtype=value.const_value.dtype, shape=value.shape, name=name)
            replaced += suffix == FP4_SUFFIX
        return f"{note}; {replaced} weights' codes and block scales are the checkpoint's own"

    return graph_pass


def export_checkpoint_nvfp4(
    source: ModelSource,
    out_dir: Path,
    base_dtype: str = "bf16",
    opset: int = DEFAULT_OPSET,
    bounds: ExportBounds | None = None,
    external_data: bool | None = None,
    on_bytes: Callable[[str, int, int], None] | None = None,
    components: Sequence[str] | None = None,
) -> GraphRecord:
    """`out_dir/transformer.nvfp4.onnx` (and `components`' parts) from an NVFP4 checkpoint: `quantize --precision
    nvfp4`'s graph with the checkpoint's codes, block scales, `weight_scale_2` and `input_scale`; no calibration.
    Recorded in the manifest's `nvfp4` section; returns the first graph's record."""
    from fluxexport.quantize.nvfp4 import MIN_NVFP4_OPSET
    from fluxexport.quantize.nvfp4 import TRANSLATIONS as NVFP4_TRANSLATIONS
    from fluxexport.quantize.nvfp4_export import FP4_SUFFIX, NVFP4, check_nvfp4_options, nvfp4_stem
    from fluxexport.quantize.qdq_export import _check_fp8_components, fp8_components

    check_nvfp4_options(base_dtype, opset)
    out_dir, bounds = Path(out_dir), bounds or ExportBounds.for_model(source)
    names = list(fp8_components(out_dir) if components is None else components)
    _check_fp8_components(names, source)
    scales, graph_pass = checkpoint_scales(source), checkpoint_nvfp4_pass(source)
    specs, folder = component_specs(source, bounds), open_folder_for(source, out_dir, base_dtype, bounds)
    for name in names:
        progress = (lambda done, total, name=name: on_bytes(name, done, total)) if on_bytes else None
        exported = export_component(
            source, specs[name], out_dir, base_dtype, opset, external_data, translations=NVFP4_TRANSLATIONS,
            graph_pass=graph_pass, on_bytes=progress, stem=nvfp4_stem(name),
            prepare=lambda transformer: apply_checkpoint_nvfp4(transformer, scales),
        )  # fmt: skip
        written = onnx.load(str(exported.path), load_external_data=False).graph.initializer
        layers = sum(tensor.name.endswith(FP4_SUFFIX) for tensor in written)
        file = source.transformer_file.name if source.transformer_file else source.name
        note = f"NVFP4 with the checkpoint's own codes and scales ({file}) on {layers} Linear layers"
        exported = replace(exported, notes=(note, *exported.notes))
        quantization = {"format": NVFP4, "layout": NVFP4, "layers": layers, "block_size": 16, "scales": "checkpoint"}
        record = graph_record(specs[name], exported, MIN_NVFP4_OPSET, base_dtype, quantization=quantization)
        folder.nvfp4[name] = replace(record, dtype=NVFP4)
        folder.write()
    return folder.nvfp4[names[0]]
