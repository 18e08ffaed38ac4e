"""The `fluxexport` command: parsing and messages only; the work lives in the library modules."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fluxexport.console import console, quiet_libraries, step_progress, table, warn
from fluxexport.errors import FluxExportError

TINY_DEFAULT = "tiny-schnell"


def _fail(error: Exception) -> None:
    raise click.ClickException(str(error).splitlines()[0] if str(error) else type(error).__name__)


class _Group(click.Group):
    """Turns FluxExportError into a one-line `Error: …` and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FluxExportError as error:
            _fail(error)


@click.group(cls=_Group)
@click.version_option(package_name="fluxexport")
def main() -> None:
    """FLUX.1 from PyTorch to ONNX and TensorRT, and a small runtime that runs it."""
    quiet_libraries()


@main.command()
@click.argument("variant")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Folder to write.")
@click.option(
    "--single-file",
    type=click.Path(path_type=Path),
    help="Also write the transformer as a black-forest-labs single-file checkpoint here.",
)
def tiny(variant: str, out: Path, single_file: Path | None) -> None:
    """Write a tiny random FLUX model (tiny-schnell, tiny-dev, tiny-kontext) as a diffusers folder."""
    from fluxexport.models.tiny import write_bfl_single_file, write_tiny

    folder = write_tiny(variant, out)
    console.print(f"wrote {variant} to {folder}")
    if single_file is not None:
        write_bfl_single_file(folder, single_file)
        console.print(f"wrote its transformer in black-forest-labs layout to {single_file}")


def _check_output(output: Path, count: int) -> list[Path]:
    from fluxexport.runtime.images import output_paths

    paths = output_paths(output, count)
    parent = paths[0].parent
    if not parent.exists():
        raise FluxExportError(f"output folder {parent} does not exist: create it or choose another --output")
    if not parent.is_dir():
        raise FluxExportError(f"cannot write {paths[0]}: {parent} is not a folder (--output)")
    import os

    if not os.access(parent, os.W_OK):
        raise FluxExportError(f"cannot write to {parent}: permission denied (--output)")
    return paths


@main.command()
@click.option(
    "--model",
    default=TINY_DEFAULT,
    show_default=True,
    help="Tiny variant, diffusers folder, hub id or BFL .safetensors.",
)
@click.option("--base-model", help="With a single-file --model: folder/hub id/tiny variant for the other parts.")
@click.option("--prompt", required=True, help="Text to draw (CLIP; also T5 unless --prompt-2).")
@click.option("--prompt-2", help="Text for T5 (defaults to --prompt).")
@click.option("--height", type=int, help="Pixels, a multiple of 16 (default: 1024, or 256 for tiny models).")
@click.option("--width", type=int, help="Pixels, a multiple of 16 (default: 1024, or 256 for tiny models).")
@click.option("--steps", type=int, help="Denoising steps (default: 4 for schnell, 28 for guidance-distilled).")
@click.option("--guidance", type=float, help="Embedded guidance scale (dev, Kontext; default 3.5).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--max-sequence-length", type=int, help="T5 tokens (default: 256 schnell, 512 dev/Kontext).")
@click.option(
    "--image",
    "image_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Kontext reference image.",
)
@click.option(
    "--keep-reference-size", is_flag=True, help="Encode the reference at its own size, not Kontext's preferred one."
)
@click.option("--backend", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True)
@click.option("--engines", type=click.Path(path_type=Path), help="Folder of exported graphs (onnxruntime backend).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--device", help="torch device (default: cuda if available, else cpu).")
@click.option("--output", type=click.Path(path_type=Path), default=Path("flux.png"), show_default=True)
def run(
    model, base_model, prompt, prompt_2, height, width, steps, guidance, seed, num_images, max_sequence_length,
    image_path, keep_reference_size, backend, engines, dtype, device, output,
) -> None:  # fmt: skip
    """Generate images with FLUX on a backend; writes PNGs and prints per-stage timings."""
    from PIL import Image

    from fluxexport.backends import create_backend
    from fluxexport.models.source import resolve_model
    from fluxexport.runtime.images import save_png_atomic
    from fluxexport.runtime.pipeline import GenerationRequest, generate, resolve_request

    source = resolve_model(model, base_model)
    reference = None
    if image_path is not None:
        try:
            reference = Image.open(image_path).convert("RGB")
        except OSError as error:
            raise FluxExportError(f"cannot read --image {image_path}: {error}") from None
    request = GenerationRequest(
        prompt=prompt, prompt_2=prompt_2, height=height, width=width, num_inference_steps=steps,
        guidance_scale=guidance, seed=seed, num_images_per_prompt=num_images,
        max_sequence_length=max_sequence_length, image=reference, auto_resize_reference=not keep_reference_size,
    )  # fmt: skip
    resolved = resolve_request(source, request)  # validate everything before any weight is loaded
    paths = _check_output(output, resolved.batch)
    engine = create_backend(backend, source, dtype=dtype, device=device, engines=engines)
    with step_progress(f"{source.name} {resolved.width}×{resolved.height}", resolved.steps) as advance:
        result = generate(engine, source, request, on_step=advance)
    for message in result.warnings:
        warn(message)
    for image, path in zip(result.images, paths, strict=True):
        save_png_atomic(image, path)
    rows = [[stage.replace("_", " "), f"{seconds * 1000:.1f}"] for stage, seconds in result.timings.items()]
    console.print(table(f"{backend} · {resolved.steps} steps · batch {resolved.batch}", ["stage", "ms"], rows))
    for path in paths:
        click.echo(str(path))


if __name__ == "__main__":
    sys.exit(main())
