"""Tiny random FLUX-shaped models written as standard diffusers folders (seconds to build, ~1 MB each).

The shapes keep FLUX.1's structure (16 latent channels, 8× VAE, 2×2 packing, 3-axis RoPE, double and
single blocks) at widths small enough that a 4-step 256² image takes a fraction of a second on a CPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fluxexport.atomic import atomic_file, atomic_folder
from fluxexport.errors import FluxExportError

SEED = 0
DEFAULT_SIZE = 256
TINY_MARKER = "fluxexport_tiny.json"  # in a tiny model's folder: which variant, its default size
# Bumped whenever a tiny variant's definition changes: a cached folder of another revision is written again.
TINY_REVISION = 2


def cache_dir() -> Path:
    """Where tiny variants are materialised ($FLUXEXPORT_CACHE, else ~/.cache/fluxexport)."""
    return Path(os.environ.get("FLUXEXPORT_CACHE", Path.home() / ".cache" / "fluxexport"))


@dataclass(frozen=True)
class TinyVariant:
    """What differs between schnell, dev and Kontext: guidance embedding, shifting and the pipeline."""

    name: str
    guidance_embeds: bool
    dynamic_shifting: bool
    pipeline_class: str
    is_distilled: bool = False  # FLUX.2 [klein]: the step-distilled model runs without true CFG

    @property
    def is_flux2(self) -> bool:
        return self.pipeline_class.startswith("Flux2")


TINY_VARIANTS: dict[str, TinyVariant] = {
    "tiny-schnell": TinyVariant("tiny-schnell", False, False, "FluxPipeline"),
    "tiny-dev": TinyVariant("tiny-dev", True, True, "FluxPipeline"),
    "tiny-kontext": TinyVariant("tiny-kontext", True, True, "FluxKontextPipeline"),
    # FLUX.2 [klein]: the distilled model (4 steps, no CFG) and the base model (true CFG with a negative prompt)
    "tiny-klein": TinyVariant("tiny-klein", False, True, "Flux2KleinPipeline", is_distilled=True),
    "tiny-klein-base": TinyVariant("tiny-klein-base", False, True, "Flux2KleinPipeline"),
    # FLUX.2 [dev]: guidance-distilled (a guidance embedding, no CFG), a Mistral3 text encoder and a system prompt
    "tiny-flux2-dev": TinyVariant("tiny-flux2-dev", True, True, "Flux2Pipeline"),
}


def tiny_variant(name: str) -> TinyVariant:
    if name not in TINY_VARIANTS:
        raise FluxExportError(f"unknown tiny variant {name!r}: choose one of {', '.join(TINY_VARIANTS)}")
    return TINY_VARIANTS[name]


@dataclass(frozen=True)
class ModelShape:
    """Widths and depths of a random FLUX-shaped model (FLUX.1: 3072 = 24×128, 19 + 38 blocks, T5 4096)."""

    heads: int = 2
    head_dim: int = 16
    rope_axes: tuple[int, int, int] = (4, 6, 6)
    double_blocks: int = 1
    single_blocks: int = 1
    text_width: int = 32  # T5 d_model = joint_attention_dim
    clip_width: int = 32  # CLIP hidden = pooled_projection_dim
    text_layers: int = 2
    vae_channels: tuple[int, int, int, int] = (8, 16, 16, 16)
    vae_groups: int = 4


TINY_SHAPE = ModelShape()
# The benchmarks' mid-size model: FLUX.1's head width (128) and RoPE axes, 4 heads, a few blocks
MID_SHAPE = ModelShape(
    heads=4, head_dim=128, rope_axes=(16, 56, 56), double_blocks=2, single_blocks=4, text_width=512,
    clip_width=256, text_layers=4, vae_channels=(32, 64, 128, 128), vae_groups=32,
)  # fmt: skip


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


def build_tiny_flux2_pipeline(variant: TinyVariant, shape: Flux2Shape = TINY_FLUX2_SHAPE):
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


def build_tiny_pipeline(name: str, shape: ModelShape = TINY_SHAPE):
    """Build a random pipeline in memory, with weights drawn from a fixed seed per component."""
    if tiny_variant(name).is_flux2:
        return build_tiny_flux2_pipeline(tiny_variant(name))
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxexport.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    variant = tiny_variant(name)
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
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
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
    pipeline_class = FluxKontextPipeline if variant.pipeline_class == "FluxKontextPipeline" else FluxPipeline
    return pipeline_class(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def write_tiny(name: str, out: Path) -> Path:
    """Write tiny variant `name` as a diffusers folder at `out`, atomically (staging folder, then rename)."""
    variant = tiny_variant(name)
    with atomic_folder(out) as staging:
        build_tiny_pipeline(name).save_pretrained(staging, safe_serialization=True)
        marker = {"variant": variant.name, "default_size": DEFAULT_SIZE, "seed": SEED, "revision": TINY_REVISION}
        if variant.is_flux2:
            marker["text_encoder_layers"] = list(TINY_FLUX2_SHAPE.text_out_layers)
        (staging / TINY_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return Path(out)


def is_current(folder: Path) -> bool:
    """Whether `folder` holds a tiny model written by this revision of the tiny definitions."""
    marker = folder / TINY_MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("revision") == TINY_REVISION


def materialise_tiny(name: str) -> Path:
    """The cached folder of a tiny variant, written on first use (and again when its definition changed)."""
    import shutil

    folder = cache_dir() / "tiny" / name
    if is_current(folder):
        return folder
    if folder.exists():  # an older revision: moved aside, then removed, so that no reader sees half of it
        stale = folder.with_name(f".{name}.stale.{os.getpid()}")
        os.replace(folder, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        write_tiny(name, folder)
    except FluxExportError:
        if not is_current(folder):  # another process may have won the race
            raise
    return folder


def write_bfl_single_file(folder: Path, path: Path) -> Path:
    """Write the folder's transformer (FLUX.1 or FLUX.2) as a black-forest-labs single-file checkpoint of its
    family's layout (for format tests)."""
    from safetensors.torch import load_file, save_file

    from fluxexport.models.single_file import BFL_PREFIX, diffusers_to_bfl

    state = load_file(str(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors"))
    converted = {BFL_PREFIX + key: value for key, value in diffusers_to_bfl(state).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temporary:
        save_file(converted, str(temporary))
    return path


def write_mid(root: Path, variant: str = "tiny-schnell") -> Path:
    """The benchmarks' mid-size random model (`MID_SHAPE`) of `variant`'s kind (schnell, or dev: guidance and its
    resolution-shifted schedule) written to `root` as a diffusers folder (`models.source.load_folder` reads it)."""
    build_tiny_pipeline(variant, MID_SHAPE).save_pretrained(root)
    return Path(root)


def write_random_lora(path: Path, transformer, rank: int, relative: float) -> Path:
    """A PEFT-named random LoRA on every Linear of the double and single blocks, B·A sized to `relative`·‖W‖
    each (benchmarks of LoRA swaps and of FP8 saturation)."""
    import torch
    from safetensors.torch import save_file

    generator, state = torch.Generator().manual_seed(0), {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(
            ("transformer_blocks.", "single_transformer_blocks.")
        ):
            down = torch.randn(rank, module.in_features, generator=generator)
            up = torch.randn(module.out_features, rank, generator=generator)
            up *= relative * module.weight.detach().norm() / (up @ down).norm()
            state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = down, up
    save_file(state, str(path))
    return path
