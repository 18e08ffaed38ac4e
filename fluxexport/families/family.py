"""What a model family is: one object per family (`fluxexport.families.flux1.FAMILY`, `…flux2.FAMILY`).

The object holds what is known before any weight is read (the folder's parts and config files, the exported
components and the module each one runs, the library classes that load them, LoRA formats, the capabilities the
generic code asks about). What a family does at a higher layer (reading its configs and tokenizers, its component
specs, adapters, request encoding and sampling, quantization policy, Triton inputs) lives in that family's folder,
one module per layer named after it (`families/flux1/models.py`, `…/specs.py`, `…/adapters.py`), and is reached
with `family.part("specs")`: a layer asks only for its own layer's part or a lower one's (`tests/test_layering.py`
checks it), so the family folder is a vertical slice through the layers and nothing imports upward. Every family
has the same part modules, each exposing the names of `PART_NAMES` (`tests/test_families.py` checks it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

# The transformer in three parts (head, tail, out) for the step caches that skip blocks; every family has them
TRANSFORMER_PARTS = ("transformer_head", "transformer_tail", "transformer_out")

# How a pipeline takes reference images: none (text to image), Kontext's one reference at a preferred size, or
# FLUX.2's several within an export's reference budget (`--max-references`, …)
NO_REFERENCE, KONTEXT_REFERENCE, REFERENCE_BUDGET = "none", "kontext", "budget"
# Pipelines whose image conditions widen each noise token's channels (the transformer's `in_channels`) instead of
# adding tokens: FLUX.1 Fill's image and mask (`--image`, `--mask`), FLUX.1 Canny/Depth's control image
FILL_CONDITION, CONTROL_CONDITION = "fill", "control"

# What the generic layers ask of a family's part for each layer: every family's `families/<f>/<layer>.py` defines
# these names (`tests/test_families.py`)
PART_NAMES: dict[str, tuple[str, ...]] = {
    "models": (
        "BFL_LAYOUT",
        "TINY_LORA_TARGETS",
        "build_tiny_pipeline",
        "check_widths",
        "default_max_sequence_length",
        "default_text_encoder_layers",
        "is_step_distilled",
        "load_tokenizers",
        "tiny_marker",
        "uses_true_cfg",
    ),
    "specs": ("check_request_within", "component_specs"),
    "adapters": ("wrap",),
    "runtime": (  # `runtime.family_part.FamilyRuntime`: what `runtime.pipeline`'s generic loop asks
        "check_cache",
        "decode",
        "encode_prompts",
        "encode_references",
        "image_ids",
        "latent_grid",
        "noise_tokens",
        "request_references",
        "sigmas",
        "transformer_inputs",
    ),
    "quantize": ("KEEP_HIGH_PRECISION",),
    "triton": ("inputs_text", "pipeline_inputs"),
}


@dataclass(frozen=True)
class Family:
    """What a family's checkpoint folder holds, what we export from it, and what its pipelines take."""

    name: str  # the folder under `families/`: "flux1" | "flux2"
    title: str  # for messages: "FLUX.1"
    pipelines: tuple[str, ...]  # diffusers pipeline classes of this family (the first for a folder naming none)
    transformer_class: str
    config_files: dict[str, str]  # config key → file in the folder
    subfolders: dict[str, str]  # module → the folder its config and weights live in
    tokenizer_folders: tuple[str, ...]
    components: tuple[str, ...]  # exported components, in pipeline order
    module_of: dict[str, str]  # component → the module it runs
    text_components: tuple[str, ...]  # the components that encode prompts
    # module → "library.Class" that loads it; a module not named here is loaded by the class model_index.json (or
    # the pipeline's signature) names for its subfolder (FLUX.2's text encoder: Qwen3 or Mistral3)
    library_classes: dict[str, str]
    eager_attention: tuple[str, ...]  # modules whose export takes eager attention (sdpa does not trace in dynamo)
    reference_modes: dict[str, str]  # pipeline → how it takes reference images (NO_REFERENCE, …)
    takes_prompt_2: bool  # a second prompt for a second text encoder (FLUX.1's T5)
    takes_text_encoder_layers: bool  # the text encoder is read at chosen layers (--text-encoder-layers)
    lora_pipeline: str  # the diffusers pipeline whose `lora_state_dict` converts this family's LoRA files
    lora_prefixes: dict[str, str]  # LoRA key prefix (diffusers' naming) → the module it adapts
    lora_formats: tuple[str, ...]  # the formats `fluxexport tiny-lora` writes (each read by `lora_pipeline`)
    lora_alpha_in_metadata: bool  # PEFT LoRAs carry their alpha in the file's metadata (diffusers' FLUX.2 saves)
    ffn_matrices: int  # the blocks' MLP as (d × ratio·d) matrices: 2 for a GELU MLP, 3 for SwiGLU (FLOP count)
    ffn_ratio: float | str  # the MLP's width ratio, or the transformer config key that holds it
    # LoRAs wider than the model's layer (BFL's Canny/Depth LoRAs widen FLUX.1-dev's `x_embedder` from 64 to 128
    # input features, as diffusers' `load_lora_weights` does): the layer → the transformer config key its input
    # width is and the key whose unset value follows it (kept at the base width: FluxTransformer2DModel's
    # `out_channels`), and pipeline → the pipeline the widened model runs as; a family without them refuses them
    lora_widened_inputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    lora_widened_pipelines: dict[str, str] = field(default_factory=dict)

    @property
    def required_parts(self) -> tuple[str, ...]:
        encoders = [folder for folder in self.subfolders.values() if folder not in ("transformer", "vae")]
        return ("transformer", "vae", *encoders, *self.tokenizer_folders, "scheduler")

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules the components run, each once, in component order ("clip", "t5", "transformer", "vae")."""
        return tuple(dict.fromkeys(self.module_of[name] for name in self.components))

    def reference_mode(self, pipeline: str) -> str:
        """How `pipeline` (one of `pipelines`) takes reference images."""
        return self.reference_modes[pipeline]

    @property
    def reference_budget(self) -> bool:
        """Whether its pipelines size reference images within an export's budget (`--max-references`, …)."""
        return REFERENCE_BUDGET in self.reference_modes.values()

    def part(self, layer: str) -> ModuleType:
        """This family's module for `layer` (`"specs"` → `fluxexport.families.flux1.specs`)."""
        return importlib.import_module(f"{__package__}.{self.name}.{layer}")
