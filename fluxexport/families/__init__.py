"""The registry of model families: each is one object declared in its own folder (`families/flux1/`,
`families/flux2/`); adding a family is a folder and one line in `FAMILIES`."""

from __future__ import annotations

from typing import Any

from fluxexport.errors import FluxExportError
from fluxexport.families.family import Family
from fluxexport.families.flux1 import FAMILY as FLUX1
from fluxexport.families.flux2 import FAMILY as FLUX2

__all__ = ["FAMILIES", "FLUX1", "FLUX2", "Family", "detect_family", "family_named", "family_of_pipeline"]

FAMILIES: tuple[Family, ...] = (FLUX1, FLUX2)


def family_named(name: str) -> Family:
    """The family whose folder is `name` ("flux1"), as artifacts record it."""
    for family in FAMILIES:
        if family.name == name:
            return family
    known = ", ".join(family.name for family in FAMILIES)
    raise FluxExportError(f"unknown model family {name!r}: fluxexport knows {known}; re-export with this version")


def family_of_pipeline(pipeline: str) -> Family:
    """The family a diffusers pipeline class (by name) belongs to."""
    return detect_family({"_class_name": pipeline})


def detect_family(model_index: dict[str, Any], transformer_config: dict[str, Any] | None = None) -> Family:
    """The family of a checkpoint: its pipeline class, or (a folder without one) its transformer's class."""
    pipeline = model_index.get("_class_name")
    for family in FAMILIES:
        if pipeline in family.pipelines:
            return family
    transformer_class = (transformer_config or {}).get("_class_name")
    known = ", ".join(name for family in FAMILIES for name in family.pipelines)
    for family in FAMILIES:
        if transformer_class != family.transformer_class:
            continue
        if pipeline is not None:  # a FLUX pipeline that runs its transformer otherwise (KV cache, inpainting)
            raise FluxExportError(
                f"pipeline {pipeline!r} is a {family.title} pipeline fluxexport does not run: it runs {known}; "
                "export a checkpoint of one of those"
            )
        return family
    if pipeline is None and transformer_class is None:
        return FLUX1  # a bare FLUX.1 folder (older exports wrote none)
    raise FluxExportError(
        f"pipeline {pipeline or transformer_class!r} is not a FLUX model fluxexport knows: it exports {known}"
    )
