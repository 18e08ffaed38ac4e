"""FLUX.1 (schnell, dev, Kontext, Fill, Canny/Depth): CLIP and T5 text encoders, a 16-channel VAE."""

from __future__ import annotations

from fluxexport.families.family import (
    CONTROL_CONDITION,
    FILL_CONDITION,
    KONTEXT_REFERENCE,
    NO_REFERENCE,
    TRANSFORMER_PARTS,
    Family,
)

FAMILY = Family(
    name="flux1",
    title="FLUX.1",
    pipelines=("FluxPipeline", "FluxKontextPipeline", "FluxFillPipeline", "FluxControlPipeline"),
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
    | dict.fromkeys(TRANSFORMER_PARTS, "transformer"),  # fmt: skip
    text_components=("clip", "t5"),
    library_classes={
        "clip": "transformers.CLIPTextModel",
        "t5": "transformers.T5EncoderModel",
        "transformer": "diffusers.FluxTransformer2DModel",
        "vae": "diffusers.AutoencoderKL",
    },
    eager_attention=("t5",),
    reference_modes={
        "FluxPipeline": NO_REFERENCE,
        "FluxKontextPipeline": KONTEXT_REFERENCE,
        "FluxFillPipeline": FILL_CONDITION,  # image + mask: masked-image latents and the mask beside each token
        "FluxControlPipeline": CONTROL_CONDITION,  # Canny and Depth: the control image's latents beside each token
    },
    takes_prompt_2=True,
    takes_text_encoder_layers=False,  # it reads its encoders' last states
    lora_pipeline="FluxPipeline",  # diffusers/PEFT, kohya (`lora_unet_…`, `lora_te1_…`), XLabs (`…processor…`)
    lora_prefixes={"transformer.": "transformer", "text_encoder.": "clip"},
    lora_formats=("peft", "kohya", "xlabs", "control"),  # control: a Canny/Depth LoRA (widens the input)
    lora_alpha_in_metadata=False,
    lora_widened_inputs={"x_embedder": ("in_channels", "out_channels")},  # diffusers' x_embedder → in_channels
    lora_widened_pipelines={"FluxPipeline": "FluxControlPipeline"},  # FLUX.1-dev + a Canny/Depth LoRA
    ffn_matrices=2,  # GELU MLP
    ffn_ratio=4.0,  # diffusers' FluxTransformerBlock: FeedForward's default mult
)
