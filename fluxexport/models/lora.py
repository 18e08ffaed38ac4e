"""LoRAs for FLUX.1 and FLUX.2, read in every format people publish, merged into the weights as they are read.

Formats are converted by diffusers' own `FluxPipeline.lora_state_dict` (diffusers/PEFT `lora_A`/`lora_B`,
kohya `lora_unet_…`/`lora_te1_…` with `.alpha`, black-forest-labs/XLabs `…processor…`) and, for FLUX.2,
`Flux2KleinPipeline.lora_state_dict` (diffusers/PEFT with the `lora_alpha` of its metadata, kohya, ai-toolkit's
`diffusion_model.…`): no key tables here. FLUX.2 LoRAs adapt the transformer only.
The merged weight is exactly what diffusers' `fuse_lora(lora_scale=s)` computes: W + s · (alpha / rank) · B·A
in float32 (alpha = rank, i.e. 1, when the file has no alphas; kohya's are already folded in by the
conversion), then cast to the checkpoint's dtype. Safetensors only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxexport.errors import FluxExportError, RequestError
from fluxexport.families import FLUX1, Family, family_named

# CLIP's `text_model.` level is gone in transformers ≥ 5 (each family's LoRA key prefixes are `Family.lora_prefixes`)
DROPPED = {"clip": "text_model."}


@dataclass(frozen=True)
class LoraFile:
    """One `--lora FILE[:SCALE]`: the file, its strength, and its content hash (for manifests)."""

    path: Path
    scale: float
    sha256: str

    def record(self) -> dict:
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale}


# A stated cap on a LoRA's scale (LoRAs are made for about 0..1; a scale of 1e10 turns the weights it touches, and
# the image, into NaN); negative scales, which push away from the LoRA, within the same bound
MAX_LORA_SCALE = 10.0


def parse_lora(value: str) -> LoraFile:
    """`FILE` or `FILE:SCALE` (scale 1.0 by default) → a LoraFile, refused in one line if unreadable."""
    path_text, _, scale_text = value.rpartition(":")
    try:
        path, scale = (Path(path_text), float(scale_text)) if path_text else (Path(value), 1.0)
    except ValueError:
        path, scale = Path(value), 1.0
    if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:  # merged, it makes the weights it touches NaN
        raise RequestError(
            "lora", f"{{option}} {value}: the scale must be a number in -{MAX_LORA_SCALE:g}..{MAX_LORA_SCALE:g}",
            pointer=False,
        )  # fmt: skip
    if path.suffix != ".safetensors":
        raise FluxExportError(f"--lora {value}: only .safetensors LoRA files are read (FILE or FILE:SCALE)")
    if not path.is_file():
        raise FluxExportError(f"--lora {value}: {path} does not exist")
    _check_safetensors(path, value)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return LoraFile(path, scale, digest.hexdigest())


def _check_safetensors(path: Path, value: str) -> None:
    """Refuse, before any model loads, a file that is no safetensors file (its header is read, not its tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types for every kind of bad file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RequestError("lora", f"{{option}} {value}: not a safetensors file ({reason})", pointer=False) from None


@dataclass(frozen=True)
class LoraLayer:
    """One adapted Linear of one LoRA: the down (A) and up (B) matrices, optional up bias, and its factor."""

    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    bias: torch.Tensor | None
    factor: float  # user scale · alpha / rank


def _alphas_from_metadata(state: dict[str, torch.Tensor], metadata: dict[str, object] | None) -> dict[str, float]:
    """Each layer's alpha from the PEFT metadata diffusers saves with a LoRA (`lora_alpha`, `alpha_pattern`)."""
    import re

    alphas: dict[str, float] = {}
    metadata = {key.removeprefix("transformer."): value for key, value in (metadata or {}).items()}
    if metadata.get("lora_alpha") is not None:
        patterns: dict = metadata.get("alpha_pattern") or {}  # type: ignore[assignment]
        for key in state:
            if key.endswith(".lora_A.weight"):
                base = key.removesuffix(".lora_A.weight")
                name = base.removeprefix("transformer.")
                alpha = next((a for pattern, a in patterns.items() if re.search(rf"(^|\.){re.escape(pattern)}$", name)),
                             metadata["lora_alpha"])  # fmt: skip
                alphas[f"{base}.alpha"] = float(alpha)  # type: ignore[arg-type]
    return alphas


def _converted(lora: LoraFile, family: Family) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """diffusers' conversion of the file to its own naming by the family's pipeline (`Family.lora_pipeline`), and
    the per-module alphas it keeps: the ones its conversion returns, or (`lora_alpha_in_metadata`) those of the PEFT
    metadata; kohya's and ai-toolkit's conversions fold their alphas in."""
    import diffusers
    from safetensors import SafetensorError

    pipeline = getattr(diffusers, family.lora_pipeline)
    try:
        if family.lora_alpha_in_metadata:
            state, metadata = pipeline.lora_state_dict(str(lora.path), return_lora_metadata=True)
            alphas = _alphas_from_metadata(state, metadata)
        else:
            state, returned = pipeline.lora_state_dict(str(lora.path), return_alphas=True)
            alphas = {key: float(value) for key, value in (returned or {}).items()}
    except (SafetensorError, OSError) as error:
        raise FluxExportError(f"cannot read LoRA {lora.path}: {error}") from None
    except (KeyError, ValueError, IndexError) as error:
        raise FluxExportError(f"{lora.path} is not a {family.title} LoRA diffusers can convert ({error})") from None
    # text-encoder keys may come out in diffusers' older naming (`…to_q_lora.down`, kohya's `lora_te1_…`):
    # diffusers' own converters bring them to PEFT's, as its text-encoder loader does
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    text = {key.removeprefix("text_encoder."): value for key, value in state.items() if key.startswith("text_encoder.")}
    if text:
        state = {key: value for key, value in state.items() if not key.startswith("text_encoder.")}
        state |= {
            f"text_encoder.{key}": v
            for key, v in convert_state_dict_to_peft(convert_state_dict_to_diffusers(text)).items()
        }
    return state, alphas


def read_lora(lora: LoraFile, family: str = FLUX1.name) -> dict[str, dict[str, LoraLayer]]:
    """module ("transformer", "clip") → Linear name in our model → its update, for one LoRA file of a model of
    `family` (its name: "flux1", "flux2"; the modules its LoRAs adapt are the family's `lora_prefixes`)."""
    return read_lora_file(lora, family)[0]


def _replaced(state: dict[str, torch.Tensor], family: Family) -> dict[str, dict[str, torch.Tensor]]:
    """module → parameter → the tensor a control LoRA replaces it with (BFL's Canny/Depth LoRAs carry the
    attention's norm scales, which diffusers' `load_lora_weights` loads as they are, at any LoRA scale): the keys
    its pipeline names (`_control_lora_supported_norm_keys`)."""
    import diffusers

    norms = getattr(getattr(diffusers, family.lora_pipeline), "_control_lora_supported_norm_keys", ())
    replaced: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        prefix = next((p for p in family.lora_prefixes if key.startswith(p)), None)
        if prefix is None or "lora_" in key or not any(f".{norm}." in key for norm in norms):
            continue
        replaced.setdefault(family.lora_prefixes[prefix], {})[key.removeprefix(prefix)] = value.float()
    return replaced


def read_lora_file(
    lora: LoraFile, family: str = FLUX1.name
) -> tuple[dict[str, dict[str, LoraLayer]], dict[str, dict[str, torch.Tensor]]]:
    """`read_lora`'s layers, and module → parameter → the tensor the file replaces it with (`_replaced`)."""
    known = family_named(family)
    state, alphas = _converted(lora, known)
    layers: dict[str, dict[str, LoraLayer]] = {}
    downs = [key for key in state if key.endswith(".lora_A.weight")]
    if not downs:
        first = next(iter(state), "no tensors")
        raise FluxExportError(f"{lora.path} is not a LoRA: no lora_A/lora_down weights (first key: {first})")
    prefixes = known.lora_prefixes
    dora = {key.partition(".lora_magnitude_vector")[0] for key in state if ".lora_magnitude_vector" in key}
    for key in downs:
        base = key.removesuffix(".lora_A.weight")
        prefix = next((p for p in prefixes if base.startswith(p)), None)
        if prefix is None:
            raise FluxExportError(f"{lora.path}: {key} {_adapts_none(known)}")
        up = state.get(f"{base}.lora_B.weight")
        if up is None:
            raise FluxExportError(f"{lora.path}: {key} has no lora_B/lora_up partner")
        if base in dora:
            raise FluxExportError(f"{lora.path}: {base} is a DoRA layer, which cannot be merged as W + B·A")
        module = prefixes[prefix]
        name = base.removeprefix(prefix).removeprefix(DROPPED.get(module, ""))
        down = state[key].float()
        alpha = alphas.get(f"{base}.alpha", alphas.get(f"{base.removeprefix(prefix)}.alpha"))
        factor = lora.scale * ((alpha / down.shape[0]) if alpha is not None else 1.0)
        bias = state.get(f"{base}.lora_B.bias")
        layers.setdefault(module, {})[name] = LoraLayer(
            down, up.float(), None if bias is None else bias.float(), factor
        )
    return layers, _replaced(state, known)


def _adapts_none(family: Family) -> str:
    """How a key that adapts none of the family's LoRA modules is refused."""
    modules = list(dict.fromkeys(family.lora_prefixes.values()))
    if len(modules) == 1:
        return f"does not adapt the {modules[0]} ({family.title} LoRAs adapt only it)"
    return f"adapts none of the modules {family.title} LoRAs adapt ({', '.join(modules)})"


class LoraSet:
    """The LoRAs of a model source, checked against the model's Linears, as per-tensor weight deltas."""

    def __init__(self, loras: Iterable[LoraFile], family: str = FLUX1.name):
        self.loras = tuple(loras)
        self.family = family
        self.layers: dict[str, dict[str, list[LoraLayer]]] = {}
        self.replaced: dict[str, dict[str, torch.Tensor]] = {}  # module → parameter → its new value (a later wins)
        self.widest: dict[str, LoraFile] = {}  # a widenable layer → the (first) LoRA with its widest input
        for lora in self.loras:
            layers_of, replaced = read_lora_file(lora, family)
            for module, layers in layers_of.items():
                for name, layer in layers.items():
                    known = self.layers.setdefault(module, {}).setdefault(name, [])
                    wider = not known or layer.down.shape[1] > max(other.down.shape[1] for other in known)
                    if wider and module == "transformer" and name in family_named(family).lora_widened_inputs:
                        self.widest[name] = lora
                    known.append(layer)
            for module, tensors in replaced.items():
                self.replaced.setdefault(module, {}).update(tensors)

    def input_width(self, module: str, name: str) -> int:
        """The widest input the LoRAs give layer `name` of `module`."""
        return max(layer.down.shape[1] for layer in self.layers[module][name])

    def widened_config(self, transformer: dict) -> dict[str, int]:
        """The transformer config keys (the family's `lora_widened_inputs`) the LoRAs widen → their new width,
        with the key that follows each kept at the base width; empty when none is wider than `transformer`."""
        widths: dict[str, int] = {}
        for name, (key, follower) in family_named(self.family).lora_widened_inputs.items():
            if name in self.layers.get("transformer", {}) and self.input_width("transformer", name) > transformer[key]:
                widths[key] = self.input_width("transformer", name)
                widths[follower] = int(transformer[follower] or transformer[key])
        return widths

    def check(self, module: str, shapes: dict[str, torch.Size]) -> None:
        """Refuse (one line, first offending key) a LoRA naming a Linear the model lacks or of another shape;
        `shapes` maps the model's parameter names to their shapes. A layer of the family's `lora_widened_inputs`
        may take a wider input (BFL's Canny/Depth LoRAs)."""
        for name, tensor in self.replaced.get(module, {}).items():
            if shapes.get(name) != tensor.shape:
                raise FluxExportError(
                    f"a LoRA replaces {module} parameter {name!r} ({tuple(tensor.shape)}), which this model does not "
                    "have in that shape: it was made for another model"
                )
        wider = set(family_named(self.family).lora_widened_inputs) if module == "transformer" else set()
        for name, layers in self.layers.get(module, {}).items():
            weight = shapes.get(f"{name}.weight")
            if weight is None or len(weight) != 2:
                raise FluxExportError(
                    f"a LoRA adapts {module} layer {name!r}, which this model does not have as a Linear: "
                    "it was made for another model"
                )
            for layer in layers:
                widened = name in wider and layer.down.shape[1] > weight[1]  # zero-padded, as diffusers does
                if (layer.up.shape[0], weight[1] if widened else layer.down.shape[1]) != tuple(
                    weight
                ) or layer.up.shape[1] != layer.down.shape[0]:
                    raise FluxExportError(
                        f"a LoRA's {module} layer {name!r} is {layer.up.shape[0]}×{layer.down.shape[1]} "
                        f"(rank {layer.down.shape[0]}), the model's weight is {weight[0]}×{weight[1]}: "
                        "it was made for another model"
                    )

    def touches(self, module: str, parameter: str) -> bool:
        """Whether a LoRA changes this parameter (without computing the change)."""
        if parameter in self.replaced.get(module, {}):
            return True
        owner, _, kind = parameter.rpartition(".")
        layers = self.layers.get(module, {}).get(owner, [])
        return bool(layers) and (
            kind == "weight" or (kind == "bias" and any(layer.bias is not None for layer in layers))
        )

    def delta(self, module: str, parameter: str) -> torch.Tensor | None:
        """The float32 change of one parameter (`….weight` or `….bias`) summed over the LoRAs, or None; a weight's
        narrower updates zero-padded to the widest input (diffusers' `_maybe_expand_lora_state_dict`)."""
        owner, _, kind = parameter.rpartition(".")
        layers = self.layers.get(module, {}).get(owner)
        if not layers:
            return None
        if kind == "weight":
            width = self.input_width(module, owner)
            return sum((_padded(layer.factor * (layer.up @ layer.down), width) for layer in layers), torch.zeros(()))
        if kind == "bias" and any(layer.bias is not None for layer in layers):
            return sum((layer.factor * layer.bias for layer in layers if layer.bias is not None), torch.zeros(()))
        return None

    def merged(self, module: str, parameter: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (a checkpoint parameter) with the LoRAs merged, in float32, back in its own dtype: a widened
        weight zero-padded first, a replaced one (a control LoRA's norm scale) the LoRA's own."""
        replaced = self.replaced.get(module, {}).get(parameter)
        if replaced is not None:
            return replaced.to(tensor.dtype)
        change = self.delta(module, parameter)
        if change is None:
            return tensor
        base = tensor.float()
        if change.dim() == 2 and change.shape[1] > base.shape[1]:
            base = _padded(base, change.shape[1])
        return (base + change).to(tensor.dtype)

    def widen(self, module: str, model: torch.nn.Module) -> None:
        """Give `model`'s layers the LoRAs widen (the family's `lora_widened_inputs`) their wider input in place:
        zero weights for the new features, the config's width key updated, as diffusers' `load_lora_weights`
        leaves the model (`_maybe_expand_transformer_param_shape_or_error_`); works on meta modules too."""
        if module != "transformer":
            return
        for name, (key, follower) in family_named(self.family).lora_widened_inputs.items():
            linear = model.get_submodule(name) if name in self.layers.get(module, {}) else None
            width = self.input_width(module, name) if linear is not None else 0
            if linear is None or width <= linear.in_features:
                continue
            wider = torch.nn.Linear(width, linear.out_features, bias=linear.bias is not None, device="meta")
            weight = _padded(linear.weight.detach(), width)  # meta in, meta out
            wider.weight = torch.nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
            wider.bias = linear.bias
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, wider)
            following = model.config[follower] or model.config[key]
            model.register_to_config(**{key: width, follower: following})

    def merge_into(self, module: str, model: torch.nn.Module) -> None:
        """Merge into a loaded module in place (the PyTorch backend's and in-memory export's path)."""
        shapes = {name: p.shape for name, p in model.named_parameters()}
        self.check(module, shapes)
        self.widen(module, model)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if self.touches(module, name):
                    parameter.copy_(self.merged(module, name, parameter.detach()))

    def refuse_widening(self, graph: str, transformer: dict) -> None:
        """Refuse (one line) to swap into `graph` (a graph or engines exported at the base model's width) a LoRA
        that widens the transformer's input beyond `transformer` (the base model's config): such a LoRA makes
        another model (FLUX.1-dev + a Canny/Depth LoRA is a control model), merged at export only."""
        widened = self.widened_config(transformer)
        for name, (key, _) in family_named(self.family).lora_widened_inputs.items():
            if key in widened:
                raise self.widening_error(name, graph)

    def widening_error(self, name: str, graph: str) -> FluxExportError:
        """The one-line refusal of swapping the LoRA that widens transformer layer `name` into `graph`."""
        lora = self.widest[name]
        return FluxExportError(
            f"LoRA {lora.path.name} widens the transformer's {name} to {self.input_width('transformer', name)} "
            f"input features (a Canny/Depth LoRA), which {graph} (exported at the base model's width) cannot swap "
            f"in: export with it merged (fluxexport export --lora {lora.path.name})"
        )


def _padded(weight: torch.Tensor, width: int) -> torch.Tensor:
    """`weight` [out, in] with zero columns up to `width` inputs."""
    return torch.nn.functional.pad(weight, (0, width - weight.shape[1])) if weight.shape[1] < width else weight


def widened_configs(source) -> dict[str, dict]:
    """`source`'s configs (a ModelSource with LoRAs) as its LoRAs leave the model (`ModelSource.merged_configs`):
    a LoRA that widens the transformer's input (the family's `lora_widened_inputs`) widens the transformer config
    and makes the pipeline the family's widened one (FLUX.1-dev + BFL's Canny/Depth LoRA: FluxControlPipeline, as
    diffusers runs it); refused in one line for a pipeline the family widens none of, or a width that pipeline
    does not take."""
    import dataclasses

    base = source.with_loras(())
    widths = source.lora_set.widened_config(base.transformer)
    if not widths:
        return source.configs
    family, lora = source.family, next(iter(source.lora_set.widest.values()))
    pipeline = family.lora_widened_pipelines.get(base.pipeline_class)
    widening = f"LoRA {lora.path.name} widens the transformer's input to {max(widths.values())} features"
    if pipeline is None:
        takers = " or ".join(family.lora_widened_pipelines) or "no"
        raise FluxExportError(
            f"{widening} (a Canny/Depth LoRA, for {takers} models) but {source.name} is a {base.pipeline_class}: "
            f"pass it with a {takers} model or drop --lora {lora.path.name}"
        )
    configs = dict(source.configs)
    configs["model_index"] = {**configs["model_index"], "_class_name": pipeline}
    configs["transformer"] = {**configs["transformer"], **widths}
    try:
        family.part("models").check_widths(dataclasses.replace(base, configs=configs))
    except FluxExportError as error:
        reason = str(error).partition(": ")[2].partition(": the parts")[0]
        raise FluxExportError(f"{widening}, which a {pipeline} does not take ({reason}): it was made for another "
                              "model") from None  # fmt: skip
    return configs
