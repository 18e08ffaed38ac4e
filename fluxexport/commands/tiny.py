"""`fluxexport tiny` and `tiny-lora`: small random models and LoRAs, for trying every command offline."""

from __future__ import annotations

from pathlib import Path


def write_tiny_model(variant: str, out: Path, single_file: Path | None = None) -> Path:
    """Tiny variant `variant` as a diffusers folder at `out`; with `single_file`, its transformer also in
    black-forest-labs' single-file layout there. Returns the folder."""
    from fluxexport.errors import FluxExportError
    from fluxexport.models.tiny import TINY_PRIORS, write_bfl_single_file, write_tiny

    if single_file is not None and variant in TINY_PRIORS:  # refused before the folder is written
        raise FluxExportError(f"{variant} is a prior, with no transformer: --single-file is for a model; drop it")
    folder = write_tiny(variant, out)
    if single_file is not None:
        write_bfl_single_file(folder, single_file)
    return folder


def write_random_lora(variant: str, out: Path, fmt: str = "peft", seed: int = 0) -> Path:
    """A random LoRA in layout `fmt` that fits tiny variant `variant` (refused in one line for anything else)."""
    from fluxexport.models.source import resolve_model
    from fluxexport.models.tiny import tiny_variant
    from fluxexport.models.tiny_lora import write_tiny_lora

    tiny_variant(variant)  # refuse anything but a tiny variant before resolving it
    return write_tiny_lora(resolve_model(variant), out, fmt, seed)
