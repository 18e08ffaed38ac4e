"""FLUX.1's models-layer knowledge: its defaults as its pipelines and model cards set them, its tokenizers, the
widths its parts must agree on, its black-forest-labs single-file layout, and its tiny random pipelines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fluxexport.families.family import CONTROL_CONDITION, FILL_CONDITION
from fluxexport.families.flux1 import FAMILY
from fluxexport.models.single_file import DOUBLE_QKV, BflLayout
from fluxexport.models.source import refuse_mismatch
from fluxexport.models.tiny import DEFAULT_SIZE, SEED, TINY_SHAPE, ModelShape
from fluxexport.models.tiny_lora import Target, qkv

if TYPE_CHECKING:
    from fluxexport.models.source import ModelSource
    from fluxexport.models.tiny import TinyVariant


# Each block modulated by its own `*_mod.lin`; a single block's q, k, v and MLP input fused in `linear1`
BFL_LAYOUT = BflLayout(
    family=FAMILY,
    markers=(),  # the layout of a FLUX checkpoint without another family's marker keys
    leaves=("weight", "bias"),
    top={
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in",
        "x_embedder": "img_in",
        "proj_out": "final_layer.linear",
    },
    double={
        "norm1.linear": "img_mod.lin",
        "norm1_context.linear": "txt_mod.lin",
        "ff.net.0.proj": "img_mlp.0",
        "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0",
        "ff_context.net.2": "txt_mlp.2",
        "attn.to_out.0": "img_attn.proj",
        "attn.to_add_out": "txt_attn.proj",
    },
    double_fused=DOUBLE_QKV,
    single={"norm.linear": "modulation.lin", "proj_out": "linear2"},
    single_fused={"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")},
)


_DOUBLE, _SINGLE = "transformer_blocks.0", "single_transformer_blocks.0"
# `fluxexport tiny-lora`'s formats other than PEFT: kohya (black-forest-labs' fused modules; single blocks' linear1
# is left out, as diffusers' conversion assumes FLUX.1's real widths; CLIP's first attention as `lora_te1_…`), XLabs
TINY_LORA_TARGETS: dict[str, tuple[Target, ...]] = {
    "kohya": (
        Target("lora_unet_double_blocks_0_img_attn_qkv", qkv(_DOUBLE)),
        Target("lora_unet_double_blocks_0_img_attn_proj", (f"{_DOUBLE}.attn.to_out.0",)),
        Target("lora_unet_single_blocks_0_linear2", (f"{_SINGLE}.proj_out",)),
        *(
            Target(
                f"lora_te1_text_model_encoder_layers_0_self_attn_{name}",
                (f"encoder.layers.0.self_attn.{name}",),
                "clip",
            )
            for name in ("q_proj", "k_proj", "v_proj", "out_proj")
        ),
    ),  # fmt: skip
    "xlabs": (
        Target("double_blocks.0.processor.qkv_lora1", qkv(_DOUBLE)),
        Target("double_blocks.0.processor.qkv_lora2", qkv(_DOUBLE, "add_")),
        Target("double_blocks.0.processor.proj_lora1", (f"{_DOUBLE}.attn.to_out.0",)),
        Target("double_blocks.0.processor.proj_lora2", (f"{_DOUBLE}.attn.to_add_out",)),
    ),
}


def is_step_distilled(source: ModelSource) -> bool:
    """schnell: the timestep-distilled model has no guidance embedding (4 steps, its model card's count)."""
    return not source.guidance_embeds


def default_max_sequence_length(source: ModelSource) -> int:
    """schnell: 256 (BFL's T5 length for it); dev and Kontext: the pipeline's default (512)."""
    from fluxexport.models.configs import call_default

    if is_step_distilled(source):
        return 256
    return int(call_default(source.pipeline_type, "max_sequence_length"))


def uses_true_cfg(source: ModelSource) -> bool:
    """FLUX.1 runs the transformer once a step (dev's guidance is embedded)."""
    return False


def default_text_encoder_layers(source: ModelSource) -> tuple[int, ...]:
    """None: FLUX.1 reads its encoders' last states (the argument is not its pipelines')."""
    return ()


def load_tokenizers(source: ModelSource) -> tuple[Any, ...]:
    """(CLIP tokenizer, T5 tokenizer) from the folder."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    return (
        CLIPTokenizer.from_pretrained(source.root / "tokenizer"),
        T5TokenizerFast.from_pretrained(source.root / "tokenizer_2"),
    )


def condition_channels(mode: str, latent_channels: int, vae_scale_factor: int) -> int:
    """Channels a pipeline's image condition adds beside each packed token (diffusers' FluxFillPipeline and
    FluxControlPipeline): Fill's masked-image latents (4C) and its mask, each latent pixel's s×s mask pixels packed
    2×2 (4s²); Control's control-image latents (4C); none for the others."""
    packed = 4 * latent_channels
    if mode == FILL_CONDITION:
        return packed + 4 * vae_scale_factor**2
    return packed if mode == CONTROL_CONDITION else 0


def output_channels(source: ModelSource) -> int:
    """Channels of one packed latent token the transformer gives back (`out_channels`, else `in_channels`, as
    diffusers' FluxTransformer2DModel reads them): 64 on every FLUX.1, also where the input is wider."""
    transformer = source.transformer
    return int(transformer["out_channels"] or transformer["in_channels"])


def check_widths(source: ModelSource) -> None:
    """Refuse components whose widths do not meet the transformer's (torch.export would fail with pages)."""
    transformer, latent = source.transformer, int(source.vae["latent_channels"])
    condition = condition_channels(source.reference_mode, latent, source.vae_scale_factor)
    pairs = (
        ("text_encoder/config.json hidden_size", source.clip["hidden_size"],
         "pooled_projection_dim", transformer["pooled_projection_dim"]),
        ("text_encoder_2/config.json d_model", source.t5["d_model"],
         "joint_attention_dim", transformer["joint_attention_dim"]),
        ("vae/config.json latent_channels × 4", 4 * latent, "out_channels", output_channels(source)),
        (f"{source.pipeline_class}'s input (4 × {latent} latent + {condition} condition channels)",
         4 * latent + condition, "in_channels", transformer["in_channels"]),
    )  # fmt: skip
    refuse_mismatch(pairs, source.root)


def tiny_marker(variant: TinyVariant) -> dict[str, Any]:
    """What a tiny FLUX.1 folder's marker records beyond the variant and size: nothing."""
    return {}


def build_tiny_pipeline(variant: TinyVariant, shape: ModelShape | None = None):
    """A random FLUX.1-shaped pipeline (FluxPipeline, FluxKontextPipeline, FluxFillPipeline or FluxControlPipeline:
    their transformer takes the condition's channels beside the latents), seeded per component."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxexport.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    shape = shape or TINY_SHAPE
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()

    torch.manual_seed(SEED)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=shape.clip_width,
            intermediate_size=2 * shape.clip_width,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=shape.clip_width,
            hidden_act="quick_gelu",
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    ).eval()
    torch.manual_seed(SEED + 1)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=shape.text_width,
            d_kv=shape.text_width // 4,
            d_ff=2 * shape.text_width,
            num_layers=shape.text_layers,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            decoder_start_token_id=0,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
        )
    ).eval()
    torch.manual_seed(SEED + 2)
    condition = condition_channels(FAMILY.reference_mode(variant.pipeline_class), 16, 8)  # Fill's, Control's
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64 + condition,
        out_channels=64,
        num_layers=shape.double_blocks,
        num_single_layers=shape.single_blocks,
        attention_head_dim=shape.head_dim,
        num_attention_heads=shape.heads,
        joint_attention_dim=shape.text_width,
        pooled_projection_dim=shape.clip_width,
        guidance_embeds=variant.guidance_embeds,
        axes_dims_rope=shape.rope_axes,
    ).eval()
    torch.manual_seed(SEED + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=shape.vae_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=shape.vae_groups,
        sample_size=DEFAULT_SIZE,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0 if variant.dynamic_shifting else 1.0,
        use_dynamic_shifting=variant.dynamic_shifting,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return getattr(diffusers, variant.pipeline_class)(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
