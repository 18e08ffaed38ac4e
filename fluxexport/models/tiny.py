"""Tiny random FLUX-shaped models written as standard diffusers folders (seconds to build, ~1 MB each).

The shapes keep each family's structure (FLUX.1: 16 latent channels, 8× VAE, 2×2 packing, 3-axis RoPE, double
and single blocks) at widths small enough that a 4-step 256² image takes a fraction of a second on a CPU; each
family builds its own (`families/<f>/models.py::build_tiny_pipeline`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fluxexport.atomic import atomic_file, atomic_folder
from fluxexport.errors import FluxExportError
from fluxexport.families import Family, family_of_pipeline

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
    """What differs between the tiny variants: guidance embedding, shifting and the pipeline (whose family builds
    it)."""

    name: str
    guidance_embeds: bool
    dynamic_shifting: bool
    pipeline_class: str
    is_distilled: bool = False  # FLUX.2 [klein]: the step-distilled model runs without true CFG

    @property
    def family(self) -> Family:
        return family_of_pipeline(self.pipeline_class)


TINY_VARIANTS: dict[str, TinyVariant] = {
    "tiny-schnell": TinyVariant("tiny-schnell", False, False, "FluxPipeline"),
    "tiny-dev": TinyVariant("tiny-dev", True, True, "FluxPipeline"),
    "tiny-kontext": TinyVariant("tiny-kontext", True, True, "FluxKontextPipeline"),
    # FLUX.1 tools: Fill (inpainting/outpainting: image + mask), Canny and Depth (a control image). Canny and Depth
    # are one architecture and one pipeline (FluxControlPipeline): only the control image the user gives differs
    "tiny-fill": TinyVariant("tiny-fill", True, True, "FluxFillPipeline"),
    "tiny-canny": TinyVariant("tiny-canny", True, True, "FluxControlPipeline"),
    "tiny-depth": TinyVariant("tiny-depth", True, True, "FluxControlPipeline"),
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


def build_tiny_pipeline(name: str, shape=None):
    """Build a random pipeline of variant `name` in memory (its family's builder, `families/<f>/models.py`), with
    weights drawn from a fixed seed per component; `shape` (a `ModelShape` for FLUX.1) else the family's tiny one."""
    variant = tiny_variant(name)
    return variant.family.part("models").build_tiny_pipeline(variant, shape)


# Tiny priors: checkpoints that run in front of a base model, not variants `--model` runs (FLUX.1 Redux: a SigLIP
# image encoder and its embedder, sized for the tiny FLUX.1 models' text width; `models/redux.py`)
TINY_PRIORS = ("tiny-redux",)


def write_tiny_prior(name: str, out: Path) -> Path:
    """Write tiny prior `name` (`TINY_PRIORS`) as a diffusers folder at `out`, atomically."""
    from fluxexport.models.redux import build_tiny_redux

    with atomic_folder(out) as staging:
        build_tiny_redux(TINY_SHAPE.text_width, SEED).save_pretrained(staging, safe_serialization=True)
        marker = {"variant": name, "seed": SEED, "revision": TINY_REVISION}
        (staging / TINY_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return Path(out)


def write_tiny(name: str, out: Path) -> Path:
    """Write tiny variant `name` as a diffusers folder at `out`, atomically (staging folder, then rename)."""
    if name in TINY_PRIORS:
        return write_tiny_prior(name, out)
    variant = tiny_variant(name)
    with atomic_folder(out) as staging:
        build_tiny_pipeline(name).save_pretrained(staging, safe_serialization=True)
        marker = {"variant": variant.name, "default_size": DEFAULT_SIZE, "seed": SEED, "revision": TINY_REVISION}
        marker |= variant.family.part("models").tiny_marker(variant)
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

    if not (Path(folder) / "transformer").is_dir():  # a prior (tiny-redux) has none
        raise FluxExportError(f"{folder} has no transformer: --single-file is for a model, not a prior")
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
