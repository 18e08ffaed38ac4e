"""Model families: FLUX.1 and FLUX.2 differ in their parts, their components and their runtime.

A family is read from the checkpoint (`model_index.json`'s pipeline class, else the transformer config's class),
never from a flag. Everything that differs between families and is known before any weight is read lives here:
the folder's parts and config files, the exported components and the module each one runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fluxexport.errors import FluxExportError


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


_TRANSFORMER_PARTS = ("transformer_head", "transformer_tail", "transformer_out")

FLUX1 = Family(
    name="flux1",
    title="FLUX.1",
    pipelines=("FluxPipeline", "FluxKontextPipeline"),
    transformer_class="FluxTransformer2DModel",
    config_files={
        "transformer": "transformer/config.json",
        "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json",
        "text_encoder_2": "text_encoder_2/config.json",
        "scheduler": "scheduler/scheduler_config.json",
    },
    subfolders={"clip": "text_encoder", "t5": "text_encoder_2", "transformer": "transformer", "vae": "vae"},
    tokenizer_folders=("tokenizer", "tokenizer_2"),
    components=("clip", "t5", "transformer", "vae_decoder", "vae_encoder"),
    module_of={"clip": "clip", "t5": "t5", "transformer": "transformer", "vae_decoder": "vae", "vae_encoder": "vae"}
    | dict.fromkeys(_TRANSFORMER_PARTS, "transformer"),  # fmt: skip
    text_components=("clip", "t5"),
)

FLUX2 = Family(
    name="flux2",
    title="FLUX.2",
    pipelines=("Flux2KleinPipeline", "Flux2Pipeline"),
    transformer_class="Flux2Transformer2DModel",
    config_files={
        "transformer": "transformer/config.json",
        "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json",
        "scheduler": "scheduler/scheduler_config.json",
    },
    subfolders={"text_encoder": "text_encoder", "transformer": "transformer", "vae": "vae"},
    tokenizer_folders=("tokenizer",),
    components=("text_encoder", "transformer", "vae_decoder", "vae_encoder"),
    module_of={"text_encoder": "text_encoder", "transformer": "transformer", "vae_decoder": "vae", "vae_encoder": "vae"}
    | dict.fromkeys(_TRANSFORMER_PARTS, "transformer"),  # fmt: skip
    text_components=("text_encoder",),
)

FAMILIES = (FLUX1, FLUX2)


def detect_family(model_index: dict[str, Any], transformer_config: dict[str, Any] | None = None) -> Family:
    """The family of a checkpoint: its pipeline class, or (a folder without one) its transformer's class."""
    pipeline = model_index.get("_class_name")
    for family in FAMILIES:
        if pipeline in family.pipelines:
            return family
    transformer_class = (transformer_config or {}).get("_class_name")
    known = ", ".join(name for family in FAMILIES for name in family.pipelines)
    for family in FAMILIES:
        if transformer_class != family.transformer_class:
            continue
        if pipeline is not None:  # a FLUX pipeline that runs its transformer otherwise (KV cache, fill, control)
            raise FluxExportError(
                f"pipeline {pipeline!r} is a {family.title} pipeline fluxexport does not run: it runs {known}; "
                "export a checkpoint of one of those"
            )
        return family
    if pipeline is None and transformer_class is None:
        return FLUX1  # a bare FLUX.1 folder (older exports wrote none)
    raise FluxExportError(
        f"pipeline {pipeline or transformer_class!r} is not a FLUX model fluxexport knows: it exports {known}"
    )
