"""FLUX.2 ([klein], [dev]): one LM text encoder (Qwen3 / Mistral3), a 32-channel VAE, reference images."""

from __future__ import annotations

from fluxexport.families.family import REFERENCE_BUDGET, TRANSFORMER_PARTS, Family

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
    # the text encoder's class is model_index.json's (Qwen3ForCausalLM for [klein], Mistral3 for [dev])
    library_classes={"transformer": "diffusers.Flux2Transformer2DModel", "vae": "diffusers.AutoencoderKLFlux2"},
    eager_attention=("text_encoder",),
    reference_modes={"Flux2KleinPipeline": REFERENCE_BUDGET, "Flux2Pipeline": REFERENCE_BUDGET},
    takes_prompt_2=False,
    takes_text_encoder_layers=True,
    lora_pipeline="Flux2KleinPipeline",  # diffusers/PEFT (alpha in the metadata), kohya, ai-toolkit
    lora_prefixes={"transformer.": "transformer"},  # FLUX.2 LoRAs adapt the transformer only
    lora_formats=("peft", "kohya", "ai-toolkit"),
    lora_alpha_in_metadata=True,
    ffn_matrices=3,  # SwiGLU MLP
    ffn_ratio="mlp_ratio",  # Flux2Transformer2DModel's config (3.0)
)
