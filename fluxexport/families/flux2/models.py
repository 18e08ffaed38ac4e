"""FLUX.2's models-layer knowledge: its defaults as its pipelines set them, its LM tokenizer (and chat template),
the widths its parts must agree on, its black-forest-labs single-file layout, and its tiny random pipelines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fluxexport.families.flux2 import FAMILY
from fluxexport.models.single_file import DOUBLE_QKV, BflLayout
from fluxexport.models.source import processor_chat_template, refuse_mismatch
from fluxexport.models.tiny import DEFAULT_SIZE, SEED
from fluxexport.models.tiny_lora import Target, qkv

if TYPE_CHECKING:
    from fluxexport.models.source import ModelSource
    from fluxexport.models.tiny import TinyVariant


# All blocks modulated from shared `*_stream_modulation` layers (the keys that tell a FLUX.2 file), no biases; the
# single block's fused q, k, v and MLP input stays fused in diffusers too
BFL_LAYOUT = BflLayout(
    family=FAMILY,
    markers=("single_stream_modulation.", "double_stream_modulation_"),  # BFL's `.lin` and diffusers' `.linear`
    leaves=("weight",),
    top={
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin",
        "context_embedder": "txt_in",
        "x_embedder": "img_in",
        "proj_out": "final_layer.linear",
    },
    double={
        "ff.linear_in": "img_mlp.0",
        "ff.linear_out": "img_mlp.2",
        "ff_context.linear_in": "txt_mlp.0",
        "ff_context.linear_out": "txt_mlp.2",
        "attn.to_out.0": "img_attn.proj",
        "attn.to_add_out": "txt_attn.proj",
    },
    double_fused=DOUBLE_QKV,
    single={"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"},
    single_fused={},
)


_DOUBLE, _SINGLE = "transformer_blocks.0", "single_transformer_blocks.0"
# `fluxexport tiny-lora`'s formats other than PEFT: kohya (`lora_unet_…` with `.alpha`), ai-toolkit
TINY_LORA_TARGETS: dict[str, tuple[Target, ...]] = {
    "kohya": (
        Target("lora_unet_double_blocks_0_img_attn_qkv", qkv(_DOUBLE)),
        Target("lora_unet_double_blocks_0_img_attn_proj", (f"{_DOUBLE}.attn.to_out.0",)),
        Target("lora_unet_double_blocks_0_txt_attn_qkv", qkv(_DOUBLE, "add_")),
        Target("lora_unet_double_blocks_0_txt_attn_proj", (f"{_DOUBLE}.attn.to_add_out",)),
        Target("lora_unet_double_blocks_0_img_mlp_0", (f"{_DOUBLE}.ff.linear_in",)),
        Target("lora_unet_double_blocks_0_img_mlp_2", (f"{_DOUBLE}.ff.linear_out",)),
        Target("lora_unet_single_blocks_0_linear1", (f"{_SINGLE}.attn.to_qkv_mlp_proj",)),
        Target("lora_unet_single_blocks_0_linear2", (f"{_SINGLE}.attn.to_out",)),
    ),
    "ai-toolkit": (
        Target("diffusion_model.double_blocks.0.img_attn.qkv", qkv(_DOUBLE)),
        Target("diffusion_model.double_blocks.0.txt_attn.qkv", qkv(_DOUBLE, "add_")),
        Target("diffusion_model.single_blocks.0.linear1", (f"{_SINGLE}.attn.to_qkv_mlp_proj",)),
        Target("diffusion_model.single_blocks.0.linear2", (f"{_SINGLE}.attn.to_out",)),
    ),
}


def is_step_distilled(source: ModelSource) -> bool:
    """[klein] distilled: model_index.json's `is_distilled` (4 steps, no true CFG)."""
    return source.is_distilled


def default_max_sequence_length(source: ModelSource) -> int:
    """The pipeline's default (512)."""
    from fluxexport.models.configs import call_default

    return int(call_default(source.pipeline_type, "max_sequence_length"))


def uses_true_cfg(source: ModelSource) -> bool:
    """Base models run the transformer twice a step (a negative prompt); step- or guidance-distilled ones once."""
    return not source.is_distilled and not source.guidance_embeds


def default_text_encoder_layers(source: ModelSource) -> tuple[int, ...]:
    """The pipeline's `text_encoder_out_layers` default (9, 18, 27 for [klein])."""
    from fluxexport.models.configs import call_default

    return tuple(call_default(source.pipeline_type, "text_encoder_out_layers"))


def load_tokenizers(source: ModelSource) -> tuple[Any, ...]:
    """(its LM's tokenizer,), with the chat template a processor folder may keep in its own files."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.root / "tokenizer")
    if tokenizer.chat_template is None:
        tokenizer.chat_template = processor_chat_template(source.root / "tokenizer")
    return (tokenizer,)


def check_widths(source: ModelSource) -> None:
    """The stacked text layers must make the transformer's joint width, the VAE's patches its channels."""
    transformer = source.transformer
    layers = len(source.text_encoder_layers)
    pairs = (
        (f"text_encoder/config.json hidden_size × {layers}", layers * int(source.language["hidden_size"]),
         "joint_attention_dim", transformer["joint_attention_dim"]),
        ("vae/config.json latent_channels × 4", 4 * int(source.vae["latent_channels"]),
         "in_channels", transformer["in_channels"]),
    )  # fmt: skip
    refuse_mismatch(pairs, source.root)


@dataclass(frozen=True)
class Flux2Shape:
    """Widths and depths of a random FLUX.2-shaped model. FLUX.2 [klein] 4B: 24 heads × 128, 5 + 20 blocks,
    Qwen3-4B (2560 wide, 36 layers) read at layers 9/18/27. The tiny one reads layers 1/2/3 of 5 (its marker says
    so; diffusers takes them as `text_encoder_out_layers`): 28 layers would make its text encoder export take
    minutes, and a layer past the deepest read one still exists, so the cut is exercised."""

    heads: int = 2
    head_dim: int = 16
    rope_axes: tuple[int, int, int, int] = (4, 4, 4, 4)
    double_blocks: int = 1
    single_blocks: int = 1
    text_width: int = 32  # the LM's hidden size; the transformer's joint width is 3× it
    text_layers: int = 5
    text_out_layers: tuple[int, int, int] = (1, 2, 3)
    vae_channels: tuple[int, int, int, int] = (8, 16, 16, 16)
    vae_groups: int = 4


TINY_FLUX2_SHAPE = Flux2Shape()


def tiny_marker(variant: TinyVariant) -> dict[str, Any]:
    """A tiny FLUX.2 folder's marker records the layers its text encoder is read at."""
    return {"text_encoder_layers": list(TINY_FLUX2_SHAPE.text_out_layers)}


def tiny_qwen3(shape: Flux2Shape, tokenizer):
    """FLUX.2 [klein]'s text encoder: a random Qwen3 causal LM."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=shape.text_width,
            intermediate_size=2 * shape.text_width,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=shape.text_width // 2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()


def tiny_mistral3(shape: Flux2Shape, tokenizer):
    """FLUX.2 [dev]'s text encoder: a random Mistral3 vision-language model (Mistral-Small-3.2's layout: a Mistral
    text stack with grouped-query attention and an untied LM head, a Pixtral vision tower, a projector)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    specials = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    config = Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": shape.text_width,
            "intermediate_size": 2 * shape.text_width, "num_hidden_layers": shape.text_layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": shape.text_width // 4,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 1e9, "sliding_window": None,
            "tie_word_embeddings": False, **specials,
        },
        vision_config={
            "model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "image_size": 32, "patch_size": 4, "num_channels": 3, "head_dim": 8,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=1,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
        **specials,
    )  # fmt: skip
    return Mistral3ForConditionalGeneration(config).eval()


def build_tiny_pipeline(variant: TinyVariant, shape: Flux2Shape | None = None):
    """A random FLUX.2-shaped pipeline, seeded per part: [klein] (Qwen3 text encoder, no guidance embedding) or
    [dev] (Mistral3 text encoder, guidance embedding); a Flux2 transformer and VAE."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )

    from fluxexport.models.tokenizers import build_mistral_tokenizer, build_qwen_tokenizer

    shape = shape or TINY_FLUX2_SHAPE
    dev = variant.pipeline_class == "Flux2Pipeline"
    tokenizer = build_mistral_tokenizer() if dev else build_qwen_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = (tiny_mistral3 if dev else tiny_qwen3)(shape, tokenizer)
    torch.manual_seed(SEED + 2)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=shape.double_blocks,
        num_single_layers=shape.single_blocks,
        attention_head_dim=shape.head_dim,
        num_attention_heads=shape.heads,
        joint_attention_dim=3 * shape.text_width,
        timestep_guidance_channels=32,
        axes_dims_rope=shape.rope_axes,
        guidance_embeds=variant.guidance_embeds,
    ).eval()
    torch.manual_seed(SEED + 3)
    vae = AutoencoderKLFlux2(
        block_out_channels=shape.vae_channels,
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=shape.vae_groups,
        sample_size=DEFAULT_SIZE,
    ).eval()
    with torch.no_grad():  # statistics other than (0, 1), so that the latent normalisation is exercised
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    parts = {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
             "transformer": transformer}  # fmt: skip
    if dev:
        return Flux2Pipeline(**parts)
    return Flux2KleinPipeline(**parts, is_distilled=variant.is_distilled)
