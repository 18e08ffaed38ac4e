"""FLUX.1 Redux: a prior checkpoint that runs in front of a FLUX.1 base model (diffusers' `FluxPriorReduxPipeline`).

A Redux folder (black-forest-labs/FLUX.1-Redux-dev) holds `image_encoder/` (transformers' `SiglipVisionModel`,
so400m patch 14 at 384²), `feature_extractor/` (`SiglipImageProcessor`: every image resized to that one size) and
`image_embedder/` (diffusers' `ReduxImageEncoder`: SigLIP's tokens projected to the base transformer's text width).
Its output is the base pipeline's `prompt_embeds` and `pooled_prompt_embeds`; it has no transformer of its own, so
it is not a model `--model` runs but a prior `--redux` names. Configs are read through the classes that define them.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxexport.errors import FluxExportError, RequestError
from fluxexport.families import family_of_pipeline
from fluxexport.families.family import NO_REFERENCE
from fluxexport.models.configs import component_class, diffusers_config, transformers_config

REDUX_PIPELINE = "FluxPriorReduxPipeline"
REDUX_PARTS = ("image_encoder", "feature_extractor", "image_embedder")
# The base pipeline a Redux prior feeds: FluxPipeline (FLUX.1 [dev], [schnell]), as diffusers' example runs it
REDUX_BASE_PIPELINE = "FluxPipeline"
# FluxPriorReduxPipeline's text: T5 read at 512 tokens (zeros of that length without a prompt), whatever the base
REDUX_TEXT_LENGTH = 512
REDUX_COMPONENTS = ("image_encoder", "image_embedder")  # what `export --redux` writes (both run the prior)
TINY_REDUX = "tiny-redux"


@dataclass(frozen=True)
class ReduxSource:
    """A resolved Redux prior: its folder and its configs as transformers and diffusers read them."""

    name: str
    root: Path
    configs: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def image_encoder(self) -> dict[str, Any]:
        """SiglipVisionConfig: hidden_size (1152), image_size (384), patch_size (14), …"""
        return self.configs["image_encoder"]

    @property
    def image_embedder(self) -> dict[str, Any]:
        """ReduxImageEncoder's config: redux_dim (SigLIP's width), txt_in_features (the base's text width)."""
        return self.configs["image_embedder"]

    @property
    def image_size(self) -> int:
        """The one side every image is resized to (the processor's, which is the encoder's own)."""
        return int(self.image_encoder["image_size"])

    @property
    def image_tokens(self) -> int:
        """SigLIP's tokens per image (so400m at 384² with patch 14: 27² = 729), appended to the text's."""
        return (self.image_size // int(self.image_encoder["patch_size"])) ** 2

    @property
    def text_width(self) -> int:
        return int(self.image_embedder["txt_in_features"])

    @functools.cached_property
    def feature_extractor(self):
        """The folder's image processor, loaded by the class diffusers loads it with."""
        with quiet_processor_fallback():
            return self._part_class("feature_extractor").from_pretrained(self.root / "feature_extractor")

    def _part_class(self, part: str) -> type:
        return part_class(self.configs["model_index"], part)

    def module_class(self, part: str) -> type:
        """The library class of `image_encoder` or `image_embedder`."""
        return self._part_class(part)

    def check_base(self, base) -> None:
        """Refuse, in one line, a base model this prior cannot feed: not a FLUX.1 text-to-image pipeline (the Redux
        image takes `--image`, which Fill and Kontext read as their own), or one whose text width differs."""
        feeds = family_of_pipeline(REDUX_BASE_PIPELINE)
        if base.family is not feeds or base.reference_mode != NO_REFERENCE:
            raise RequestError(
                "redux", f"{self.name} is a FLUX.1 Redux prior; it feeds {REDUX_BASE_PIPELINE} models (FLUX.1 "
                f"[dev], [schnell]), not {base.name} (a {base.pipeline_class})",
                "run it in front of FLUX.1-dev or schnell, or {drop}", pointer=False,
            )  # fmt: skip
        width = int(base.transformer["joint_attention_dim"])
        if width != self.text_width:
            raise RequestError(
                "redux", f"{self.name} embeds images {self.text_width} wide but {base.name}'s text is {width} wide",
                "use the Redux prior made for this base model", pointer=False,
            )  # fmt: skip


@contextlib.contextmanager
def quiet_processor_fallback() -> Iterator[None]:
    """Without torchvision, transformers hands out `SiglipImageProcessor` as its PIL class (the one diffusers'
    prior gets too) and logs, once, that torchvision would give another backend: silenced while we name the class
    (transformers' import-utils logger only, restored after)."""
    from transformers.utils import logging

    logger = logging.get_logger("transformers.utils.import_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def part_class(model_index: dict[str, Any], part: str) -> type:
    """The class diffusers loads a Redux part with: model_index's `[library, class]`, where the library may name a
    diffusers pipeline module (`["flux", "ReduxImageEncoder"]`: `diffusers.pipelines.flux`), as diffusers reads it."""
    import importlib

    import diffusers

    entry = model_index.get(part)
    if isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[0], str):
        try:
            module = importlib.import_module(f"diffusers.pipelines.{entry[0]}")
        except ImportError:
            module = None
        found = getattr(module, str(entry[1]), None) if module is not None else None
        if isinstance(found, type):
            return found
    with quiet_processor_fallback():  # diffusers' prior module imports SiglipImageProcessor
        return component_class(model_index, getattr(diffusers, REDUX_PIPELINE), part)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FluxExportError(f"{path} is not valid JSON ({error.msg}): re-download the Redux folder") from None


def load_redux(root: Path, name: str | None = None) -> ReduxSource:
    """Read a Redux folder's configs (model_index naming FluxPriorReduxPipeline, its three parts), refusing a
    folder that is not one in one line."""
    root = Path(root)
    index = root / "model_index.json"
    if not index.is_file():
        raise FluxExportError(f"--redux {root}: no model_index.json there; pass a FLUX.1 Redux folder or tiny-redux")
    model_index = _read_json(index)
    pipeline = model_index.get("_class_name")
    if pipeline != REDUX_PIPELINE:
        raise FluxExportError(
            f"--redux {root}: its model_index.json names {pipeline!r}, not {REDUX_PIPELINE}; pass a FLUX.1 Redux "
            "folder (black-forest-labs/FLUX.1-Redux-dev) or tiny-redux"
        )
    missing = [part for part in REDUX_PARTS if not (root / part).is_dir()]
    if missing:
        raise FluxExportError(f"Redux folder {root} is incomplete: missing {', '.join(missing)}")
    configs: dict[str, dict[str, Any]] = {"model_index": model_index}
    for part, reader, file in (
        ("image_encoder", transformers_config, "config.json"),
        ("image_embedder", diffusers_config, "config.json"),
    ):
        path = root / part / file
        if not path.is_file():
            raise FluxExportError(f"Redux folder {root} is incomplete: missing {part}/{file}")
        configs[part] = reader(part_class(model_index, part), _read_json(path))
    return ReduxSource(name=name or root.name, root=root, configs=configs)


def resolve_redux(reference: str) -> ReduxSource:
    """What `--redux` names: `tiny-redux`, a Redux folder or a hub id (downloaded as diffusers would)."""
    from fluxexport.models.source import _looks_like_hub_id, download_from_hub
    from fluxexport.models.tiny import TINY_VARIANTS, materialise_tiny

    if reference == TINY_REDUX:
        return load_redux(materialise_tiny(reference), name=reference)
    if reference in TINY_VARIANTS:
        raise FluxExportError(
            f"--redux {reference}: that is a model to run with --model, not a Redux prior; pass {TINY_REDUX} or a "
            "FLUX.1 Redux folder"
        )
    path = Path(reference).expanduser()
    if path.exists() or not _looks_like_hub_id(reference):
        if not path.is_dir():
            raise FluxExportError(f"--redux {reference}: no such folder; pass a FLUX.1 Redux folder or tiny-redux")
        return load_redux(path)
    return load_redux(download_from_hub(reference), name=reference.split("/")[-1])


def build_tiny_redux(text_width: int, seed: int = 0):
    """A random FluxPriorReduxPipeline whose embedder feeds a tiny FLUX.1 base of text width `text_width`: SigLIP
    with 1 layer of width 16 on 32² images in 8² patches (16 tokens), no text encoders (as BFL's folder)."""
    import torch
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with quiet_processor_fallback():
        from diffusers import FluxPriorReduxPipeline
        from transformers import SiglipImageProcessor

    side, width = 32, 16
    torch.manual_seed(seed)
    encoder = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
            image_size=side, patch_size=8,
        )
    ).eval()  # fmt: skip
    torch.manual_seed(seed + 1)
    embedder = ReduxImageEncoder(redux_dim=width, txt_in_features=text_width).eval()
    processor = SiglipImageProcessor(size={"height": side, "width": side})
    return FluxPriorReduxPipeline(image_encoder=encoder, feature_extractor=processor, image_embedder=embedder)
