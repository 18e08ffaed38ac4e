"""A model family is one object: what differs between FLUX.1 and FLUX.2 lives in `fluxexport/families/<f>/`, the
generic code asks the family (`source.family`, `source.family.part("specs")`) and never branches on which one it
is. These tests enforce it over the package's source with `ast` (as `test_layering` enforces the layers), check that
every family declares every part the generic layers ask for, and that a family is its folder plus one registry line.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from test_layering import package_modules

import fluxexport.families as registry
from fluxexport.families import FAMILIES, detect_family, family_named
from fluxexport.families.family import PART_NAMES

FAMILY_FOLDER = "fluxexport/families/"
FAMILY_OBJECTS = ("FLUX1", "FLUX2")  # the registry's names for the family objects
FLAGS = ("is_flux2", "_is_flux2", "is_flux1")  # attributes that asked "which family?"


def family_words() -> set[str]:
    """The strings a family-name comparison spells: every family's name and title, every pipeline's class."""
    return {word for family in FAMILIES for word in (family.name, family.title, *family.pipelines)}


def _constants(node: ast.expr) -> list[str]:
    """The string constants of a comparison operand (itself, or the items of a tuple, list or set)."""
    items = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
    return [item.value for item in items if isinstance(item, ast.Constant) and isinstance(item.value, str)]


def _names_a_family(node: ast.expr) -> bool:
    """Whether a comparison operand is a family object (`FLUX2`, `registry.FLUX1`) or a collection holding one."""
    items = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
    return any(
        (isinstance(item, ast.Name) and item.id in FAMILY_OBJECTS)
        or (isinstance(item, ast.Attribute) and item.attr in FAMILY_OBJECTS)
        for item in items
    )


def family_branches(tree: ast.AST, words: set[str]) -> list[tuple[int, str]]:
    """(line, what) of every place `tree` asks which family it has: an `is_flux2`-style flag (defined or read), a
    comparison with a family object (`family is FLUX2`) or with a family's name, title or pipeline class
    (`family.name == "flux2"`, `pipeline in ("FluxKontextPipeline",)`), and a `startswith` on one."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in FLAGS:
            found.append((node.lineno, f"defines {node.name}"))
        elif isinstance(node, ast.Attribute) and node.attr in FLAGS:
            found.append((node.lineno, f"reads .{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in FLAGS:
            found.append((node.lineno, f"reads {node.id}"))
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_names_a_family(operand) for operand in operands):
                found.append((node.lineno, "compares with a family object"))
            spelled = sorted({text for operand in operands for text in _constants(operand) if text in words})
            if spelled:
                found.append((node.lineno, f"compares with {spelled[0]!r}"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("startswith", "endswith")
            and node.args
        ):
            prefixes = _constants(node.args[0])
            if any(word.startswith(prefix) for prefix in prefixes for word in words if prefix):
                found.append((node.lineno, f"{node.func.attr}({prefixes[0]!r})"))
    return found


def test_no_family_branch_outside_the_family_folders():
    words = family_words()
    problems = [
        f"{file}:{line}: {what}"
        for file, text, _ in package_modules().values()
        if not file.startswith(FAMILY_FOLDER)
        for line, what in family_branches(ast.parse(text, file), words)
    ]
    assert not problems, "ask the family (source.family, source.family.part(...)) instead:\n" + "\n".join(problems)


def test_the_checker_finds_each_kind_of_family_branch():
    text = (
        "def is_flux2(self):\n    return self.family is FLUX2\n"  # 1, 2
        "if source.is_flux2 or family.name == 'flux2':\n    pass\n"  # 3 (twice)
        "x = family in (registry.FLUX1,)\n"  # 5
        "y = source.pipeline_class != 'FluxKontextPipeline'\n"  # 6
        "z = variant.pipeline_class.startswith('Flux2')\n"  # 7
        "fine = variant.family is family and source.family.reference_budget and name == 'transformer'\n"
    )
    found = sorted(family_branches(ast.parse(text), family_words()))
    assert found == [
        (1, "defines is_flux2"),
        (2, "compares with a family object"),
        (3, "compares with 'flux2'"),
        (3, "reads .is_flux2"),
        (5, "compares with a family object"),
        (6, "compares with 'FluxKontextPipeline'"),
        (7, "startswith('Flux2')"),
    ]


def family_folder(family) -> Path:
    return Path(registry.__file__).parent / family.name


def part_modules(family) -> set[str]:
    """The layers `family` has a part for: its folder's modules but `__init__`."""
    return {path.stem for path in family_folder(family).glob("*.py") if path.stem != "__init__"}


def test_every_family_has_the_same_part_modules():
    parts = {family.name: part_modules(family) for family in FAMILIES}
    assert all(layers == parts[FAMILIES[0].name] for layers in parts.values()), parts
    assert set(PART_NAMES) <= parts[FAMILIES[0].name]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_every_part_defines_what_the_generic_layers_ask(family):
    """Each family's part for a layer defines the names of `PART_NAMES` (and where it has an `__all__`, lists them
    and no more there), and every part module declares the same `__all__` in every family."""
    for layer, names in PART_NAMES.items():
        part = family.part(layer)
        assert [name for name in names if not hasattr(part, name)] == [], f"{family.name}/{layer}.py"
        if hasattr(part, "__all__"):
            assert sorted(part.__all__) == sorted(names), f"{family.name}/{layer}.py"
    for layer in part_modules(family):
        theirs = [getattr(other.part(layer), "__all__", None) for other in FAMILIES]
        assert all(names == theirs[0] for names in theirs), f"{layer}: {theirs}"


def parts_asked(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, layer, name) of every `….part("layer").name` in `tree`."""
    return [
        (node.lineno, node.value.args[0].value, node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Attribute)
        and node.value.func.attr == "part"
        and len(node.value.args) == 1
        and isinstance(node.value.args[0], ast.Constant)
    ]


def test_generic_code_asks_parts_only_for_names_every_family_defines():
    modules = package_modules().values()
    asked = [
        (file, line, layer, name) for file, text, _ in modules for line, layer, name in parts_asked(ast.parse(text))
    ]
    assert {(layer, name) for *_, layer, name in asked} >= {("models", "check_widths"), ("specs", "component_specs")}
    missing = [
        f"{file}:{line}: {family.name} has no {layer} part's {name}"
        for file, line, layer, name in asked
        for family in FAMILIES
        if not hasattr(family.part(layer), name)
    ]
    assert not missing, "\n".join(missing)


def test_the_registry_holds_each_family_folder_once():
    folders = {path.name for path in Path(registry.__file__).parent.iterdir() if (path / "__init__.py").is_file()}
    assert sorted(family.name for family in FAMILIES) == sorted(folders)
    assert [family_named(family.name) for family in FAMILIES] == list(FAMILIES)
    pipelines = [pipeline for family in FAMILIES for pipeline in family.pipelines]
    assert len(pipelines) == len(set(pipelines))  # a pipeline belongs to one family
    assert all(set(family.reference_modes) == set(family.pipelines) for family in FAMILIES)
    assert all(set(family.module_of.values()) == set(family.subfolders) for family in FAMILIES)


@pytest.fixture
def flux9(tmp_path, monkeypatch):
    """A new family made the way the README says: FLUX.1's folder copied as `families/flux9/` (its own name and
    title), registered by one line in front of the others, so that FLUX.1's pipelines are now flux9's."""
    folder = tmp_path / "flux9"
    shutil.copytree(family_folder(registry.FLUX1), folder, ignore=shutil.ignore_patterns("__pycache__"))
    for path in folder.glob("*.py"):
        path.write_text(path.read_text().replace("fluxexport.families.flux1", "fluxexport.families.flux9"))
    init = folder / "__init__.py"
    init.write_text(
        init.read_text().replace('name="flux1"', 'name="flux9"').replace('title="FLUX.1"', 'title="FLUX.9"')
    )
    monkeypatch.setattr(registry, "__path__", [*registry.__path__, str(tmp_path)])
    from fluxexport.families.flux9 import FAMILY

    monkeypatch.setattr(registry, "FAMILIES", (FAMILY, *FAMILIES))  # the one registry line
    yield FAMILY
    for name in [name for name in sys.modules if name.startswith("fluxexport.families.flux9")]:
        del sys.modules[name]


def test_a_new_family_is_its_folder_and_one_registry_line(flux9, sources):
    """Nothing outside the family folders knows FLUX.1 by name: with its folder copied as flux9 and registered,
    tiny-dev reads as flux9 and every layer runs it through flux9's parts, to the same specs, defaults and image."""
    from fluxexport.models.source import load_folder
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.runtime.pipeline import GenerationRequest, generate
    from fluxexport.specs import component_specs, pipeline_components

    before = sources["tiny-dev"]
    source = load_folder(before.root, name="tiny-dev")
    assert source.family is flux9 and detect_family({"_class_name": "FluxPipeline"}) is flux9
    assert (source.default_steps, source.default_max_sequence_length) == (before.default_steps, 512)
    assert component_specs(source) == component_specs(before)
    assert pipeline_components(source) == ("clip", "t5", "transformer", "vae_decoder")
    request = GenerationRequest("a tiny fox", height=64, width=64, num_inference_steps=2)
    images = [generate(TorchBackend(model), model, request).images for model in (source, before)]
    assert images[0].shape == (1, 64, 64, 3) and np.array_equal(images[0], images[1])


def test_the_flop_count_reads_the_familys_mlp(flux2_sources):
    """FLUX.2's SwiGLU MLP (3 matrices of ratio `mlp_ratio` from its config): c = 2·(4 + 3·3) = 26."""
    from fluxexport.benchmark import transformer_flop_per_step

    source = flux2_sources["tiny-klein"]
    config = source.transformer
    assert (source.family.ffn_matrices, config["mlp_ratio"]) == (3, 3.0)
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    blocks = int(config["num_layers"]) + int(config["num_single_layers"])
    tokens = (256 // 16) ** 2 + 512
    assert transformer_flop_per_step(source, 256, 256, 512, 1) == blocks * (26 * d * d * tokens + 4 * tokens**2 * d)
