"""The spec vocabulary: tensors, axes, components and the export bounds; no model family here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from fluxexport.errors import FluxExportError
from fluxexport.families import FAMILIES
from fluxexport.families.flux2.runtime import MAX_REFERENCE_AREA, MAX_REFERENCE_ASPECT, MIN_REFERENCE_SIDE
from fluxexport.models.source import ModelSource

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


# FLUX.2's reference budget (ExportBounds fields) and the options that set it at export and build
REFERENCE_OPTIONS = {
    "max_references": "--max-references",
    "max_reference_area": "--max-reference-area",
    "max_reference_aspect": "--max-reference-aspect",
}


def refuse_reference_options(source: ModelSource, **given: object) -> None:
    """The reference budget sizes FLUX.2's engines; FLUX.1 Kontext's reference follows its preferred sizes."""
    named = [REFERENCE_OPTIONS[key] for key, value in given.items() if value is not None]
    if named and not source.family.reference_budget:
        budgeted = " and ".join(family.title for family in FAMILIES if family.reference_budget)
        raise FluxExportError(
            f"{named[0]} sizes {budgeted}'s reference images; {source.name} is {source.family.title} (Kontext's "
            "reference bounds follow its preferred sizes): drop it"
        )


@dataclass(frozen=True)
class ExportBounds:
    """The range an export (and later an engine's profiles) must serve: min/opt/max batch, image side, text
    tokens, and FLUX.2's reference budget (how many reference images beside the target, the pixels of each, their
    largest aspect ratio), which sizes the transformer's token axis and the VAE encoder's sides apart from the
    target's (`families/flux2/specs.py`).

    Graphs are exported for the whole range; `fluxexport build` makes one TensorRT profile per resolution
    bucket of it (`with_resolution`; each bucket serves the whole reference budget), so every bound lives here
    and the axes follow from `component_specs`."""

    max_batch: int = 4
    min_resolution: int = 256
    opt_resolution: int = 1024
    max_resolution: int = 1360
    max_text_length: int = 512
    opt_text_length: int = 512
    min_batch: int = 1
    opt_batch: int = 1
    min_text_length: int = 1
    max_references: int = 1  # FLUX.2 reference images beside the target
    max_reference_area: int = MAX_REFERENCE_AREA  # pixels of each (diffusers scales larger ones to ~1 MP)
    max_reference_aspect: float = 2.0  # longest side / shortest side of a reference at that area

    @classmethod
    def for_model(cls, source: ModelSource, **overrides) -> ExportBounds:
        """Real checkpoints: 256–1360 px like NVIDIA's demo; tiny ones: 64–1024 px around 256."""
        refuse_reference_options(source, **{key: overrides.get(key) for key in REFERENCE_OPTIONS})
        defaults = {"opt_text_length": source.default_max_sequence_length}
        if source.is_tiny:
            defaults |= {"min_resolution": 64, "opt_resolution": source.default_size, "max_resolution": 1024}
        bounds = cls(**(defaults | {k: v for k, v in overrides.items() if v is not None}))
        bounds.check()
        return bounds

    @classmethod
    def from_json(cls, data: dict[str, Any], built: bool = False) -> ExportBounds:
        """Bounds as a manifest records them. Engines (`built`) recorded before the reference budget was served
        one reference of up to 1 MP at 1:1 (1024 px sides); an export without it takes today's defaults."""
        legacy = {"max_reference_aspect": 1.0} if built else {}
        return cls(**(legacy | data))

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
        self.check_references()

    def check_references(self) -> None:
        """The reference budget within what FLUX.2's pipelines send: diffusers scales a reference to at most
        1 MP and refuses sides under 64 px and aspect ratios past 8:1."""
        if self.max_references < 0:
            raise FluxExportError(f"max references must be at least 0, got {self.max_references} (--max-references)")
        if not MIN_REFERENCE_SIDE**2 <= self.max_reference_area <= MAX_REFERENCE_AREA:
            raise FluxExportError(
                f"max reference area must be {MIN_REFERENCE_SIDE**2}..{MAX_REFERENCE_AREA} px (FLUX.2 pipelines "
                f"scale larger references to 1 MP), got {self.max_reference_area} (--max-reference-area)"
            )
        if not 1 <= self.max_reference_aspect <= MAX_REFERENCE_ASPECT:
            raise FluxExportError(
                f"max reference aspect ratio must be 1..{MAX_REFERENCE_ASPECT} (FLUX.2 pipelines refuse wider), "
                f"got {self.max_reference_aspect:g} (--max-reference-aspect)"
            )


def image_tokens(side: int) -> int:
    """Packed tokens of a side×side image (16 px per token side: 8× VAE, 2×2 packing; FLUX.1 and FLUX.2 alike)."""
    return (side // 16) ** 2


def transformer_part_specs(
    transformer_inputs: tuple[TensorSpec, ...], width: int, channels: int, axes: dict[str, Axis],
    sizes: dict[str, int], carried: tuple[TensorSpec, ...] = (),
) -> dict[str, ComponentSpec]:  # fmt: skip
    """The transformer in three parts, for the step caches that skip blocks (`--cache first-block`, `magcache`):
    the head (embedders and the first double block) takes the transformer's inputs and gives the first block's
    image residual, both streams, the time embedding, the image stream that entered the first block, the first
    block's modulated image input (its norm1 with the time modulation: what TeaCache compares) and `carried` (what the head computes for the tail: FLUX.2's double-block modulation vectors); the tail (every
    other block) gives the image stream after them; out (the output layers) gives the latent."""
    from fluxexport.dtypes import COMPUTE

    image_hidden = TensorSpec("image_hidden", COMPUTE, ("B", "N", width), (-3.0, 3.0))
    text_hidden = TensorSpec("text_hidden", COMPUTE, ("B", "L", width), (-3.0, 3.0))
    temb = TensorSpec("temb", COMPUTE, ("B", width), (-3.0, 3.0))
    ids = tuple(tensor for tensor in transformer_inputs if tensor.name in ("img_ids", "txt_ids"))
    return {
        "transformer_head": ComponentSpec(
            "transformer_head",
            inputs=transformer_inputs,
            outputs=(
                TensorSpec("first_block_residual", COMPUTE, ("B", "N", width)),
                image_hidden,
                text_hidden,
                temb,
                TensorSpec("image_embedded", COMPUTE, ("B", "N", width)),  # the stream entering the first block
                TensorSpec("first_block_modulated", COMPUTE, ("B", "N", width)),  # what TeaCache compares
                *carried,
            ),
            axes=axes,
            export_sizes=sizes,
        ),
        "transformer_tail": ComponentSpec(
            "transformer_tail",
            inputs=(image_hidden, text_hidden, temb, *carried, *ids),
            outputs=(TensorSpec("tail_hidden", COMPUTE, ("B", "N", width)),),  # the image stream after every block
            axes=axes,
            export_sizes=sizes,
        ),
        "transformer_out": ComponentSpec(
            "transformer_out",
            inputs=(image_hidden, temb),
            outputs=(TensorSpec("latent", COMPUTE, ("B", "N", channels)),),
            axes={"B": axes["B"], "N": axes["N"]},
            export_sizes={"B": sizes["B"], "N": sizes["N"]},
        ),
    }


def vae_specs(
    batch: Axis, channels: int, latent_axis: Axis, pixel_axis: Axis, scale: int, latent_sample: tuple[int, int]
) -> dict[str, ComponentSpec]:
    """The VAE decoder and encoder specs of either family: `channels` latent channels at 1/`scale` of the pixels
    (FLUX.1: 16 at 1/8; FLUX.2: its 128 patchified channels at 1/16); `latent_sample` is the decoder's export
    sample (h, w)."""
    from fluxexport.dtypes import COMPUTE

    return {
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            inputs=(TensorSpec("latent", COMPUTE, ("B", channels, "h", "w"), (-3.0, 3.0)),),
            outputs=(TensorSpec("images", COMPUTE, ("B", 3, "H", "W")),),
            axes={"B": batch, "h": latent_axis, "w": latent_axis},
            export_sizes={"B": 2, "h": latent_sample[0], "w": latent_sample[1]},
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
    }
