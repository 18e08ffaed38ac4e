"""FLUX.2 ([klein], [dev]): one LM text encoder (Qwen3 / Mistral3), a 32-channel VAE, reference images."""

from __future__ import annotations

from fluxexport.families.family import TRANSFORMER_PARTS, Family

FAMILY = Family(
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
    | dict.fromkeys(TRANSFORMER_PARTS, "transformer"),  # fmt: skip
    text_components=("text_encoder",),
)
