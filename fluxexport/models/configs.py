"""Model configs as the libraries that define them read them: a folder's `config.json` completed with the class's
own defaults (diffusers' model and scheduler classes, transformers' config classes), never with ours.

A published config written before a key existed lacks it (FLUX.2 [dev]'s transformer config predates
`guidance_embeds`, whose diffusers default is True): only the defining class knows what the model then is.
"""

from __future__ import annotations

import importlib
import inspect
import json
from typing import Any

from fluxexport.errors import FluxExportError

# model_index.json keys that are not pipeline arguments
_INDEX_META = ("_class_name", "_diffusers_version", "_name_or_path")


def pipeline_class(model_index: dict[str, Any], known: tuple[str, ...]) -> type:
    """The diffusers pipeline class a folder names (`model_index.json`'s `_class_name`), or the family's first
    (`known`) for a folder that names none we run."""
    import diffusers

    name = model_index.get("_class_name")
    return getattr(diffusers, name if name in known else known[0])


def component_class(model_index: dict[str, Any], pipeline: type, part: str) -> type:
    """The class diffusers loads `part` with: the `[library, class]` pair `model_index.json` names, else the
    pipeline's own annotation for that argument."""
    entry = model_index.get(part)
    if isinstance(entry, list | tuple) and len(entry) == 2 and all(isinstance(item, str) for item in entry):
        library, name = entry
        try:
            found = getattr(importlib.import_module(library), name, None)
        except ImportError:
            found = None
        if not isinstance(found, type):
            raise FluxExportError(
                f"model_index.json loads its {part} as {library}.{name}, which the installed {library} lacks: "
                f"upgrade {library}"
            )
        return found
    annotation = inspect.signature(pipeline.__init__).parameters[part].annotation
    if not isinstance(annotation, type):
        raise FluxExportError(f"{pipeline.__name__} names no class for its {part}: name one in model_index.json")
    return annotation


def init_defaults(function: Any) -> dict[str, Any]:
    """A callable's keyword defaults, as its signature declares them."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def call_default(pipeline: type, argument: str) -> Any:
    """The default of one of the pipeline's call arguments (e.g. `text_encoder_out_layers`)."""
    return inspect.signature(pipeline.__call__).parameters[argument].default


def diffusers_config(library_class: type, raw: dict[str, Any]) -> dict[str, Any]:
    """A diffusers model's or scheduler's config as `library_class.from_config(raw).config` holds it: the keys
    its `__init__` takes, each from the file or else the class's default (models are not built: their `__init__`
    defaults are read from its signature)."""
    if hasattr(library_class, "set_timesteps"):  # a scheduler: cheap to build, and its config is the answer
        return _plain(dict(library_class.from_config(raw).config))
    init, _unused, hidden = library_class.extract_init_dict(dict(raw))
    private = {key: value for key, value in hidden.items() if key.startswith("_")}
    defaults = init_defaults(library_class.__init__)
    return _plain(private | defaults | init)


def transformers_config(model_class: type, raw: dict[str, Any]) -> dict[str, Any]:
    """A transformers model's config as its config class reads the file (every attribute, defaults included)."""
    config = model_class.config_class.from_dict(dict(raw))
    return json.loads(config.to_json_string(use_diff=False))


def language_config(model_class: type, raw: dict[str, Any]) -> dict[str, Any]:
    """The language model's config inside a text encoder's (Mistral3 nests it; Qwen3 is one)."""
    config = model_class.config_class.from_dict(dict(raw)).get_text_config()
    return json.loads(config.to_json_string(use_diff=False))


def pipeline_config(pipeline: type, model_index: dict[str, Any]) -> dict[str, Any]:
    """`model_index.json` as the pipeline's config holds it: its registered arguments (FLUX.2 [klein]'s
    `is_distilled`) from the file, else the pipeline's defaults."""
    defaults = {key: value for key, value in init_defaults(pipeline.__init__).items() if not _is_component(value)}
    return defaults | dict(model_index)


def library_configs(configs: dict[str, dict[str, Any]], known_pipelines: tuple[str, ...]) -> dict[str, dict]:
    """Every config of a folder read through its defining library (`configs` as the files hold them, keyed as
    `model_index.json` names the parts); `language` is the text encoder's language-model config."""
    model_index = configs["model_index"]
    pipeline = pipeline_class(model_index, known_pipelines)
    read: dict[str, dict[str, Any]] = {"model_index": pipeline_config(pipeline, model_index)}
    for part, raw in configs.items():
        if part == "model_index":
            continue
        library_class = component_class(model_index, pipeline, part)
        reader = transformers_config if library_class.__module__.startswith("transformers") else diffusers_config
        try:
            read[part] = reader(library_class, raw)
        except (ValueError, TypeError, *_validation_errors()) as error:  # the library's own checks of the file
            first = str(error).strip().splitlines()[-1].strip() if str(error).strip() else type(error).__name__
            raise FluxExportError(
                f"{part} config does not load as {library_class.__name__}: {first}: re-download the model"
            ) from None
    if "text_encoder" in configs and "text_encoder_2" not in configs:  # FLUX.2: one LM read at inner layers
        read["language"] = language_config(
            component_class(model_index, pipeline, "text_encoder"), configs["text_encoder"]
        )
    return read


def _validation_errors() -> tuple[type[Exception], ...]:
    """The error transformers' strict config classes raise on an inconsistent file (huggingface_hub's)."""
    from huggingface_hub import errors

    found = getattr(errors, "StrictDataclassClassValidationError", None)
    return (found,) if isinstance(found, type) else ()


def _is_component(value: Any) -> bool:
    return value is None or hasattr(value, "config")


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """JSON-plain values (tuples as lists), as a config read from its file holds them."""
    return json.loads(json.dumps(config, default=list))
