"""The `fluxexport` command: parsing and messages only; the work lives in the library modules."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

import click

from fluxexport.backend_factory import BACKENDS
from fluxexport.commands.common import TINY_DEFAULT, BackendOptions, ModelOptions, component_list
from fluxexport.console import byte_progress, console, quiet_libraries, step_progress, table, warn
from fluxexport.dtypes import ENGINE_PRECISIONS, PRECISIONS, QUANTIZED_PRECISIONS
from fluxexport.errors import FluxExportError, RequestError, Terms
from fluxexport.onnxruntime.backend import PROVIDERS
from fluxexport.triton.config import INSTANCE_KINDS


def _remember_loras(ctx: click.Context, _param, values) -> tuple:
    from fluxexport.models.lora import parse_lora

    ctx.meta["loras"] = tuple(parse_lora(value) for value in values)
    return ctx.meta["loras"]


def _remember_text_layers(ctx: click.Context, _param, value: str | None) -> tuple[int, ...] | None:
    layers = None
    if value is not None:
        try:
            layers = tuple(int(layer) for layer in value.split(","))
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a list of layer numbers such as 9,18,27") from None
    ctx.meta["text_encoder_layers"] = layers
    return layers


def model_options(function):
    """--model, --base-model, --lora and --text-encoder-layers, the same on every command that reads a
    checkpoint."""
    function = click.option(
        "--text-encoder-layers", expose_value=False, callback=_remember_text_layers, metavar="N,N,N",
        help="FLUX.2: the text encoder's hidden-state layers stacked into the prompt embedding, for a fine-tune "
        "that reads others (diffusers' text_encoder_out_layers; default the pipeline's: [klein] 9,18,27, "
        "[dev] 10,20,30).",
    )(function)  # fmt: skip
    function = click.option(
        "--lora", "loras", multiple=True, expose_value=False, callback=_remember_loras, metavar="FILE[:SCALE]",
        help="A LoRA (.safetensors; diffusers/PEFT, kohya or XLabs); repeatable. torch and export: merged into the "
        "weights; onnxruntime: swapped into the graphs' initializers; tensorrt: the engines refitted with it "
        "(fluxexport refit).",
    )(function)  # fmt: skip
    function = click.option(
        "--base-model", help="With a single-file --model: folder/hub id/tiny variant for the other parts."
    )(function)
    return click.option(
        "--model",
        default=TINY_DEFAULT,
        show_default=True,
        help="Tiny variant, diffusers folder, hub id or BFL .safetensors (the one the graphs/engines came from).",
    )(function)


# A request's input (the runtime's vocabulary, RequestError.field) → the flag that sets it, where the two differ;
# per command where a command names it otherwise (bench's --batch)
REQUEST_FLAGS = {"num_images_per_prompt": "num-images", "num_inference_steps": "steps", "guidance_scale": "guidance",
                 "max_sequence_length": "max-sequence-length", "negative_prompt": "negative-prompt",
                 "prompt_2": "prompt-2", "control_image": "control-image", "prompt_embeds_scale": "redux-scale",
                 "auto_resize_reference": "keep-reference-size",
                 "pooled_prompt_embeds_scale": "redux-pooled-scale"}  # fmt: skip
COMMAND_FLAGS = {"bench": {"num_images_per_prompt": "batch"}}


def command_line_terms(command: str | None = None) -> Terms:
    """How `command` names a request's inputs: its flags."""
    flags = REQUEST_FLAGS | COMMAND_FLAGS.get(command or "", {})
    return Terms(flags, option="--{name}", given="with --{name}", drop="drop --{name}", pointer=" (--{name})")


def _fail(error: Exception, command: str | None = None) -> None:
    message = error.render(command_line_terms(command)) if isinstance(error, RequestError) else str(error)
    raise click.ClickException(message.splitlines()[0] if message else type(error).__name__)


class _Group(click.Group):
    """Turns FluxExportError into a one-line `Error: …` and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FluxExportError as error:
            _fail(error, ctx.invoked_subcommand)


@click.group(cls=_Group)
@click.version_option(package_name="fluxexport")
def main() -> None:
    """FLUX.1 (schnell, dev, Kontext) and FLUX.2 ([klein], [dev]) from PyTorch to ONNX and TensorRT, and a small
    runtime that runs them."""
    quiet_libraries()


def _tiny_help() -> str:
    """`tiny`'s help, listing the variants from the tiny models' own registry."""
    from fluxexport.families import FAMILIES
    from fluxexport.models.tiny import TINY_PRIORS, TINY_VARIANTS

    listed = "; ".join(
        f"{family.title} {', '.join(name for name, variant in TINY_VARIANTS.items() if variant.family is family)}"
        for family in FAMILIES
    )
    priors = ", ".join(TINY_PRIORS)
    return (
        f"Write a tiny random FLUX model as a diffusers folder. VARIANT: {listed}; a FLUX.1 Redux prior (for --redux): "
        f"{priors}. Random weights: its images look like noise, which is expected."
    )


@main.command(help=_tiny_help())
@click.argument("variant")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Folder to write.")
@click.option(
    "--single-file",
    type=click.Path(path_type=Path),
    help="Also write the transformer as a black-forest-labs single-file checkpoint here.",
)
def tiny(variant: str, out: Path, single_file: Path | None) -> None:
    from fluxexport.commands.tiny import write_tiny_model

    folder = write_tiny_model(variant, out, single_file)
    console.print(f"wrote {variant} to {folder}")
    if single_file is not None:
        console.print(f"wrote its transformer in black-forest-labs layout to {single_file}")


@main.command("tiny-lora")
@click.argument("variant")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="LoRA file to write (.safetensors).")
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya", "xlabs", "control", "ai-toolkit"]),
              default="peft", show_default=True,
              help="Key layout: FLUX.1 peft, kohya (with CLIP layers), xlabs or control (a Canny/Depth LoRA: FLUX.1-dev "
                   "with it runs --control-image); FLUX.2 peft, kohya or ai-toolkit.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
def tiny_lora(variant: str, out: Path, fmt: str, seed: int) -> None:
    """Write a random LoRA that fits a tiny model (its first double and single block), for trying --lora offline:
    `run --model VARIANT --lora FILE` draws a visibly different image."""
    from fluxexport.commands.tiny import write_random_lora

    path = write_random_lora(variant, out, fmt, seed)
    console.print(f"wrote a random {fmt} LoRA for {variant}")
    click.echo(str(path))


def _model(model: str, base_model: str | None) -> ModelOptions:
    """The --model (and --base-model) checkpoint with the command's --lora files and --text-encoder-layers."""
    meta = click.get_current_context().meta
    return ModelOptions(model, base_model, meta.get("loras", ()), meta.get("text_encoder_layers"))


backend_option = click.option(
    "--backend", type=click.Choice(BACKENDS),
    help="Where the model runs (default: the kind of folder --engines names, exported graphs onnxruntime and "
    "engines tensorrt; without --engines, torch).",
)  # fmt: skip
fp8_option = click.option(
    "--fp8/--no-fp8", default=None,
    help="onnxruntime: run quantize's FP8 transformer, or the base one (default: the FP8 one if the folder has it).",
)  # fmt: skip
optimized_option = click.option(
    "--optimized/--no-optimized", default=None,
    help="onnxruntime: run `optimize`'s fused graphs, or the portable ones (default: the fused ones if present).",
)  # fmt: skip



def size_options(function):
    """--height and --width, as every command that generates an image takes them."""
    for name in ("--width", "--height"):  # applied bottom-up: --height is listed first
        function = click.option(name, type=int, help="Pixels, a multiple of 16 (default: 1024, or 256 for tiny models).")(
            function
        )
    return function


def calibration_runner_options(function):
    """--guidance, --backend, --engines (the transformer in parts), --dtype and --device: what the calibrate
    commands run on."""
    options = (
        click.option("--guidance", type=float,
                     help="Guidance scale: embedded (FLUX.1 dev, Kontext, FLUX.2 dev) or true CFG (FLUX.2 base)."),
        backend_option,
        click.option("--engines", type=click.Path(path_type=Path),
                     help="Graphs or engines holding the transformer in parts (export --transformer-parts)."),
        click.option("--dtype", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                     help="torch backend dtype."),
        click.option("--device", help="torch device (default: cuda if available, else cpu)."),
    )  # fmt: skip
    for option in reversed(options):
        function = option(function)
    return function

cache_option = click.option(
    "--cache", "cache_text", metavar="NAME[:key=value,…]",
    help="Step cache: none (default), taylorseer (keys interval=5, order=1, warmup=3: diffusers' "
    "TaylorSeerCacheConfig lite mode), first-block (threshold=0.05) or magcache (threshold=0.06, max_skip_steps=3, "
    "retention_ratio=0.2, ratios=FILE|flux-dev: diffusers' MagCacheConfig; FILE from calibrate-magcache) or "
    "teacache (threshold=0.25, coefficients=flux1-dev|FILE: ali-vilab's TeaCache4FLUX; FILE from "
    "calibrate-teacache); first-block, magcache and teacache need the transformer in parts (export "
    "--transformer-parts); skipped steps never run the transformer's blocks.",
)  # fmt: skip


def tensorrt_run_options(command):
    """--low-vram, --cuda-graphs/--no-cuda-graphs and --weight-streaming-budget, for the tensorrt backend."""
    command = click.option(
        "--low-vram", is_flag=True,
        help="tensorrt: keep one component's engines in GPU memory at a time (the transformer's parts together).",
    )(command)  # fmt: skip
    command = click.option(
        "--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
        help="tensorrt: replay the transformer's repeated shapes as CUDA graphs.",
    )(command)  # fmt: skip
    return click.option(
        "--weight-streaming-budget", metavar="BYTES|PERCENT|auto",
        help="tensorrt: GPU memory for the weights of engines built with --weight-streaming (e.g. 12GiB, 50%, "
        "auto: what the GPU's free memory holds beside the engine's scratch and a 1 GiB margin); the rest streams "
        "from host memory on every step, without CUDA graphs.",
    )(command)  # fmt: skip


def reference_budget_options(default: str):
    """FLUX.2's reference budget (export and build): how many references beside the target, the pixels of each,
    their largest aspect ratio; it sizes the transformer's tokens and the VAE encoder's sides apart from the target."""

    def decorate(command):
        command = click.option(
            "--max-reference-aspect", type=float,
            help=f"FLUX.2: the longest over the shortest side of a reference at that area, up to 8 ({default} 2: "
            "any aspect up to 2:1).",
        )(command)  # fmt: skip
        command = click.option(
            "--max-reference-area", type=int,
            help=f"FLUX.2: pixels of each reference, up to 1048576 ({default} 1048576: the pipelines scale larger "
            "references to 1 MP).",
        )(command)  # fmt: skip
        return click.option(
            "--max-references", type=int, help=f"FLUX.2: reference images beside the target ({default} 1)."
        )(command)

    return decorate


@main.command()
@model_options
@click.option("--prompt", help="Text to draw (FLUX.1: CLIP, and T5 unless --prompt-2); optional with --redux.")
@click.option("--prompt-2", help="FLUX.1: text for T5 (defaults to --prompt).")
@click.option("--negative-prompt", help='FLUX.2 base models (true CFG): what to steer away from (default "").')
@size_options
@click.option("--steps", type=int,
              help="Denoising steps (default: the model's: FLUX.1 schnell 4, dev and Kontext 28; FLUX.2 [klein] 4, "
                   "[klein] base 50, [dev] 50).")  # fmt: skip
@click.option("--guidance", type=float,
              help="Guidance scale: embedded (FLUX.1 dev and Kontext, default 3.5; FLUX.2 [dev], 4) or true CFG "
                   "(FLUX.2 [klein] base, 4); FLUX.1 schnell and FLUX.2 [klein] ignore it.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--max-sequence-length", type=int,
              help="Text tokens, at most 512: FLUX.1's T5 (default 256 schnell, 512 dev/Kontext); FLUX.2's text "
                   "encoder, the prompt in its chat template padded to this length (default 512).")  # fmt: skip
@click.option(
    "--image",
    "image_paths",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Reference image: one for FLUX.1 Kontext; FLUX.2 takes several (repeat --image); FLUX.1 Fill: the image "
    "to repaint.",
)
@click.option(
    "--mask",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="FLUX.1 Fill: white where --image is repainted, black where it is kept (made gray, binarized at 50%).",
)
@click.option(
    "--control-image",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="FLUX.1 Canny/Depth: the edge or depth map the image follows (the output takes its size by default).",
)
@click.option(
    "--keep-reference-size", is_flag=True, help="Encode the reference at its own size, not Kontext's preferred one."
)
@click.option(
    "--redux",
    help="FLUX.1 Redux prior (folder, hub id or tiny-redux) in front of FLUX.1 dev/schnell: variations of --image "
    "(several are blended), the prompt optional.",
)
@click.option(
    "--redux-engines", type=click.Path(path_type=Path),
    help="The Redux prior's exported graphs (`export --redux`), run on onnxruntime.",
)  # fmt: skip
@click.option("--redux-scale", "redux_scales", type=float, multiple=True,
              help="Redux: weight of each image's text+image tokens (one, or one per --image; default 1).")  # fmt: skip
@click.option("--redux-pooled-scale", "redux_pooled_scales", type=float, multiple=True,
              help="Redux: weight of each image's pooled prompt embedding (default 1).")  # fmt: skip
@backend_option
@click.option(
    "--engines", type=click.Path(path_type=Path),
    help="Exported graphs or a Black Forest Labs *-onnx folder (onnxruntime), or built engines (tensorrt).",
)  # fmt: skip
@tensorrt_run_options
@fp8_option
@optimized_option
@cache_option
@click.option("--dtype", type=click.Choice(PRECISIONS), default="fp32", show_default=True, help="torch backend dtype.")
@click.option("--device", help="torch device (default: cuda if available, else cpu).")
@click.option("--output", type=click.Path(path_type=Path), default=Path("flux.png"), show_default=True)
def run(
    model, base_model, prompt, prompt_2, negative_prompt, height, width, steps, guidance, seed, num_images,
    max_sequence_length, image_paths, mask, control_image, keep_reference_size, redux, redux_engines, redux_scales,
    redux_pooled_scales, backend, engines, low_vram, cuda_graphs, weight_streaming_budget, fp8, optimized, cache_text,
    dtype, device, output,
) -> None:  # fmt: skip
    """Generate images with FLUX on a backend; writes PNGs and prints per-stage timings."""
    from fluxexport.commands.run import RunOptions, run_images

    if prompt is None and redux is None:
        raise click.UsageError("Missing option '--prompt' (only a --redux prior runs without one).")

    runner = BackendOptions(
        backend=backend, engines=engines, dtype=dtype, device=device, low_vram=low_vram, cuda_graphs=cuda_graphs,
        weight_streaming_budget=weight_streaming_budget, fp8=fp8, optimized=optimized,
    )  # fmt: skip
    options = RunOptions(
        prompt=prompt, model=_model(model, base_model), runner=runner, prompt_2=prompt_2,
        negative_prompt=negative_prompt, height=height, width=width, steps=steps, guidance=guidance, seed=seed,
        num_images=num_images, max_sequence_length=max_sequence_length, references=tuple(image_paths),
        mask=mask, control_image=control_image, keep_reference_size=keep_reference_size, cache=cache_text,
        output=output, redux=redux, redux_engines=redux_engines, prompt_embeds_scale=tuple(redux_scales) or (1.0,),
        pooled_prompt_embeds_scale=tuple(redux_pooled_scales) or (1.0,),
    )  # fmt: skip
    result = run_images(options, progress=step_progress, log=console.print)
    generation, resolved = result.generation, result.request
    for message in generation.warnings:
        warn(message)
    rows = [[stage.replace("_", " "), f"{seconds * 1000:.1f}"] for stage, seconds in generation.timings.items()]
    rows.append(["transformer steps computed", f"{generation.computed_steps} of {resolved.steps}"])
    console.print(table(f"{result.backend} · {resolved.steps} steps · batch {resolved.batch}", ["stage", "ms"], rows))
    console.print(generation.cache_summary)
    for path in result.paths:
        click.echo(str(path))


@main.command("calibrate-magcache")
@model_options
@click.option("--prompt", "prompts", multiple=True, required=True,
              help="Text to calibrate on; repeatable (all prompts run as one batch).")  # fmt: skip
@click.option("--steps", type=int, default=28, show_default=True, help="Denoising steps: one ratio each.")
@size_options
@click.option("--seed", type=int, default=0, show_default=True)
@calibration_runner_options
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="JSON file to write, for --cache magcache:ratios=FILE.")  # fmt: skip
def calibrate_magcache(
    model, base_model, prompts, steps, height, width, guidance, seed, backend, engines, dtype, device, out
) -> None:  # fmt: skip
    """Measure MagCache's magnitude ratios (one per step, every step computed) for --cache magcache:ratios=FILE,
    as diffusers' MagCacheConfig(calibrate=True) does (FLUX.1 and FLUX.2; under true CFG, the conditional run's)."""
    from fluxexport.commands.run import CalibrateOptions, measure_magcache

    runner = BackendOptions(backend=backend, engines=engines, dtype=dtype, device=device)
    options = CalibrateOptions(
        prompts=tuple(prompts), out=out, model=_model(model, base_model), runner=runner, steps=steps, height=height,
        width=width, guidance=guidance, seed=seed,
    )  # fmt: skip
    result = measure_magcache(options, progress=step_progress, log=console.print)
    ratios, resolved = result.ratios, result.request
    per_row = 7  # a short table: seven steps a row
    rows = [
        [f"{first + 1}–{min(first + per_row, len(ratios))}",
         *(f"{ratio:.4f}" for ratio in ratios[first : first + per_row])]
        for first in range(0, len(ratios), per_row)
    ]  # fmt: skip
    columns = ["steps", "ratios", *[""] * (min(per_row, len(ratios)) - 1)]
    console.print(table(f"magcache ratios ({resolved.steps} steps)", columns, rows))
    click.echo(str(result.path))


@main.command("calibrate-teacache")
@model_options
@click.option("--prompt", "prompts", multiple=True,
              help="Text to calibrate on; repeatable (all prompts run as one batch; default: four varied prompts).")  # fmt: skip
@click.option("--seed", "seeds", type=int, multiple=True,
              help="Seed of one uncached run; repeatable (default: 0).")  # fmt: skip
@click.option("--steps", type=int, default=28, show_default=True, help="Denoising steps of each run.")
@size_options
@calibration_runner_options
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="JSON file to write, for --cache teacache:coefficients=FILE.")  # fmt: skip
def calibrate_teacache(
    model, base_model, prompts, seeds, steps, height, width, guidance, backend, engines, dtype, device, out
) -> None:  # fmt: skip
    """Fit TeaCache's rescaling polynomial (degree 4, numpy.polyfit, as ali-vilab fit theirs) to uncached runs'
    per-step (modulated-input change, output change) for --cache teacache:coefficients=FILE."""
    from fluxexport.commands.calibrate_teacache import DEFAULT_PROMPTS, TeaCalibrateOptions, calibrate_teacache

    runner = BackendOptions(backend=backend, engines=engines, dtype=dtype, device=device)
    options = TeaCalibrateOptions(
        out=out, prompts=tuple(prompts) or DEFAULT_PROMPTS, seeds=tuple(seeds) or (0,),
        model=_model(model, base_model), runner=runner, steps=steps, height=height, width=width, guidance=guidance,
    )  # fmt: skip
    result = calibrate_teacache(options, progress=step_progress, log=console.print)
    rows = [[f"x^{len(result.coefficients) - 1 - power}", f"{c:.6g}"] for power, c in enumerate(result.coefficients)]
    console.print(table(f"teacache fit, {len(result.pairs)} pairs", ["term", "coefficient"], rows))
    click.echo(str(result.path))


def _print_check(check) -> None:
    """The TensorRT check's table, then its refusal when a graph failed."""
    from fluxexport.export.check import tensorrt_support

    rows = [
        [report.name, str(report.opset), str(report.nodes), "ok" if report.ok else "[red]FAIL[/red]",
         "; ".join(report.problems[:3]) + (" …" if len(report.problems) > 3 else "")]
        for report in check.reports
    ]  # fmt: skip
    title = f"TensorRT {check.reports[0].tensorrt if check.reports else tensorrt_support()['tensorrt']} compatibility"
    console.print(table(title, ["graph", "opset", "nodes", "status", "problems"], rows))
    if check.failure:
        raise FluxExportError(check.failure)


@main.command()
@model_options
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: engines/<model>/onnx).")
@click.option(
    "--components",
    help="Comma-separated subset (default: all of the family's): FLUX.1 clip,t5,transformer,vae_decoder,vae_encoder; "
    "FLUX.2 text_encoder,transformer,vae_decoder,vae_encoder; either: transformer_head,transformer_tail,transformer_out.",
)
@click.option("--dtype", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Compute dtype; fp16 keeps T5 in bf16 and the VAE in fp32.")  # fmt: skip
@click.option("--opset", type=int, default=None, help="ONNX opset (default 20: TensorRT 10.1's newest).")
@click.option("--max-batch", type=int, help="Largest batch the graphs must serve (default 4).")
@click.option("--min-resolution", type=int, help="Smallest image side in pixels (default 256; 64 for tiny models).")
@click.option("--max-resolution", type=int, help="Largest image side in pixels (default 1360; 1024 for tiny models).")
@click.option("--external-data/--inline-weights", default=None,
              help="Weights in a .onnx_data file beside each graph, or inline (up to 2 GB) "
                   "(default: beside it past 32 MiB).")  # fmt: skip
@click.option("--check/--no-check", "run_check", default=True, show_default=True, help="Run `fluxexport check` after.")
@click.option("--transformer-parts", is_flag=True,
              help="Also the transformer in three parts (head, tail, out) that `--cache first-block` and "
                   "`--cache magcache` run.")  # fmt: skip
@click.option("--replace", is_flag=True,
              help="Remove the graphs --out holds first (without it, a folder of another model, dtype or bounds "
                   "is refused).")  # fmt: skip
@click.option("--native-attention", is_flag=True,
              help="Attention and RMS norms as ONNX's own Attention / RMSNormalization ops (opset 23, the default "
                   "with this flag; TensorRT 10.15 or newer parses them). Default: decomposed, for any TensorRT.")  # fmt: skip
@reference_budget_options("default")
@click.option("--redux", help="Export this FLUX.1 Redux prior (folder, hub id or tiny-redux) instead: its SigLIP image "
              "encoder and Redux embedder (fp32, dynamic batch; the image size is the prior's own).")  # fmt: skip
def export(
    model,
    base_model,
    out,
    components,
    dtype,
    opset,
    max_batch,
    min_resolution,
    max_resolution,
    external_data,
    run_check,
    transformer_parts,
    replace,
    native_attention,
    max_references,
    max_reference_area,
    max_reference_aspect,
    redux,
) -> None:
    """Export FLUX components to ONNX (dynamic batch, resolution and text length) with a manifest."""
    from fluxexport.commands.export import ExportOptions, plan_export, run_export

    if redux is not None:
        _export_redux(redux, out, opset, run_check)
        return

    options = ExportOptions(
        model=_model(model, base_model), out=out, components=component_list(components), dtype=dtype, opset=opset,
        max_batch=max_batch, min_resolution=min_resolution, max_resolution=max_resolution,
        external_data=external_data, run_check=run_check, transformer_parts=transformer_parts, replace=replace,
        max_references=max_references, max_reference_area=max_reference_area,
        max_reference_aspect=max_reference_aspect, native_attention=native_attention,
    )  # fmt: skip
    plan = plan_export(options)  # refused before anything is printed
    for note in plan.notes:
        console.print(f"note: {note}")
    console.print(f"export {plan.source.name} → {plan.out}: {', '.join(plan.names)}")
    with byte_progress() as update:
        result = run_export(plan, on_bytes=update)
    rows = [[g.component, g.dtype, str(g.nodes), f"{g.bytes / 1e6:.1f}", f"{g.seconds:.1f}"] for g in result.graphs]
    console.print(table(f"exported to {result.out}", ["component", "dtype", "nodes", "MB", "s"], rows))
    if result.check is not None:
        _print_check(result.check)
    click.echo(str(result.out))


def _export_redux(redux: str, out: Path | None, opset: int | None, run_check: bool) -> None:
    """`export --redux`: the prior's two graphs, their table and the TensorRT check."""
    from fluxexport.commands.export import export_redux_prior

    result = export_redux_prior(redux, out, opset, run_check)
    rows = [[name, g.dtype, str(g.extra.get("nodes", "")), f"{g.extra.get('weight_bytes', 0) / 1e6:.1f}",
             f"{g.extra.get('export_seconds', 0):.1f}"] for name, g in result.graphs.items()]  # fmt: skip
    console.print(table(f"exported {result.redux} to {result.out}", ["component", "dtype", "nodes", "MB", "s"], rows))
    if result.check is not None:
        _print_check(result.check)
    click.echo(str(result.out))


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--tensorrt", help="TensorRT version to check against (default: the bundled operator list's).")
def check(folder: Path, tensorrt: str | None) -> None:
    """Lint exported graphs for TensorRT: supported ops and types, no DOUBLE, known ranks, opset, contract."""
    from fluxexport.commands.export import check_export

    _print_check(check_export(folder, tensorrt))


@main.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path))
def upgrade(folders) -> None:
    """Rewrite the manifest of export or engine folders written by an older fluxexport in this one's format."""
    from fluxexport.commands.export import upgrade_folders

    upgrade_folders(folders, lambda folder, version: console.print(f"{folder}: manifest format {version}"))


@main.command()
@model_options
@click.option("--engines", type=click.Path(path_type=Path),
              help="Folder of exported graphs (or a Black Forest Labs *-onnx folder), or of TensorRT engines "
              "(fluxexport build) (default: "
              "engines/<model>/onnx, where export writes).")  # fmt: skip
@click.option("--components", help="Comma-separated subset to compare (default: every graph in --engines).")
@click.option("--steps", type=int, default=4, show_default=True, help="Denoising steps of the end-to-end comparison.")
@click.option("--report", type=click.Path(path_type=Path), help="JSON report path (default: ENGINES/validation.json).")
@click.option("--max-rel-l2", type=float, help="Fail above this rel-L2 (default per dtype: fp32 1e-5).")
@click.option("--min-psnr", type=float, help="Fail below this image PSNR in dB (default per dtype: fp32 50).")
@fp8_option
@optimized_option
@cache_option
@click.option("--redux", help="FLUX.1 Redux prior whose graphs --engines holds (`export --redux`): compare those.")
def validate(
    model, base_model, engines, components, steps, report, max_rel_l2, min_psnr, fp8, optimized, cache_text, redux
) -> None:  # fmt: skip
    """Compare exported graphs (or TensorRT engines) with PyTorch per component and end to end, engines also
    with ONNX Runtime on their own graphs; non-zero exit past thresholds."""
    from fluxexport.commands.validate import ValidateOptions, validate_folder

    options = ValidateOptions(
        model=_model(model, base_model), engines=engines, components=component_list(components), steps=steps,
        report=report, max_rel_l2=max_rel_l2, min_psnr=min_psnr, fp8=fp8, optimized=optimized, cache=cache_text,
        redux=redux,
    )  # fmt: skip
    validated = validate_folder(options, progress=step_progress)
    result, dtype = validated.report, validated.reference_dtype
    rows = [
        [c.component, c.output, " ".join(f"{k}={v}" for k, v in c.sizes.items()) + (" (export)" if c.seen_at_export else ""),
         "ONNX Runtime" if c.against == "onnxruntime" else f"PyTorch {dtype}",
         f"{c.max_abs:.2e}", f"{c.rel_l2:.2e}", f"{c.cosine:.6f}", "ok" if c.passed else "[red]FAIL[/red]"]
        for c in result.components
    ]  # fmt: skip
    console.print(
        table(
            f"{result.dtype} {result.subject}",
            ["component", "output", "shape", "against", "max abs", "rel-L2", "cosine", ""],
            rows,
        )
    )
    image_rows = [
        [f"{i.width}×{i.height}", f"{i.psnr:.1f}", str(i.max_abs_diff), "ok" if i.passed else "[red]FAIL[/red]"]
        for i in result.images
    ]
    if image_rows:  # a Redux prior's graphs make embeddings, not images
        console.print(
            table(
                f"end to end, {steps} steps, cache {result.cache}", ["image", "PSNR dB", "max |Δ| (uint8)", ""],
                image_rows,
            )
        )  # fmt: skip
    if result.cache_quality:
        quality_rows = [
            [f"{q.width}×{q.height}", f"{q.psnr:.1f}", f"{q.reference_psnr:.1f}",
             f"{sum(q.decisions)}/{len(q.decisions)}", f"{sum(q.reference_decisions)}/{len(q.reference_decisions)}",
             "same" if q.same_decisions else "[yellow]differ[/yellow]"]
            for q in result.cache_quality
        ]  # fmt: skip
        console.print(table(
            f"what cache {result.cache} costs: each side's cached image against its uncached one (same seed)",
            ["image", f"PSNR dB ({result.subject})", f"PSNR dB (PyTorch {dtype})", "computed", "PyTorch computed",
             "skip decisions"], quality_rows,
        ))  # fmt: skip
    click.echo(str(validated.path))
    if validated.failure:
        raise FluxExportError(validated.failure)


@main.command()
@model_options
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: engines/<model>/onnx).")
@click.option("--dtype", type=click.Choice(PRECISIONS), default="bf16", show_default=True,
              help="Precision of everything that is not FP8 (fp32 runs in ONNX Runtime on CPU).")  # fmt: skip
@click.option(
    "--calib-prompts", type=click.Path(path_type=Path), help="Calibration prompts, one per line (default: built-in 32)."
)
@click.option("--calib-size", type=int, help="Use the first N calibration prompts.")
@click.option("--calib-steps", type=int, help="Denoising steps per calibration prompt (default: the model's).")
@click.option("--calib-resolution", type=int, help="Calibration image side in pixels (default: the model's).")
@click.option(
    "--calibration", "calibration_file", type=click.Path(path_type=Path),
    help="Reuse an earlier calibration.json of this checkpoint: no model runs.",
)  # fmt: skip
@click.option(
    "--sequential/--whole-model", default=None,
    help="Calibrate holding one block at a time, read from the checkpoint, or the whole float32 model "
    "(default: one block at a time when the model does not fit in free memory).",
)  # fmt: skip
@click.option("--opset", type=int, default=None, help="ONNX opset, ≥ 19 for FP8 (default 20).")
@click.option("--external-data/--inline-weights", default=None, help="Weights beside the graph (default: past 32 MiB).")
@click.option("--transformer-parts", is_flag=True,
              help="Also the transformer's parts (--cache first-block, magcache), with the same scales (default: "
              "the parts --out holds).")  # fmt: skip
@click.option("--replace", is_flag=True,
              help="When --out holds another model's graphs, remove them first (without it: refused).")  # fmt: skip
@click.option("--fp8-attention", is_flag=True,
              help="Also the attention matmuls in FP8 (query, key, value, softmax output), for TensorRT's fused FP8 "
              "attention, calibrated on the same trajectories.")  # fmt: skip
@click.option("--precision", type=click.Choice(QUANTIZED_PRECISIONS), default="fp8", show_default=True,
              help="fp8 (E4M3 per tensor: Ada, Hopper, Blackwell) or nvfp4 (FP4 in blocks of 16 with E4M3 block "
              "scales, activations quantized at run time: TensorRT ≥ 10.8 on Blackwell).")  # fmt: skip
def quantize(
    model, base_model, out, dtype, calib_prompts, calib_size, calib_steps, calib_resolution, calibration_file,
    sequential, opset, external_data, transformer_parts, replace, fp8_attention, precision,
) -> None:  # fmt: skip
    """Calibrate FP8 (E4M3) scales on denoising trajectories and export the transformer (and its parts) as Q/DQ
    graphs (--precision nvfp4: NVFP4 graphs for TensorRT on Blackwell, from the same calibration)."""
    from fluxexport.commands.quantize import QuantizeOptions, quantize_fp8

    options = QuantizeOptions(
        model=_model(model, base_model), out=out, dtype=dtype, calib_prompts=calib_prompts, calib_size=calib_size,
        calib_steps=calib_steps, calib_resolution=calib_resolution, calibration_file=calibration_file,
        sequential=sequential, opset=opset, external_data=external_data, transformer_parts=transformer_parts,
        replace=replace, fp8_attention=fp8_attention, precision=precision,
    )  # fmt: skip
    with ExitStack() as bars:  # one live bar at a time: calibration's, then the graphs' bytes
        writing: list = []

        def on_bytes(name: str, done: int, total: int) -> None:
            if not writing:
                writing.append(bars.enter_context(byte_progress()))
            writing[0](f"{name} ({precision})", done, total)

        result = quantize_fp8(options, progress=step_progress, log=console.print, on_bytes=on_bytes)
    for graph in result.graphs:
        console.print(f"{graph.path.name}: {graph.note}")
    _print_check(result.check)  # NVFP4 graphs against the TensorRT that parses them (10.15's list)
    for graph in result.graphs:
        click.echo(str(graph.path))


def _range(value: str, option: str) -> tuple[int, int, int]:
    """`MIN:OPT:MAX`, `MIN:MAX` or `N` → (min, opt, max)."""
    try:
        parts = [int(part) for part in value.split(":")]
    except ValueError:
        raise FluxExportError(f"{option} takes N, MIN:MAX or MIN:OPT:MAX, got {value!r}") from None
    if len(parts) == 1:
        parts = parts * 3
    elif len(parts) == 2:
        parts = [parts[0], parts[1], parts[1]]
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise FluxExportError(f"{option} needs 1 ≤ MIN ≤ OPT ≤ MAX, got {value!r}")
    return tuple(parts)


@main.command()
@model_options
@click.option("--precision", type=click.Choice(ENGINE_PRECISIONS), default="bf16", show_default=True)
@click.option(
    "--onnx", "onnx_dir", type=click.Path(path_type=Path),
    help="Exported graphs, or a Black Forest Labs *-onnx folder, read as it is (default: engines/<model>/onnx).",
)  # fmt: skip
@click.option(
    "--out", type=click.Path(path_type=Path), help="Engine folder (default: engines/<model>/trt-<precision>)."
)
@click.option("--components", help="Comma-separated subset (default: every graph in --onnx).")
@click.option("--batch", help="Batch MIN:OPT:MAX (default: the export's bounds, 1:1:4).")
@click.option("--min-resolution", type=int, help="Smallest image side (default: the export's, 256).")
@click.option("--opt-resolution", type=int, help="Profile optimum (default: the export's, 1024).")
@click.option("--max-resolution", type=int, help="Largest image side (default: the export's, 1360).")
@click.option(
    "--resolution-buckets", type=int, default=1, show_default=True, help="Profiles over the resolution range."
)
@click.option("--text-len", help="Text tokens MIN:OPT:MAX: FLUX.1's T5, FLUX.2's text encoder with its chat template "
              "(default: the export's: 1:256:512 FLUX.1 schnell, 1:512:512 the others).")  # fmt: skip
@click.option("--optimization-level", type=click.IntRange(0, 5), default=3, show_default=True)
@click.option("--refittable", is_flag=True, help="Engines whose weights can be refitted without a rebuild.")
@click.option("--weight-streaming", is_flag=True, help="Engines that can stream weights from host memory.")
@click.option("--prepare/--no-prepare", default=True, show_default=True,
              help="Export/quantize the graphs the engines need when --onnx lacks them (fp8 implies quantize).")  # fmt: skip
@reference_budget_options("default: the export's,")
@click.option("--redux", help="Build this FLUX.1 Redux prior's engines instead, from its graphs in --onnx (`export "
              "--redux`): fp32 as exported, one profile over --batch (images, default 1:1:4).")  # fmt: skip
def build(model, base_model, precision, onnx_dir, out, components, batch, min_resolution, opt_resolution,
          max_resolution, resolution_buckets, text_len, optimization_level, refittable, weight_streaming, prepare,
          max_references, max_reference_area, max_reference_aspect, redux) -> None:  # fmt: skip
    """Build TensorRT engines (bf16, or fp8 from the calibrated Q/DQ transformer) with profiles and a manifest."""
    from fluxexport.commands.build import BuildCommandOptions, build_engines_folder, build_redux_folder

    if redux is not None:
        built = build_redux_folder(
            redux, onnx_dir, out, _range(batch, "--batch") if batch else None, optimization_level, step_progress
        )
        rows = [[name, f"{seconds:.1f}"] for name, seconds in built.seconds.items()]
        console.print(table(f"engines in {built.out}", ["component", "build s"], rows))
        click.echo(str(built.out))
        return

    options = BuildCommandOptions(
        model=_model(model, base_model), precision=precision, onnx_dir=onnx_dir, out=out,
        components=component_list(components), batch=_range(batch, "--batch") if batch else None,
        min_resolution=min_resolution, opt_resolution=opt_resolution, max_resolution=max_resolution,
        resolution_buckets=resolution_buckets, text_len=_range(text_len, "--text-len") if text_len else None,
        optimization_level=optimization_level, refittable=refittable, weight_streaming=weight_streaming,
        prepare=prepare, max_references=max_references, max_reference_area=max_reference_area,
        max_reference_aspect=max_reference_aspect,
    )  # fmt: skip
    result = build_engines_folder(options, progress=step_progress, log=console.print)
    rows = [[name, f"{seconds:.1f}"] for name, seconds in result.seconds.items()]
    console.print(table(f"engines in {result.out}", ["component", "build s"], rows))
    click.echo(str(result.out))


@main.command()
@model_options
@click.option("--engines", type=click.Path(path_type=Path), required=True, help="Engines built with --refittable.")
@click.option("--reset", is_flag=True, help="Back to the base weights (drops the refitted plans).")
def refit(model, base_model, engines, reset) -> None:
    """Refit TensorRT engines with --lora files (no rebuild): only the weights the LoRAs touch change."""
    from fluxexport.commands.build import refit_folder

    result = refit_folder(_model(model, base_model), engines, reset)
    rows = [[name, file, "base" if refitted is None else str(refitted)]
            for name, (file, refitted) in result.plans.items()]  # fmt: skip
    console.print(table(f"engines in {engines}", ["component", "plan", "weights refitted"], rows))
    click.echo(str(engines))


@main.command()
@model_options
@backend_option
@click.option("--engines", type=click.Path(path_type=Path), help="Graphs (onnxruntime) or engines (tensorrt).")
@click.option("--dtype", type=click.Choice(PRECISIONS), default="fp32", show_default=True, help="torch backend dtype.")
@click.option("--device", help="torch device (default: cuda if available).")
@size_options
@click.option("--steps", type=int, help="Denoising steps (default: the model's, as for run).")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the results here.")
@tensorrt_run_options
@fp8_option
@optimized_option
@cache_option
@click.option("--redux", help="Time a FLUX.1 Redux prior (folder, hub id or tiny-redux) in front of the model: a "
              "picture of bench's own through it (no prompt), its stages as rows of their own.")  # fmt: skip
@click.option("--redux-engines", type=click.Path(path_type=Path),
              help="The Redux prior's graphs (`export --redux`, onnxruntime) or engines (`build --redux`).")  # fmt: skip
def bench(
    model, base_model, backend, engines, dtype, device, height, width, steps, batch, warmup, repeats, json_path,
    low_vram, cuda_graphs, weight_streaming_budget, fp8, optimized, cache_text, redux, redux_engines,
) -> None:  # fmt: skip
    """Per-stage and end-to-end latency (median of repeats after warm-up) and peak GPU memory, any backend."""
    from fluxexport.commands.bench import BenchOptions, run_bench

    runner = BackendOptions(
        backend=backend, engines=engines, dtype=dtype, device=device, low_vram=low_vram, cuda_graphs=cuda_graphs,
        weight_streaming_budget=weight_streaming_budget, fp8=fp8, optimized=optimized,
    )  # fmt: skip
    options = BenchOptions(
        model=_model(model, base_model), runner=runner, height=height, width=width, steps=steps, batch=batch,
        warmup=warmup, repeats=repeats, cache=cache_text, json_path=json_path, redux=redux, redux_engines=redux_engines,
    )  # fmt: skip
    measured = run_bench(options, progress=step_progress, log=console.print)
    backend, result = measured.backend, measured.numbers
    rows = [[stage, f"{ms:.2f}"] for stage, ms in result["median_ms"].items()]
    title = (
        f"{backend} {result['device']} · {result['width']}×{result['height']} · {result['steps']} steps · batch {batch}"
    )
    console.print(table(title, ["stage", "median ms"], rows))
    console.print(f"transformer: computed {result['computed_steps']} of {result['steps']} steps ({result['cache']})")
    console.print(
        f"transformer: {result['transformer_tflop_per_step']:.4g} TFLOP per step, "
        f"{result['transformer_tflops']:.3g} TFLOP/s achieved"
    )
    if result["peak_gpu_memory_bytes"] is not None:
        console.print(f"peak GPU memory: {result['peak_gpu_memory_bytes'] / 2**30:.2f} GiB")
    if measured.json_path:
        click.echo(str(measured.json_path))


@main.command()
@model_options
@click.option("--engines", type=click.Path(path_type=Path), required=True,
              help="Exported graphs, a Black Forest Labs *-onnx folder, or built engines.")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path),
              help="Repository folder to write (default: engines/<model>/triton).")  # fmt: skip
@click.option("--instance-kind", type=click.Choice(INSTANCE_KINDS), default="KIND_CPU", show_default=True,
              help="Where python-backend models run (TensorRT plans always run on the GPU).")  # fmt: skip
@click.option("--pipeline-instances", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--request-lora", "request_loras", multiple=True, metavar="FILE",
              help="A LoRA clients may apply per request (input `lora` = its file stem); repeatable.")  # fmt: skip
@click.option("--gpus", "gpus", default="", metavar="0,1|N",
              help="GPUs to place instances on: indices, or a count (0..N-1); default every visible GPU.")  # fmt: skip
@fp8_option
@click.option("--redux", help="Also serve this FLUX.1 Redux prior (folder, hub id or tiny-redux): flux_pipeline "
              "takes redux_image… (variations, the prompt optional).")  # fmt: skip
@click.option("--redux-engines", type=click.Path(path_type=Path),
              help="The Redux prior's graphs (`export --redux`) or engines (`build --redux`).")  # fmt: skip
def triton(
    model, base_model, engines, out, instance_kind, pipeline_instances, request_loras, gpus, fp8, redux, redux_engines
) -> None:
    """Write a Triton model repository: the components plus a flux_pipeline model (text in, images out)."""
    from fluxexport.commands.serve import TritonOptions, write_triton_repository

    options = TritonOptions(
        engines=engines, model=_model(model, base_model), out=out, instance_kind=instance_kind,
        pipeline_instances=pipeline_instances, request_loras=request_loras, gpus=_parse_gpus(gpus), fp8=fp8,
        redux=redux, redux_engines=redux_engines,
    )  # fmt: skip
    result = write_triton_repository(options)
    console.print(f"repository for {result.model}: {', '.join(result.models)}")
    click.echo(str(result.folder))


def _parse_gpus(value: str) -> tuple[int, ...]:
    """`0,1` → (0, 1); `2` → (0, 1); empty → () (every visible GPU)."""
    value = value.strip()
    if not value:
        return ()
    try:
        numbers = [int(part) for part in value.split(",")]
    except ValueError:
        raise FluxExportError(f"--gpus {value}: give GPU indices (0,1) or a count (2)") from None
    if len(numbers) == 1 and "," not in value:
        if numbers[0] < 1:
            raise FluxExportError(f"--gpus {value}: a count must be at least 1")
        return tuple(range(numbers[0]))
    if min(numbers) < 0 or len(set(numbers)) != len(numbers):
        raise FluxExportError(f"--gpus {value}: indices must be distinct and ≥ 0")
    return tuple(sorted(numbers))


@main.command()
@model_options
@click.option("--engines", type=click.Path(path_type=Path), required=True, help="Folder of exported fp32 graphs.")
@click.option("--provider", type=click.Choice(list(PROVIDERS)), default="cpu", show_default=True,
              help="Where the graphs will run: CUDA-only fusions (GroupNorm, NhwcConv, packed QKV) need cuda.")  # fmt: skip
@click.option("--components", help="Comma-separated subset (default: every float32 graph).")
def optimize(model, base_model, engines, provider, components) -> None:
    """ONNX Runtime's transformer optimizer over exported graphs (mmdit/t5/clip/vae fusions), written to
    ENGINES/ort/ for run/bench/validate --backend onnxruntime; the portable graphs stay for TensorRT."""
    from fluxexport.commands.optimize import optimize_folder

    rows = []

    def done(result) -> None:
        fused = ", ".join(f"{count} {op}" for op, count in result.fusions.items()) or "none"
        rows.append([result.component, fused, f"{result.parity_rel_l2:.1e}", f"{result.seconds:.1f}"])

    with console.status(f"optimizing for ONNX Runtime ({provider}) …"):
        ort = optimize_folder(_model(model, base_model), engines, provider, component_list(components), done)
    console.print(table(f"{engines}/ort ({provider})", ["component", "fused ops", "rel-L2 vs portable", "s"], rows))
    click.echo(str(ort))


@main.command()
@click.option(
    "--repository",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    required=True,
    help="A repository written by fluxexport triton.",
)
@click.option("--out", type=click.Path(path_type=Path),
              help="Folder for the manifests (default: engines/<model>/k8s, the repository's model).")  # fmt: skip
@click.option(
    "--storage-uri", required=True, help="Where the repository is uploaded: s3://, gs://, as:// or pvc://CLAIM/PATH."
)
@click.option("--name", help="Kubernetes name (default: from the model's name).")
@click.option("--namespace", help="Kubernetes namespace (default: kubectl's).")
@click.option(
    "--image", help="Serving image; its tag's Triton release must ship the engines' TensorRT (default: pinned)."
)
@click.option("--image-tensorrt", metavar="VERSION", help="The image's TensorRT, for a tag naming no known release.")
@click.option("--gpus-per-replica", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option("--replicas", default="1:4", show_default=True, metavar="MIN:MAX")
@click.option("--target-queue-ms", type=click.FloatRange(min=1), default=2000.0, show_default=True,
              help="Average queue wait per request above which the autoscaler adds a replica.")  # fmt: skip
def deploy(repository, out, storage_uri, name, namespace, image, image_tensorrt, gpus_per_replica, replicas,
           target_queue_ms) -> None:  # fmt: skip
    """Write Kubernetes manifests serving a Triton repository: a KServe InferenceService, or a Deployment +
    Service + HorizontalPodAutoscaler on Triton's queue metrics."""
    from fluxexport.commands.serve import DeployOptions, write_manifests

    options = DeployOptions(
        repository=repository, storage_uri=storage_uri, out=out, name=name, namespace=namespace, image=image,
        image_tensorrt=image_tensorrt, gpus_per_replica=gpus_per_replica, replicas=replicas,
        target_queue_ms=target_queue_ms,
    )  # fmt: skip
    result = write_manifests(options)
    settings, folder = result.settings, result.folder
    console.print(
        f"{settings.name}: {settings.image} (Triton {settings.release}), {settings.gpus_per_replica} GPU(s) per "
        f"replica, {settings.min_replicas}..{settings.max_replicas} replicas, repository {settings.storage_uri}"
    )
    console.print(f"next: the commands in {folder / 'README.md'}")
    click.echo(str(folder))


@main.command()
@click.argument("repository", type=click.Path(path_type=Path), required=False)
@click.option("--tritonserver", "binary", help="tritonserver binary (default: $PATH, then nvidia-pytriton's).")
@click.option("--python-env", metavar="PREFIX",
              help="Environment that runs the python models (numpy<2, onnxruntime, fluxexport; default "
              "$FLUXEXPORT_TRITON_ENV, else the .venv-triton of fluxexport's own checkout, from any directory).")  # fmt: skip
@click.option("--openai-port", type=click.IntRange(1, 65535),
              help="Also serve OpenAI's images API on this port (/v1/images/generations, /v1/images/edits).")  # fmt: skip
@click.option("--openai-host", default="127.0.0.1", show_default=True,
              help="Address the OpenAI front listens on (0.0.0.0 in a container).")  # fmt: skip
@click.option("--triton-url", metavar="HOST:PORT",
              help="With --openai-port: forward to this running Triton's HTTP endpoint instead of starting one.")  # fmt: skip
@click.option("--served-model-name", metavar="NAME",
              help="The model id the OpenAI front serves (default: the repository's model).")  # fmt: skip
def serve(repository: Path | None, binary: str | None, python_env: str | None, openai_port: int | None,
          openai_host: str, triton_url: str | None, served_model_name: str | None) -> None:  # fmt: skip
    """Serve a model repository on 127.0.0.1 until Ctrl-C; with --openai-port, OpenAI's images API in front of
    it (or, with --triton-url, in front of a Triton already running)."""
    import contextlib
    import signal
    import threading

    from fluxexport.commands.serve import FrontOptions, open_front, open_server

    if triton_url and openai_port is None:
        raise FluxExportError("--triton-url is where the OpenAI front forwards: add --openai-port PORT")
    if repository is None and triton_url is None:
        raise FluxExportError("give REPOSITORY to serve (or --triton-url URL --openai-port PORT for the front alone)")
    server = None if triton_url else open_server(repository, binary, python_env)
    front = None
    if openai_port is not None:
        options = FrontOptions(openai_port, openai_host, triton_url, repository, served_model_name)
        front = open_front(options, server.http_url if server else None)
    stop = threading.Event()  # Ctrl-C / SIGTERM only set it: shutdown happens in one place, whenever they come
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with contextlib.ExitStack() as running:
        if server is not None:
            console.print(f"starting {server.binary} (log: {server.log}) …")
            running.enter_context(server)
            console.print(
                f"ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url} — Ctrl-C to stop"
            )
        if front is not None:
            running.enter_context(front)
            console.print(f"OpenAI images API: {front.url} (model {front.settings.model}, Triton "
                          f"{front.settings.triton_url}) — Ctrl-C to stop")  # fmt: skip
        while not stop.is_set() and (server is None or server.process.poll() is None) and (front is None or front.alive()):
            stop.wait(0.5)
        if stop.is_set():
            console.print("stopping …")
    if not stop.is_set() and server is not None and server.process.returncode is not None:
        raise FluxExportError(f"tritonserver exited with {server.process.returncode} (log: {server.log})")
    if not stop.is_set():
        raise FluxExportError("the OpenAI front stopped (see the messages above)")


if __name__ == "__main__":
    sys.exit(main())
