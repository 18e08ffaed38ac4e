"""What a model family is: one object per family (`fluxexport.families.flux1.FAMILY`, `…flux2.FAMILY`).

The object holds what is known before any weight is read (the folder's parts and config files, the exported
components and the module each one runs). What a family does at a higher layer (its component specs, adapters,
request encoding and sampling, quantization policy, Triton inputs) lives in that family's folder, one module per
layer named after it (`families/flux1/specs.py`, `…/runtime.py`), and is reached with `family.part("specs")`: a
layer asks only for its own layer's part or a lower one's (`tests/test_layering.py` checks it), so the family
folder is a vertical slice through the layers and nothing imports upward.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

# The transformer in three parts (head, tail, out) for the step caches that skip blocks; every family has them
TRANSFORMER_PARTS = ("transformer_head", "transformer_tail", "transformer_out")


@dataclass(frozen=True)
class Family:
    """What a family's checkpoint folder holds and what we export from it."""

    name: str  # "flux1" | "flux2"
    title: str  # for messages: "FLUX.1"
    pipelines: tuple[str, ...]  # diffusers pipeline classes of this family
    transformer_class: str
    config_files: dict[str, str]  # config key → file in the folder
    subfolders: dict[str, str]  # module → the folder its config and weights live in
    tokenizer_folders: tuple[str, ...]
    components: tuple[str, ...]  # exported components, in pipeline order
    module_of: dict[str, str]  # component → the module it runs
    text_components: tuple[str, ...]  # the components that encode prompts

    @property
    def required_parts(self) -> tuple[str, ...]:
        encoders = [folder for folder in self.subfolders.values() if folder not in ("transformer", "vae")]
        return ("transformer", "vae", *encoders, *self.tokenizer_folders, "scheduler")

    def part(self, layer: str) -> ModuleType:
        """This family's module for `layer` (`"specs"` → `fluxexport.families.flux1.specs`)."""
        return importlib.import_module(f"{__package__}.{self.name}.{layer}")
