"""One declarative spec per exported component: tensor names, dtypes, symbolic axes and their bounds.

Export (dynamic shapes), the ONNX Runtime backend (I/O), `check` (contract), `validate` (shapes to test)
and later TensorRT profiles and Triton dims all read these; no name or shape is written anywhere else.
Names follow NVIDIA's TensorRT diffusion demo (see ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from fluxexport.dtypes import COMPUTE
from fluxexport.errors import FluxExportError
from fluxexport.models.source import ModelSource
from fluxexport.runtime.kontext import PREFERRED_KONTEXT_RESOLUTIONS

COMPONENTS = ("clip", "t5", "transformer", "vae_decoder", "vae_encoder")
# The transformer in three parts, for First Block Cache (`--cache first-block`): the head (embedders and the first
# double block), the tail (every other block) and the output layers; exported on demand (`--transformer-parts`)
TRANSFORMER_PARTS = ("transformer_head", "transformer_tail", "transformer_out")
KNOWN_COMPONENTS = COMPONENTS + TRANSFORMER_PARTS
# Token count of the largest preferred Kontext reference (1568×672 → 98·42 packed tokens).
KONTEXT_REFERENCE_TOKENS = max((w // 16) * (h // 16) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
KONTEXT_REFERENCE_SIDE = max(max(size) for size in PREFERRED_KONTEXT_RESOLUTIONS)
KONTEXT_REFERENCE_MIN_SIDE = min(min(size) for size in PREFERRED_KONTEXT_RESOLUTIONS)

Dim = int | str  # a fixed size, or the name of a symbolic axis


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. dtype COMPUTE ("compute") means the component's precision (fp32/bf16/fp16)."""

    name: str
    dtype: str  # COMPUTE | "float32" | "int32"
    dims: tuple[Dim, ...]
    value_range: tuple[float, float] = (-1.0, 1.0)  # where sample inputs are drawn from


@dataclass(frozen=True)
class Axis:
    """A symbolic axis: its bounds become torch.export Dims, TensorRT profiles and Triton -1 dims.
    `multiple` constrains sizes (VAE pixels are multiples of 8); `opt` is the profile's optimum."""

    min: int
    opt: int
    max: int
    multiple: int = 1


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, Axis]
    export_sizes: dict[str, int]  # sample sizes for export: every axis ≥ 2 and distinct, so none specialises
    derived: dict[str, tuple[str, int]] = field(default_factory=dict)  # output axis → (input axis, factor)

    def input(self, name: str) -> TensorSpec:
        return next(tensor for tensor in self.inputs if tensor.name == name)

    def shape(self, tensor: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape of `tensor` for axis sizes (derived output axes computed from their source)."""
        resolved = dict(sizes)
        for axis, (source, factor) in self.derived.items():
            if source in resolved:
                resolved[axis] = resolved[source] * factor
        return tuple(dim if isinstance(dim, int) else resolved[dim] for dim in tensor.dims)

    def shape_range(self, tensor: TensorSpec) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of an input over the spec's axes: a TensorRT optimization profile's entry."""
        return tuple(
            self.shape(tensor, {axis: getattr(bounds, which) for axis, bounds in self.axes.items()})
            for which in ("min", "opt", "max")
        )  # type: ignore[return-value]


@dataclass(frozen=True)
class ExportBounds:
    """The range an export (and later an engine's profiles) must serve: min/opt/max batch, image side, T5 tokens.

    Graphs are exported for the whole range; `fluxexport build` makes one TensorRT profile per resolution
    bucket of it (`with_resolution`), so every bound lives here and the axes follow from `component_specs`."""

    max_batch: int = 4
    min_resolution: int = 256
    opt_resolution: int = 1024
    max_resolution: int = 1360
    max_text_length: int = 512
    opt_text_length: int = 512
    min_batch: int = 1
    opt_batch: int = 1
    min_text_length: int = 1

    @classmethod
    def for_model(cls, source: ModelSource, **overrides) -> ExportBounds:
        """Real checkpoints: 256–1360 px like NVIDIA's demo; tiny ones: 64–1024 px around 256."""
        defaults = {"opt_text_length": source.default_max_sequence_length}
        if source.is_tiny:
            defaults |= {"min_resolution": 64, "opt_resolution": source.default_size, "max_resolution": 1024}
        bounds = cls(**(defaults | {k: v for k, v in overrides.items() if v is not None}))
        bounds.check()
        return bounds

    @property
    def batch(self) -> tuple[int, int, int]:
        return self.min_batch, self.opt_batch, self.max_batch

    @property
    def resolution(self) -> tuple[int, int, int]:
        return self.min_resolution, self.opt_resolution, self.max_resolution

    @property
    def text_length(self) -> tuple[int, int, int]:
        return self.min_text_length, self.opt_text_length, self.max_text_length

    def with_resolution(self, low: int, opt: int, high: int) -> ExportBounds:
        """The same bounds over a narrower resolution range (one TensorRT profile's bucket)."""
        return replace(self, min_resolution=low, opt_resolution=opt, max_resolution=high)

    def check(self) -> None:
        if not 16 <= self.min_resolution <= self.opt_resolution <= self.max_resolution:
            raise FluxExportError(
                f"resolutions must satisfy 16 ≤ min ≤ opt ≤ max, got {self.min_resolution}, "
                f"{self.opt_resolution}, {self.max_resolution} (--min-resolution/--max-resolution)"
            )
        if any(value % 16 for value in self.resolution):
            raise FluxExportError("resolutions must be multiples of 16 (--min-resolution/--max-resolution)")
        if self.max_batch < 1:
            raise FluxExportError(f"max batch must be at least 1, got {self.max_batch} (--max-batch)")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise FluxExportError(f"batch needs 1 ≤ MIN ≤ OPT ≤ MAX, got {':'.join(map(str, self.batch))} (--batch)")
        if not 1 <= self.min_text_length <= self.opt_text_length <= self.max_text_length:
            text = ":".join(map(str, self.text_length))
            raise FluxExportError(f"text length needs 1 ≤ MIN ≤ OPT ≤ MAX, got {text} (--text-len)")


def pipeline_components(source: ModelSource) -> tuple[str, ...]:
    """The components a text-to-image run needs: the four, plus the VAE encoder for Kontext's reference."""
    return tuple(name for name in COMPONENTS if name != "vae_encoder" or source.is_kontext)


def image_tokens(side: int) -> int:
    """Packed tokens of a side×side image (16 px per token side: 8× VAE, 2×2 packing)."""
    return (side // 16) ** 2


def kontext_tokens(low: int, opt: int, high: int) -> tuple[int, int, int]:
    """Transformer tokens for Kontext targets of low/opt/high px: the noise tokens plus the reference's,
    which is a preferred Kontext size (auto-resize) or at most as large as the target (--keep-reference-size)."""
    largest = max(KONTEXT_REFERENCE_TOKENS, image_tokens(high))
    return image_tokens(low), image_tokens(opt) + KONTEXT_REFERENCE_TOKENS, image_tokens(high) + largest


def kontext_encoder_sides(low: int, opt: int, high: int) -> tuple[int, int, int]:
    """Pixel sides the VAE encoder sees for Kontext: the targets' range widened to every preferred size."""
    return min(low, KONTEXT_REFERENCE_MIN_SIDE), opt, max(high, KONTEXT_REFERENCE_SIDE)


def component_specs(source: ModelSource, bounds: ExportBounds | None = None) -> dict[str, ComponentSpec]:
    """The five component specs for a checkpoint, with widths read from its configs."""
    bounds = bounds or ExportBounds.for_model(source)
    batch = Axis(*bounds.batch)
    clip_length = int(source.clip.get("max_position_embeddings", 77))
    clip_width = int(source.clip["hidden_size"])
    t5_width = int(source.t5["d_model"])
    packed = int(source.transformer.get("in_channels", 64))
    channels = source.latent_channels
    scale = source.vae_scale_factor
    min_side, opt_side, max_side = bounds.min_resolution, bounds.opt_resolution, bounds.max_resolution
    text = Axis(*bounds.text_length)

    sides = (min_side, opt_side, max_side)
    if source.is_kontext:
        tokens, encoder_sides = Axis(*kontext_tokens(*sides)), kontext_encoder_sides(*sides)
    else:
        tokens, encoder_sides = Axis(*(image_tokens(side) for side in sides)), sides

    transformer_inputs = [
        TensorSpec("hidden_states", COMPUTE, ("B", "N", packed), (-3.0, 3.0)),
        TensorSpec("encoder_hidden_states", COMPUTE, ("B", "L", t5_width)),
        TensorSpec("pooled_projections", COMPUTE, ("B", clip_width)),
        TensorSpec("timestep", COMPUTE, ("B",), (0.0, 1.0)),
        TensorSpec("img_ids", "float32", ("N", 3), (0.0, 64.0)),
        TensorSpec("txt_ids", "float32", ("L", 3), (0.0, 0.0)),
    ]
    if source.guidance_embeds:
        transformer_inputs.append(TensorSpec("guidance", "float32", ("B",), (1.0, 5.0)))

    width = int(source.transformer.get("num_attention_heads", 24)) * int(
        source.transformer.get("attention_head_dim", 128)
    )
    image_hidden = TensorSpec("image_hidden", COMPUTE, ("B", "N", width), (-3.0, 3.0))
    text_hidden = TensorSpec("text_hidden", COMPUTE, ("B", "L", width), (-3.0, 3.0))
    temb = TensorSpec("temb", COMPUTE, ("B", width), (-3.0, 3.0))
    ids = transformer_inputs[4:6]
    transformer_axes = {"B": batch, "N": tokens, "L": text}
    transformer_sizes = {"B": 2, "N": 24, "L": 13}
    parts = {
        "transformer_head": ComponentSpec(
            "transformer_head",
            inputs=tuple(transformer_inputs),
            outputs=(TensorSpec("first_block_residual", COMPUTE, ("B", "N", width)), image_hidden, text_hidden, temb),
            axes=transformer_axes,
            export_sizes=transformer_sizes,
        ),
        "transformer_tail": ComponentSpec(
            "transformer_tail",
            inputs=(image_hidden, text_hidden, temb, *ids),
            outputs=(TensorSpec("tail_hidden", COMPUTE, ("B", "N", width)),),  # the image stream after every block
            axes=transformer_axes,
            export_sizes=transformer_sizes,
        ),
        "transformer_out": ComponentSpec(
            "transformer_out",
            inputs=(image_hidden, temb),
            outputs=(TensorSpec("latent", COMPUTE, ("B", "N", packed)),),
            axes={"B": batch, "N": tokens},
            export_sizes={"B": 2, "N": 24},
        ),
    }

    latent_axis = Axis(min_side // scale, opt_side // scale, max_side // scale)
    pixel_axis = Axis(*encoder_sides, multiple=scale)
    return {
        "clip": ComponentSpec(
            "clip",
            inputs=(TensorSpec("input_ids", "int32", ("B", clip_length), (0, int(source.clip["vocab_size"]) - 1)),),
            outputs=(
                TensorSpec("text_embeddings", COMPUTE, ("B", clip_length, clip_width)),
                TensorSpec("pooled_embeddings", COMPUTE, ("B", clip_width)),
            ),
            axes={"B": batch},
            export_sizes={"B": 2},
        ),
        "t5": ComponentSpec(
            "t5",
            inputs=(TensorSpec("input_ids", "int32", ("B", "L"), (0, int(source.t5["vocab_size"]) - 1)),),
            outputs=(TensorSpec("text_embeddings", COMPUTE, ("B", "L", t5_width)),),
            axes={"B": batch, "L": text},
            export_sizes={"B": 2, "L": 11},
        ),
        "transformer": ComponentSpec(
            "transformer",
            inputs=tuple(transformer_inputs),
            outputs=(TensorSpec("latent", COMPUTE, ("B", "N", packed)),),
            axes={"B": batch, "N": tokens, "L": text},
            export_sizes={"B": 2, "N": 24, "L": 13},
        ),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            inputs=(TensorSpec("latent", COMPUTE, ("B", channels, "h", "w"), (-3.0, 3.0)),),
            outputs=(TensorSpec("images", COMPUTE, ("B", 3, "H", "W")),),
            axes={"B": batch, "h": latent_axis, "w": latent_axis},
            export_sizes={"B": 2, "h": 6, "w": 10},
            derived={"H": ("h", scale), "W": ("w", scale)},
        ),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            inputs=(TensorSpec("images", COMPUTE, ("B", 3, "H", "W")),),
            outputs=(TensorSpec("latent", COMPUTE, ("B", channels, "h", "w")),),
            axes={"B": batch, "H": pixel_axis, "W": pixel_axis},
            export_sizes={"B": 2, "H": 48, "W": 80},
            derived={"h": ("H", 1 / scale), "w": ("W", 1 / scale)},
        ),
    } | parts


def sample_inputs(
    spec: ComponentSpec, sizes: dict[str, int], dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs for `spec` at axis `sizes`: int32 ids in the vocabulary, floats in each tensor's range."""
    generator = torch.Generator().manual_seed(seed)
    feeds = {}
    for tensor in spec.inputs:
        shape = spec.shape(tensor, sizes)
        low, high = tensor.value_range
        if tensor.dtype == "int32":
            feeds[tensor.name] = torch.randint(int(low), int(high) + 1, shape, generator=generator, dtype=torch.int32)
        else:
            values = torch.rand(shape, generator=generator) * (high - low) + low
            feeds[tensor.name] = values.to(dtype if tensor.dtype == COMPUTE else torch.float32)
    return feeds


def validation_sizes(spec: ComponentSpec, within_bounds: bool = False) -> list[tuple[dict[str, int], bool]]:
    """Three shapes per dynamic axis: the export sample, a small one (batch 1), a larger unseen one (batch 3, or
    the largest the spec's bounds allow). `within_bounds`: the export sample too is moved into the spec's bounds
    (engines serve only their profiles; a graph takes any size)."""

    def fit(axis: str, value: float) -> int:
        bounds = spec.axes[axis]
        value = max(bounds.min, min(bounds.max, int(value)))
        return max(bounds.multiple, value // bounds.multiple * bounds.multiple)

    small = {axis: 1 if axis == "B" else fit(axis, bounds.min) for axis, bounds in spec.axes.items()}
    large = {axis: min(3, spec.axes[axis].max) if axis == "B" else fit(axis, spec.export_sizes[axis] * 2.5 + 8)
             for axis in spec.axes}  # fmt: skip
    seen = {axis: fit(axis, size) if within_bounds else size for axis, size in spec.export_sizes.items()}
    return [(seen, True), (small, False), (large, False)]
