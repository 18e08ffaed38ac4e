"""Calibration: observe the transformer's Linear inputs along real denoising trajectories of our runtime."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fluxexport.errors import FluxExportError
from fluxexport.pytorch.block_streaming import BLOCK_LISTS, run_per_sample
from fluxexport.quantize.fp8 import FP8Linear, is_attention, observe_attention, quantize_attention

QUANTIZED_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")

# A built-in calibration set: varied subjects, styles, lengths and text-in-image, in the spirit of the
# 32-prompt sets the anchors calibrate on.
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon, earth in the sky",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "close-up portrait of an old fisherman with a weathered face, dramatic side light",
    "a bowl of ramen with a soft-boiled egg, steam rising, food photography",
    "an isometric illustration of a tiny futuristic city on a floating island",
    "a red fox sitting in fresh snow in a misty pine forest at dawn",
    "a neon sign that says 'OPEN 24 HOURS' above a rainy street at night",
    "a medieval castle on a hill, oil painting in the style of the old masters",
    "a macro photo of a dew drop on a green leaf reflecting the sky",
    "a cozy reading nook with a window seat, books and a sleeping cat",
    "an abstract composition of colorful geometric shapes on a white background",
    "a vintage travel poster for Mars with bold typography",
    "a herd of elephants crossing a river in the savanna, aerial view",
    "a robot chef cooking pancakes in a retro 1950s kitchen",
    "a detailed pencil sketch of a hummingbird feeding from a flower",
    "a snowy mountain range reflected in a still alpine lake",
    "a busy night market in Taipei, lanterns and food stalls, cinematic",
    "a glass teapot with blooming tea on a wooden table, soft morning light",
    "a cyberpunk samurai standing on a rooftop in the rain",
    "children flying kites on a windy beach, summer afternoon",
    "a still life of lemons and a blue ceramic jug, impressionist style",
    "a massive waterfall in a tropical jungle with rainbows in the spray",
    "a chalkboard with the equation E=mc^2 and a drawing of an atom",
    "a knitted wool toy dinosaur on a bookshelf",
    "a desert highway at golden hour with a vintage car, long shadows",
    "an underwater coral reef with a sea turtle and schools of fish",
    "a minimalist logo of a mountain and a sun, flat vector design",
    "a gothic cathedral interior with stained glass light beams",
    "a street musician playing violin in Paris, black and white photo",
    "a fantasy map of an archipelago with compass rose and sea monsters",
    "a steaming cup of coffee with latte art of a heart",
    "a giant tortoise wearing a tiny top hat in a botanical garden",
)


@dataclass(frozen=True)
class CalibrationSettings:
    prompts: tuple[str, ...] = CALIBRATION_PROMPTS
    steps: int | None = None  # default: the model's own
    height: int | None = None  # default: the model's default size
    width: int | None = None
    guidance_scale: float | None = None
    seed: int = 0


def kept_high_precision(source) -> tuple[str, ...]:
    """The transformer's modules outside the blocks, which keep the base dtype: the family's policy
    (`families/<f>/quantize.py`)."""
    return source.family.part("quantize").KEEP_HIGH_PRECISION


def quantizable_linears(transformer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the double and single blocks; the kept-high-precision layers are outside them."""
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(QUANTIZED_BLOCKS)
    }


def quantizable_attention(transformer: nn.Module) -> dict[str, nn.Module]:
    """Every attention module inside the double and single blocks (`quantize --fp8-attention`)."""
    return {
        name: module
        for name, module in transformer.named_modules()
        if name.startswith(QUANTIZED_BLOCKS) and is_attention(module)
    }


def read_prompts(path) -> tuple[str, ...]:
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as error:
        raise FluxExportError(f"cannot read calibration prompts {path}: {error.strerror}") from None
    prompts = tuple(line for line in lines if line and not line.startswith("#"))
    if not prompts:
        raise FluxExportError(f"{path} has no prompts: one prompt per line (--calib-prompts)")
    return prompts


def one_sample_at_a_time(component, spec):
    """A component callable run sample by sample (the feeds with the spec's batch axis sliced)."""
    batched = {tensor.name for tensor in spec.inputs if tensor.dims and tensor.dims[0] == "B"}

    def run(feeds):
        return run_per_sample(component, feeds, feeds["hidden_states"].shape[0], lambda key, _value: key in batched)

    return run


@dataclass(frozen=True)
class CalibrationInputs:
    """What the runtime's Euler loop takes for every calibration prompt at once: the noise latents, the sigmas,
    the conditional transformer inputs, the unconditional ones (true CFG) or None, and the guidance scale."""

    latents: torch.Tensor
    sigmas: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor] | None
    guidance_scale: float
    condition: torch.Tensor | None = None  # FLUX.1 Fill's, Canny/Depth's: beside each noise token's channels

    @property
    def runs(self) -> int:
        """Transformer runs per prompt: one per step, two under true CFG."""
        return (len(self.sigmas) - 1) * (1 if self.negative is None else 2)


def calibration_inputs(backend, source, settings: CalibrationSettings) -> CalibrationInputs:
    """The calibration prompts batched, from the family's runtime part (`families/<f>/runtime.py`) as a generation
    builds them: prompt i draws the noise of seed + i, as a generation of it alone would; FLUX.2 base models'
    negative prompt ("" by default) makes the unconditional branch of true CFG, which calibration sees as the
    runtime runs it."""
    from fluxexport.runtime.request import GenerationRequest, resolve_request, sample_conditions

    family = source.family.part("runtime")
    size = tuple(source.default_size if side is None else side for side in (settings.height, settings.width))
    request = GenerationRequest(
        list(settings.prompts), height=settings.height, width=settings.width, num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale, seed=settings.seed, **sample_conditions(source, *size),
    )  # fmt: skip
    resolved = resolve_request(source, request)
    prompts = family.encode_prompts(backend, source, resolved, 1)
    draws = [family.noise_tokens(source, resolved, 1, settings.seed + index) for index in range(len(resolved.prompts))]
    latents = torch.cat(draws).to(backend.device)
    sigmas = family.sigmas(source, resolved.steps, latents.shape[1]).to(backend.device)
    ids = family.image_ids(family.latent_grid(source, resolved)).to(backend.device)
    positive, negative = family.transformer_inputs(source, prompts, ids, resolved.guidance_scale)
    encoded = family.encode_references(backend, source, resolved, latents.shape[0])
    condition = encoded[0] if encoded is not None and encoded[1] is None else None  # Fill's, Control's (no tokens)
    return CalibrationInputs(latents, sigmas, positive, negative, resolved.guidance_scale, condition)


def trajectories(backend, source, settings: CalibrationSettings) -> tuple[int, Callable]:
    """(transformer runs per prompt, walk): `walk(transformer, on_step)` runs the runtime's own Euler loop over
    every calibration prompt at once. Text is encoded here, before any transformer run."""
    from fluxexport.runtime.pipeline import denoise

    inputs = calibration_inputs(backend, source, settings)

    def walk(transformer, on_step):
        denoise(
            transformer, inputs.latents, inputs.sigmas, inputs.conditioning, inputs.negative, inputs.guidance_scale,
            on_step=on_step, condition=inputs.condition,
        )  # fmt: skip

    return inputs.runs, walk


def abs_max(tensor: torch.Tensor) -> float:
    """max |x| without a tensor-sized temporary (`abs()` would copy a 1.4 GB weight of FLUX.2 [dev]'s single
    blocks while it is upcast to float32)."""
    low, high = torch.aminmax(tensor)
    return max(-low.float().item(), high.float().item())


@dataclass(frozen=True)
class Calibration:
    """amax of each quantizable Linear's input (over every step of every prompt, both branches of true CFG) and
    of its weight; `transformer_calls`: the single-sample transformer runs observed (0 when not recorded);
    `attention_amax`: with FP8 attention, amax of each block attention's query, key and value
    (`transformer_blocks.0.attn.q`, …), else empty."""

    input_amax: dict[str, float]
    weight_amax: dict[str, float]
    transformer_calls: int = 0
    attention_amax: dict[str, float] = field(default_factory=dict)


def calibrate(
    backend,
    source,
    settings: CalibrationSettings,
    on_progress: Callable[[int, int], None] | None = None,
    attention: bool = False,
) -> Calibration:
    """Walk every calibration prompt along our runtime's denoising trajectory and observe the block Linears.

    `backend` is a TorchBackend. All prompts advance together, one step at a time: with a backend that
    streams blocks (`TorchBackend(stream_blocks=True)`) each block is read once per transformer run and runs
    every prompt before the next is read; otherwise each prompt runs alone through the loaded transformer. Both
    see the same inputs, so they give the same scales. Every family walks the runtime's loop on the inputs its
    runtime part builds (`trajectories`); under FLUX.2's true CFG both transformer runs of a step are observed. `on_progress(done,
    total)` counts steps, or block passes when blocks stream. The text encoders are released once the prompts
    are encoded, before the transformer runs. `attention` observes the block attentions' query, key and value
    too (`quantize --fp8-attention`), on the same trajectories."""
    transformer = backend.module("transformer")
    linears = quantizable_linears(transformer)
    if not linears:
        raise FluxExportError(f"{source.name}'s transformer has no Linear layers in its blocks to quantize")
    input_amax: dict[str, float] = defaultdict(float)
    weight_amax: dict[str, float] = {}

    def observer(name: str):
        def hook(module, inputs):
            input_amax[name] = max(input_amax[name], abs_max(inputs[0].detach()))
            if name not in weight_amax:  # the weight is real here, also in a streamed block
                weight_amax[name] = abs_max(module.weight.detach())

        return hook

    handles = [module.register_forward_pre_hook(observer(name)) for name, module in linears.items()]
    attention_amax: dict[str, float] = {}
    stops = [
        observe_attention(module, name, attention_amax) for name, module in attention_modules(transformer, attention)
    ]
    lists = BLOCK_LISTS["transformer"] if backend.stream_blocks else ()
    blocks = [block for name in lists for block in transformer.get_submodule(name)]
    steps, calls = [0], [0]
    try:
        runs, walk = trajectories(backend, source, settings)
        backend.release(*source.family.text_components)  # encoded once: their memory goes to the transformer
        total = runs * max(len(blocks), 1)
        if blocks and on_progress:

            def block_done(*_):
                steps[0] += 1
                on_progress(steps[0], total)

            handles += [block.register_forward_hook(block_done) for block in blocks]
        component = backend.component("transformer")
        if not backend.stream_blocks:
            component = one_sample_at_a_time(component, backend.specs["transformer"])

        def counted(feeds):
            calls[0] += feeds["hidden_states"].shape[0]
            return component(feeds)

        walk(counted, None if blocks else on_progress)
    finally:
        for handle in handles:
            handle.remove()
        for stop in stops:
            stop()
    return Calibration(dict(input_amax), weight_amax, calls[0], attention_amax)


def attention_modules(transformer: nn.Module, attention: bool) -> list[tuple[str, nn.Module]]:
    """The block attentions to observe or quantize (none unless `attention`), refused when there are none."""
    if not attention:
        return []
    modules = quantizable_attention(transformer)
    if not modules:
        raise FluxExportError("the transformer has no attention modules in its blocks: drop --fp8-attention")
    return list(modules.items())


def replace_linears(
    transformer: nn.Module, amax: dict[str, float], weight_amax: dict[str, float] | None, quantized: Callable
) -> None:
    """Replace each calibrated block Linear by `quantized(linear, input_amax, weight_amax)`, in place (FP8 or NVFP4);
    a Linear without calibration data is refused."""
    linears = quantizable_linears(transformer)
    missing = sorted(set(linears) - set(amax))
    if missing:
        raise FluxExportError(f"no calibration data for {missing[0]} (and {len(missing) - 1} more): calibrate again")
    for name, linear in linears.items():
        parent_name, _, child = name.rpartition(".")
        weight = None if weight_amax is None else weight_amax[name]
        setattr(transformer.get_submodule(parent_name), child, quantized(linear, amax[name], weight))


def fake_quantize(
    transformer: nn.Module, amax: dict[str, float], weight_amax: dict[str, float] | None = None,
    attention_amax: dict[str, float] | None = None,
) -> nn.Module:  # fmt: skip
    """Replace each calibrated Linear by an FP8Linear, in place; returns the transformer.

    Weight scales come from the weights themselves, or from `weight_amax` (amax in the weights' dtype) when
    the transformer's parameters are not real (the streaming export traces it on fake ones). With
    `attention_amax` (non-empty), each block attention computes in FP8 too (`quantize_attention`)."""
    replace_linears(transformer, amax, weight_amax, FP8Linear)
    for name, module in attention_modules(transformer, bool(attention_amax)):
        if f"{name}.q" not in attention_amax:
            raise FluxExportError(f"no FP8 attention calibration for {name}: calibrate again with --fp8-attention")
        quantize_attention(module, name, attention_amax)
    return transformer
