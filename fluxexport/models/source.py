"""What `--model` names: a tiny variant, a diffusers folder, a hub id, or a BFL single-file transformer.

Everything here reads configs and tokenizers only; weights are loaded by the backends.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxexport.errors import FluxExportError
from fluxexport.models.family import FLUX1, FLUX2, Family, detect_family
from fluxexport.models.tiny import TINY_MARKER, TINY_VARIANTS, materialise_tiny

# module → the checkpoint subfolder its config and weights live in (FLUX.1; `ModelSource.subfolders` per family)
SUBFOLDERS = FLUX1.subfolders

KONTEXT_PIPELINE = "FluxKontextPipeline"


@dataclass(frozen=True)
class ModelSource:
    """A resolved FLUX checkpoint: a diffusers folder plus, optionally, a single-file transformer."""

    name: str
    root: Path
    transformer_file: Path | None = None
    configs: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)
    loras: tuple = ()  # LoraFile, merged into the weights wherever they are read (models/lora.py)

    def with_loras(self, loras) -> ModelSource:
        """This checkpoint with `loras` (LoraFile) merged into it; checked against the model when read."""
        return dataclasses.replace(self, loras=tuple(loras))

    @functools.cached_property
    def lora_set(self):
        """The LoRAs read once (a LoraSet), or None without any."""
        from fluxexport.models.lora import LoraSet

        return LoraSet(self.loras, self.family.name) if self.loras else None

    @property
    def pipeline_class(self) -> str:
        return self.configs["model_index"].get("_class_name", "FluxPipeline")

    @property
    def family(self) -> Family:
        return detect_family(self.configs["model_index"], self.configs.get("transformer"))

    @property
    def is_flux2(self) -> bool:
        return self.family is FLUX2

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
        return bool(self.configs["model_index"].get("is_distilled", False))

    @property
    def text_encoder(self) -> dict[str, Any]:
        """FLUX.2's text encoder config (a causal LM read at intermediate layers)."""
        return self.configs["text_encoder"]

    @property
    def text_encoder_layers(self) -> tuple[int, ...]:
        """FLUX.2: the hidden-state layers stacked into the prompt embedding (diffusers' defaults per pipeline;
        a tiny model's marker names its own)."""
        if self.is_tiny:
            layers = self.tiny_marker.get("text_encoder_layers")
            if layers:
                return tuple(layers)
        return (10, 20, 30) if self.pipeline_class == "Flux2Pipeline" else (9, 18, 27)

    @property
    def tiny_marker(self) -> dict[str, Any]:
        """A tiny model's marker (variant, default size, …); empty for real checkpoints."""
        return json.loads((self.root / TINY_MARKER).read_text()) if self.is_tiny else {}

    @property
    def is_kontext(self) -> bool:
        return self.pipeline_class == KONTEXT_PIPELINE

    @property
    def transformer(self) -> dict[str, Any]:
        return self.configs["transformer"]

    @property
    def vae(self) -> dict[str, Any]:
        return self.configs["vae"]

    @property
    def scheduler(self) -> dict[str, Any]:
        return self.configs["scheduler"]

    @property
    def clip(self) -> dict[str, Any]:
        return self.configs["text_encoder"]

    @property
    def t5(self) -> dict[str, Any]:
        return self.configs["text_encoder_2"]

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.get("guidance_embeds", False))

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.get("in_channels", 64)) // 4

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", [0] * 4)) - 1)

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
        if self.is_flux2:
            return 4 if self.is_distilled else 50
        return 28 if self.guidance_embeds else 4

    @property
    def default_max_sequence_length(self) -> int:
        return 512 if self.guidance_embeds or self.is_flux2 else 256

    @property
    def default_guidance(self) -> float:
        return 4.0 if self.is_flux2 else 3.5

    @property
    def uses_true_cfg(self) -> bool:
        """FLUX.2 base models run the transformer twice a step (a negative prompt); distilled ones and FLUX.1 once."""
        return self.is_flux2 and not self.is_distilled and not self.guidance_embeds

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
        return digest.hexdigest()[:16]

    @functools.cached_property
    def tokenizers(self):
        """FLUX.1: (CLIP tokenizer, T5 tokenizer); FLUX.2: (its LM's tokenizer,); loaded once from the folder."""
        from transformers import AutoTokenizer, CLIPTokenizer, T5TokenizerFast

        if self.is_flux2:
            tokenizer = AutoTokenizer.from_pretrained(self.root / "tokenizer")
            if tokenizer.chat_template is None:  # a processor folder may keep the template in its own files
                tokenizer.chat_template = processor_chat_template(self.root / "tokenizer")
            return (tokenizer,)
        return (
            CLIPTokenizer.from_pretrained(self.root / "tokenizer"),
            T5TokenizerFast.from_pretrained(self.root / "tokenizer_2"),
        )


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
    (check_flux2_widths if family is FLUX2 else check_widths)(configs, root)
    return ModelSource(name=name or root.name, root=root, transformer_file=transformer_file, configs=configs)


def check_widths(configs: dict[str, dict[str, Any]], root: Path) -> None:
    """Refuse components whose widths do not meet the transformer's (torch.export would fail with pages)."""
    transformer = configs["transformer"]
    pairs = (
        ("text_encoder/config.json hidden_size", configs["text_encoder"].get("hidden_size"),
         "pooled_projection_dim", transformer.get("pooled_projection_dim", 768)),
        ("text_encoder_2/config.json d_model", configs["text_encoder_2"].get("d_model"),
         "joint_attention_dim", transformer.get("joint_attention_dim", 4096)),
        ("vae/config.json latent_channels × 4", 4 * int(configs["vae"].get("latent_channels", 16)),
         "in_channels", transformer.get("in_channels", 64)),
    )  # fmt: skip
    for theirs, width, ours, expected in pairs:
        if width is not None and int(width) != int(expected):
            raise FluxExportError(
                f"{root}: {theirs} is {width} but the transformer's {ours} is {expected}: the parts come from "
                "different models"
            )


def check_flux2_widths(configs: dict[str, dict[str, Any]], root: Path) -> None:
    """FLUX.2: the stacked text layers must make the transformer's joint width, the VAE's patches its channels."""
    transformer, text = configs["transformer"], configs["text_encoder"]
    text = text.get("text_config", text)  # Mistral3 nests its language model's config
    layers = 3  # both pipelines stack three hidden-state layers
    pairs = (
        (f"text_encoder/config.json hidden_size × {layers}", layers * int(text.get("hidden_size", 0)),
         "joint_attention_dim", transformer.get("joint_attention_dim", 15360)),
        ("vae/config.json latent_channels × 4", 4 * int(configs["vae"].get("latent_channels", 32)),
         "in_channels", transformer.get("in_channels", 128)),
    )  # fmt: skip
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
    """Fetch a hub repository's diffusers parts (safetensors only) through huggingface_hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["model_index.json", "*/config.json", "*/*.json", "*/*.safetensors", "*/*.model", "*/*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise FluxExportError(
            f"cannot download {repo_id!r}: the hub is unreachable and it is not in the local cache; "
            "pass a local diffusers folder instead (--model DIR)"
        ) from None
    except RepositoryNotFoundError:
        raise FluxExportError(f"hub repository {repo_id!r} not found (or gated: run `hf auth login`)") from None
    except HfHubHTTPError as error:
        raise FluxExportError(f"cannot download {repo_id!r}: {error}".splitlines()[0]) from None


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
    if reference.startswith("tiny-"):
        raise FluxExportError(f"unknown tiny variant {reference!r}: choose one of {', '.join(TINY_VARIANTS)}")
    path = Path(reference).expanduser()
    if path.exists() or not _looks_like_hub_id(reference):
        return load_folder(path)
    return load_folder(download_from_hub(reference), name=reference.split("/")[-1])


def made_from(recorded: str, source: ModelSource) -> str:
    """The end of a "made from …" refusal: another model's name, or, under the same name, a checkpoint whose
    files changed since (its fingerprint moved)."""
    if recorded != source.name:
        return f"{recorded!r}, not from {source.name!r}"
    return f"{recorded!r} as it was then (its files or LoRAs have changed since)"
