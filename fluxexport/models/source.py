"""What `--model` names: a tiny variant, a diffusers folder, a hub id, or a BFL single-file transformer.

Everything here reads configs and tokenizers only; weights are loaded by the backends.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxexport.errors import FluxExportError
from fluxexport.families import FAMILIES, Family, detect_family
from fluxexport.families.family import KONTEXT_REFERENCE
from fluxexport.models.redux import REDUX_PIPELINE
from fluxexport.models.tiny import TINY_MARKER, TINY_PRIORS, TINY_VARIANTS, materialise_tiny


@dataclass(frozen=True)
class ModelSource:
    """A resolved FLUX checkpoint: a diffusers folder plus, optionally, a single-file transformer."""

    name: str
    root: Path
    transformer_file: Path | None = None
    configs: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)
    loras: tuple = ()  # LoraFile, merged into the weights wherever they are read (models/lora.py)
    # FLUX.2: the text encoder's hidden-state layers the user chose (--text-encoder-layers), else the pipeline's
    text_layers: tuple[int, ...] | None = None

    def with_loras(self, loras) -> ModelSource:
        """This checkpoint with `loras` (LoraFile) merged into it; checked against the model when read."""
        return dataclasses.replace(self, loras=tuple(loras))

    @functools.cached_property
    def lora_set(self):
        """The LoRAs read once (a LoraSet), or None without any."""
        from fluxexport.models.lora import LoraSet

        return LoraSet(self.loras, self.family.name) if self.loras else None

    @functools.cached_property
    def merged_configs(self) -> dict[str, dict[str, Any]]:
        """The configs as the LoRAs leave the model: those of the folder, except where a LoRA widens the
        transformer's input (FLUX.1-dev + BFL's Canny/Depth LoRA runs as FluxControlPipeline: `lora.widened_configs`)."""
        from fluxexport.models.lora import widened_configs

        return self.configs if self.lora_set is None else widened_configs(self)

    def with_text_encoder_layers(self, layers: tuple[int, ...] | None) -> ModelSource:
        """This checkpoint read at other text-encoder layers (a fine-tune's `text_encoder_out_layers`)."""
        if layers is None:
            return self
        if not self.family.takes_text_encoder_layers:
            takers = " and ".join(family.title for family in FAMILIES if family.takes_text_encoder_layers)
            raise FluxExportError(
                f"--text-encoder-layers is for {takers} models; {self.name} is {self.family.title}: leave it out"
            )
        depth = int(self.language["num_hidden_layers"])
        if not layers or any(not 0 <= layer <= depth for layer in layers):
            raise FluxExportError(
                f"--text-encoder-layers {','.join(map(str, layers))} does not fit {self.name}'s text encoder of "
                f"{depth} layers: pass layers between 0 and {depth}"
            )
        width, joint = int(self.language["hidden_size"]), int(self.transformer["joint_attention_dim"])
        if len(layers) * width != joint:  # the stacked layers make the transformer's joint width
            raise FluxExportError(
                f"--text-encoder-layers {','.join(map(str, layers))} stacks {len(layers)} layers of {width} but "
                f"{self.name}'s transformer takes {joint}: pass {joint // width} layers"
            )
        return dataclasses.replace(self, text_layers=tuple(layers))

    @functools.cached_property
    def library(self) -> dict[str, dict[str, Any]]:
        """Every config as its defining library reads it: the file's keys completed with the class's own
        defaults (`models.configs`); `language` is FLUX.2's language-model config."""
        from fluxexport.models.configs import library_configs

        return library_configs(self.merged_configs, self.family.pipelines)

    @functools.cached_property
    def pipeline_type(self) -> type:
        """The diffusers pipeline class this folder runs as."""
        from fluxexport.models.configs import pipeline_class

        return pipeline_class(self.merged_configs["model_index"], self.family.pipelines)

    def component_class(self, part: str) -> type:
        """The library class diffusers loads `part` ("text_encoder", "vae", …) with."""
        from fluxexport.models.configs import component_class

        return component_class(self.merged_configs["model_index"], self.pipeline_type, part)

    def module_class(self, module: str) -> type:
        """The library class `module` ("clip", "transformer", …) loads with: its family's (`library_classes`), else
        the one model_index.json (or the pipeline) names for its subfolder (FLUX.2's text encoder)."""
        named = self.family.library_classes.get(module)
        if named is None:
            return self.component_class(self.subfolders[module])
        library, _, name = named.rpartition(".")
        return getattr(importlib.import_module(library), name)

    @property
    def pipeline_class(self) -> str:
        return self.pipeline_type.__name__

    @property
    def family(self) -> Family:
        return detect_family(self.configs["model_index"], self.configs.get("transformer"))

    @property
    def components(self) -> tuple[str, ...]:
        """The components this family exports (FLUX.1: clip, t5, …; FLUX.2: text_encoder, …)."""
        return self.family.components

    @property
    def subfolders(self) -> dict[str, str]:
        return self.family.subfolders

    @property
    def is_distilled(self) -> bool:
        """FLUX.2: a step-distilled model runs without true CFG (model_index.json's `is_distilled`)."""
        index = self.library["model_index"]  # a pipeline without the argument (Flux2Pipeline) is not step-distilled
        return "is_distilled" in index and bool(index["is_distilled"])

    @property
    def text_encoder(self) -> dict[str, Any]:
        """FLUX.2's text encoder config (a causal LM read at intermediate layers)."""
        return self.library["text_encoder"]

    @property
    def language(self) -> dict[str, Any]:
        """FLUX.2's language-model config (Mistral3's nested `text_config`; Qwen3's own)."""
        return self.library["language"]

    @property
    def text_encoder_layers(self) -> tuple[int, ...]:
        """FLUX.2: the hidden-state layers stacked into the prompt embedding: the user's (--text-encoder-layers),
        a tiny model's marker's, else the family's default (FLUX.2: the pipeline's `text_encoder_out_layers`;
        FLUX.1, which reads its encoders' last states: none)."""
        if self.text_layers is not None:
            return self.text_layers
        if self.is_tiny and self.tiny_marker.get("text_encoder_layers"):
            return tuple(self.tiny_marker["text_encoder_layers"])
        return self.family.part("models").default_text_encoder_layers(self)

    @property
    def tiny_marker(self) -> dict[str, Any]:
        """A tiny model's marker (variant, default size, …); empty for real checkpoints."""
        return json.loads((self.root / TINY_MARKER).read_text()) if self.is_tiny else {}

    @property
    def reference_mode(self) -> str:
        """How its pipeline takes reference images (`families.family`: none, Kontext's one, a budget of several)."""
        return self.family.reference_mode(self.pipeline_class)

    @property
    def is_kontext(self) -> bool:
        """Its pipeline takes Kontext's one reference image (at a preferred size)."""
        return self.reference_mode == KONTEXT_REFERENCE

    @property
    def transformer(self) -> dict[str, Any]:
        return self.library["transformer"]

    @property
    def vae(self) -> dict[str, Any]:
        return self.library["vae"]

    @property
    def scheduler(self) -> dict[str, Any]:
        return self.library["scheduler"]

    @property
    def clip(self) -> dict[str, Any]:
        return self.library["text_encoder"]

    @property
    def t5(self) -> dict[str, Any]:
        return self.library["text_encoder_2"]

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer["guidance_embeds"])

    @property
    def latent_channels(self) -> int:
        return int(self.transformer["in_channels"]) // 4

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @functools.cached_property
    def quantized_layout(self) -> str | None:
        """The layout of a quantized single-file transformer (`models/quantized_checkpoint.py`: fp8r, fp8), None
        for an unquantized one."""
        from fluxexport.models.quantized_checkpoint import layout_of, read_header, refuse_quantized_folder

        if self.transformer_file is None:
            refuse_quantized_folder(self.root / self.subfolders["transformer"])
            return None
        return layout_of(read_header(self.transformer_file))

    @property
    def is_tiny(self) -> bool:
        return (self.root / TINY_MARKER).is_file()

    @property
    def default_size(self) -> int:
        """1024 px for real checkpoints; a small size for tiny ones (their marker says which)."""
        if self.is_tiny:
            return int(self.tiny_marker["default_size"])
        return 1024

    @property
    def default_steps(self) -> int:
        """4 for step-distilled models (FLUX.1 schnell, FLUX.2 [klein] distilled: their model cards' count; the
        family says which are), else the pipeline's own default (28 FLUX.1, 50 FLUX.2)."""
        from fluxexport.models.configs import call_default

        distilled = self.family.part("models").is_step_distilled(self)
        return 4 if distilled else int(call_default(self.pipeline_type, "num_inference_steps"))

    @property
    def default_max_sequence_length(self) -> int:
        """FLUX.1 schnell: 256 (BFL's T5 length for it); otherwise the pipeline's default (512)."""
        return self.family.part("models").default_max_sequence_length(self)

    @property
    def default_guidance(self) -> float:
        """The pipeline's own default (FLUX.1 3.5, FLUX.2 4.0)."""
        from fluxexport.models.configs import call_default

        return float(call_default(self.pipeline_type, "guidance_scale"))

    @property
    def uses_true_cfg(self) -> bool:
        """FLUX.2 base models run the transformer twice a step (a negative prompt); distilled ones and FLUX.1 once."""
        return self.family.part("models").uses_true_cfg(self)

    def fingerprint(self) -> str:
        """A short hash of the configs and weight file sizes: identifies the checkpoint in manifests."""
        digest = hashlib.sha256(json.dumps(self.configs, sort_keys=True).encode())
        files = sorted(self.root.rglob("*.safetensors"))
        if self.transformer_file is not None:
            files.append(self.transformer_file)
        for path in files:
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
        for lora in self.loras:  # a merged model is another model: its graphs and scales are its own
            digest.update(f"lora:{lora.sha256}:{lora.scale!r}".encode())
        if self.text_layers is not None:  # so is one read at other text-encoder layers
            digest.update(f"text_encoder_layers:{self.text_layers}".encode())
        return digest.hexdigest()[:16]

    @functools.cached_property
    def tokenizers(self):
        """FLUX.1: (CLIP tokenizer, T5 tokenizer); FLUX.2: (its LM's tokenizer,); loaded once from the folder."""
        return self.family.part("models").load_tokenizers(self)


def processor_chat_template(folder: Path) -> str:
    """The chat template a processor folder (FLUX.2 [dev]'s PixtralProcessor) keeps beside its tokenizer:
    `chat_template.jinja`, `chat_template.json` or `processor_config.json`; a one-line refusal if none has one."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json"):
        if (folder / name).is_file() and "chat_template" in (config := _read_json(folder / name)):
            return config["chat_template"]
    raise FluxExportError(
        f"{folder} has no chat template (FLUX.2 reads prompts through one): re-download the model's tokenizer"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FluxExportError(f"{path} is not valid JSON ({error.msg}): re-download or re-export the model") from None


def load_folder(root: Path, name: str | None = None, transformer_file: Path | None = None) -> ModelSource:
    """Read a diffusers FLUX folder's configs, refusing one that lacks a part."""
    root = Path(root)
    if not root.is_dir():
        raise FluxExportError(
            f"model folder {root} does not exist: pass a diffusers FLUX folder, a hub id or a tiny variant"
        )
    if not (root / "model_index.json").is_file():
        raise FluxExportError(f"{root} has no model_index.json: it is not a diffusers pipeline folder")
    configs: dict[str, dict[str, Any]] = {"model_index": _read_json(root / "model_index.json")}
    if configs["model_index"].get("_class_name") == REDUX_PIPELINE:
        refuse_prior(name or str(root))
    transformer_config = root / "transformer" / "config.json"
    family = detect_family(
        configs["model_index"], _read_json(transformer_config) if transformer_config.is_file() else None
    )
    if transformer_file is not None:  # its header only: which family its keys are
        from fluxexport.models.single_file import check_base_family

        check_base_family(Path(transformer_file), family, root)
    missing = [part for part in family.required_parts if not (root / part).is_dir()]
    if transformer_file is not None and "transformer" in missing:
        missing.remove("transformer")
    if missing:
        raise FluxExportError(f"{family.title} model folder {root} is incomplete: missing {', '.join(missing)}")
    for part, relative in family.config_files.items():
        path = root / relative
        if not path.is_file():
            raise FluxExportError(f"{family.title} model folder {root} is incomplete: missing {relative}")
        configs[part] = _read_json(path)
    source = ModelSource(name=name or root.name, root=root, transformer_file=transformer_file, configs=configs)
    family.part("models").check_widths(source)
    _ = source.quantized_layout  # a quantized layout fluxexport cannot read is refused before any work
    return source


def refuse_mismatch(pairs: tuple[tuple[str, Any, str, Any], ...], root: Path) -> None:
    """Refuse the first (their name, width, our name, expected) pair whose widths differ (the family's
    `check_widths` lists them)."""
    for theirs, width, ours, expected in pairs:
        if int(width) != int(expected):
            raise FluxExportError(
                f"{root}: {theirs} is {width} but the transformer's {ours} is {expected}: the parts come from "
                "different models"
            )


def _looks_like_hub_id(reference: str) -> bool:
    parts = reference.split("/")
    return len(parts) == 2 and all(parts) and not reference.startswith((".", "~"))


def download_from_hub(repo_id: str) -> Path:
    """Fetch a hub repository as diffusers itself would for its pipeline (`DiffusionPipeline.download`: every
    file a part reads — tokenizer chat templates included — safetensors weights only)."""
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return Path(DiffusionPipeline.download(repo_id, use_safetensors=True))
    except OSError as error:  # diffusers reports hub failures as EnvironmentError, the hub's error as its cause
        cause = error.__cause__ or error
        if isinstance(cause, RepositoryNotFoundError):
            raise FluxExportError(f"hub repository {repo_id!r} not found (or gated: run `hf auth login`)") from None
        if "safetensors" in str(error) and error.__cause__ is None:
            raise FluxExportError(
                f"hub repository {repo_id!r} has no safetensors weights for every part: fluxexport reads "
                "safetensors only"
            ) from None
        raise FluxExportError(
            f"cannot download {repo_id!r}: the hub is unreachable and it is not in the local cache "
            f"({str(cause).splitlines()[0] if str(cause) else type(cause).__name__}); "
            "pass a local diffusers folder instead (--model DIR)"
        ) from None


def resolve_model(reference: str, base: str | None = None) -> ModelSource:
    """Turn a `--model` value (and `--base-model` for single files) into a ModelSource."""
    if reference.endswith(".safetensors"):
        file = Path(reference)
        if not file.is_file():
            raise FluxExportError(f"checkpoint file {file} does not exist")
        if base is None:
            raise FluxExportError(
                f"{file.name} holds only the transformer: add --base-model DIR (a diffusers FLUX folder, hub id "
                "or tiny variant) for the VAE, text encoders and tokenizers"
            )
        rest = resolve_model(base)
        return load_folder(rest.root, name=file.stem, transformer_file=file)
    if reference in TINY_VARIANTS:
        return load_folder(materialise_tiny(reference), name=reference)
    if reference in TINY_PRIORS:
        refuse_prior(reference)
    if reference.startswith("tiny-"):
        raise FluxExportError(f"unknown tiny variant {reference!r}: choose one of {', '.join(TINY_VARIANTS)}")
    path = Path(reference).expanduser()
    if path.exists() or not _looks_like_hub_id(reference):
        return load_folder(path)
    return load_folder(download_from_hub(reference), name=reference.split("/")[-1])


def refuse_prior(name: str) -> None:
    """A FLUX.1 Redux prior named where a model goes: it runs in front of one (`--redux`), not alone."""
    raise FluxExportError(
        f"{name} is a FLUX.1 Redux prior ({REDUX_PIPELINE}), not a model: run FLUX.1 [dev] or [schnell] with "
        f"--redux {name} --image PICTURE"
    )


def made_from(recorded: str, source: ModelSource) -> str:
    """The end of a "made from …" refusal: another model's name, or, under the same name, a checkpoint whose
    files changed since (its fingerprint moved)."""
    if recorded != source.name:
        return f"{recorded!r}, not from {source.name!r}"
    return f"{recorded!r} as it was then (its files, LoRAs or --text-encoder-layers have changed since)"
