"""The package's layers: every folder (`fluxexport.export`) and top-level module (`fluxexport.specs`) of
`fluxexport` sits in one layer of `LAYERS` and imports only from its own layer or below, and no two of them
import each other, directly or round a circle. Every import counts (function-local ones too, relative ones
resolved); only `if TYPE_CHECKING:` blocks are left out, since they never run.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import fluxexport

PACKAGE = "fluxexport"
ROOT = Path(fluxexport.__file__).parent

# Lowest first; a unit may import its own layer and those before it.
LAYERS = (
    ("__init__", "errors", "atomic", "dtypes", "console", "compare"),  # no FLUX knowledge; metrics, thresholds
    ("families",),  # the family objects (`families/flux1/__init__.py`): what is known before any weight is read
    ("models",),  # model folders: configs, checkpoints, LoRAs, tiny models
    ("artifacts",),  # the folders we write, as typed records: exports, engines, Triton repositories
    ("runtime",),  # sampling math, the Backend protocol, the pipeline around it
    ("specs",),  # one spec per component
    ("adapters",),  # the PyTorch module of each spec
    ("pytorch", "onnxruntime", "tensorrt"),  # one room per engine: running it (ORT's optimize, TRT's build, refit)
    ("export",),  # ONNX graphs
    ("quantize",),  # FP8 calibration and Q/DQ export
    ("validate", "build"),  # comparisons against the PyTorch reference; export what engines need, then build
    ("backend_factory", "benchmark", "triton", "openai_api"),  # a backend by name; serving (the OpenAI front on Triton)
    ("deploy",),  # Kubernetes manifests and releases for a Triton repository
    ("commands",),  # one library call per command: typed options in, typed results out, no printing
    ("cli",),
)


@dataclass(frozen=True)
class Import:
    file: str
    line: int
    source: str  # the importing unit
    target: str  # the imported unit
    module: str  # what the line names


FAMILIES = "families"  # a family's folder is a vertical slice: `families/flux1/specs.py` sits in the specs layer


def unit_of(module: str) -> str | None:
    """`fluxexport.export.manifest` → `export`; the package itself → `__init__`; another library → None; a family's
    part for a layer (`fluxexport.families.flux1.specs`) → `families.specs`, in that layer."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) > 3 and parts[1] == FAMILIES:
        return f"{FAMILIES}.{parts[3]}"
    return parts[1] if len(parts) > 1 else "__init__"


def layer_table(layers=None) -> dict[str, int]:
    """Unit → depth, with each family part (`families.specs`) at its layer's depth."""
    layers = LAYERS if layers is None else layers
    table = {unit: depth for depth, units in enumerate(layers) for unit in units}
    return table | {f"{FAMILIES}.{unit}": depth for unit, depth in table.items() if unit != FAMILIES}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `tree` outside `if TYPE_CHECKING:`; `from P import name`
    gives `P.name`, which is a module or names one of P's attributes (P's unit either way, but for the root)."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.extend((node.lineno, f"{origin}.{alias.name}") for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imports_of(modules: dict[str, tuple[str, str, bool]]) -> list[Import]:
    """`modules`: module name → (file shown in messages, source text, is a package's __init__)."""
    units = {unit_of(module) for module in modules}
    found = []
    for module, (file, text, is_package) in sorted(modules.items()):
        source = unit_of(module)
        for line, name in _imported_modules(ast.parse(text, file), module, is_package):
            target = unit_of(name)
            if target is None:
                continue
            if name.count(".") == 1 and target not in units:
                target = "__init__"  # `from fluxexport import FluxExportError`: an attribute of the root
            found.append(Import(file, line, source, target, name))
    return found


def _cycles(edges: dict[str, dict[str, Import]]) -> list[list[Import]]:
    """One circle through each group of units that reach each other (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(unit: str) -> None:
        index[unit] = low[unit] = len(index)
        stack.append(unit)
        for target in sorted(edges.get(unit, {})):
            if target not in index:
                connect(target)
                low[unit] = min(low[unit], low[target])
            elif target in stack:
                low[unit] = min(low[unit], index[target])
        if low[unit] == index[unit]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == unit:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for unit in sorted(edges):
        if unit not in index:
            connect(unit)

    circles = []
    for group in groups:
        start, members = group[0], set(group)
        paths = {start: []}  # breadth first from start back to start, inside the group
        queue = [start]
        while queue:
            unit = queue.pop(0)
            for target, witness in sorted(edges.get(unit, {}).items()):
                if target == start:
                    circles.append(paths[unit] + [witness])
                    queue = []
                    break
                if target in members and target not in paths:
                    paths[target] = paths[unit] + [witness]
                    queue.append(target)
    return circles


def family_parts_asked(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, layer) of every `<family>.part("layer")` call: a lazy import of that family's module for the layer."""
    return [
        (node.lineno, node.args[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "part"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ]


def layering_problems(modules: dict[str, tuple[str, str, bool]], layers=LAYERS) -> list[str]:
    """Each import from a lower layer up to a higher one, each unit in no layer, and each circle of units."""
    layer_of = layer_table(layers)
    problems = [
        f"{file}: {unit_of(module)} is in no layer of LAYERS"
        for module, (file, _, _) in sorted(modules.items())
        if unit_of(module) not in layer_of
    ]
    edges: dict[str, dict[str, Import]] = {}
    for found in imports_of(modules):
        if found.source == found.target:
            continue
        edges.setdefault(found.source, {}).setdefault(found.target, found)
        if found.source in layer_of and layer_of.get(found.target, -1) > layer_of[found.source]:
            problems.append(
                f"{found.file}:{found.line} → {found.module}: {found.source} (layer {layer_of[found.source]}) "
                f"imports {found.target} (layer {layer_of[found.target]}), a higher layer"
            )
    for module, (file, text, _) in sorted(modules.items()):
        for line, layer in family_parts_asked(ast.parse(text, file)):
            source = unit_of(module)
            if source in layer_of and layer_of.get(layer, -1) > layer_of[source]:
                problems.append(
                    f"{file}:{line} → family.part({layer!r}): {source} (layer {layer_of[source]}) asks a family "
                    f"for its {layer} part (layer {layer_of[layer]}), a higher layer"
                )
    for circle in _cycles(edges):
        path = " → ".join([circle[0].source] + [step.target for step in circle])
        steps = "; ".join(f"{step.file}:{step.line} → {step.module}" for step in circle)
        problems.append(f"circle {path}: {steps}")
    return problems


def package_modules() -> dict[str, tuple[str, str, bool]]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = (str(path.relative_to(ROOT.parent)), path.read_text(encoding="utf-8"), is_package)
    return modules


def test_imports_run_only_downward_and_in_no_circle():
    problems = layering_problems(package_modules())
    assert not problems, "\n".join(problems)


def test_every_layer_names_a_unit_that_exists():
    units = {unit_of(module) for module in package_modules()}
    assert [unit for layer in LAYERS for unit in layer if unit not in units] == []


def test_the_checker_reports_upward_imports_and_circles():
    modules = {
        "fluxexport": ("fluxexport/__init__.py", "from fluxexport.errors import E\n", True),
        "fluxexport.errors": ("fluxexport/errors.py", "class E(Exception): ...\n", False),
        "fluxexport.low": ("fluxexport/low/__init__.py", "", True),
        "fluxexport.low.a": (
            "fluxexport/low/a.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fluxexport.top import T\n"
            "def f():\n    from ..high import g\n",
            False,
        ),
        "fluxexport.high": ("fluxexport/high.py", "import numpy\nfrom fluxexport.low import a\n", False),
        "fluxexport.top": ("fluxexport/top.py", "from fluxexport import errors, high\n", False),
        "fluxexport.stray": ("fluxexport/stray.py", "", False),
    }
    layers = (("__init__", "errors"), ("low",), ("high",), ("top",))
    problems = layering_problems(modules, layers)
    assert problems == [
        "fluxexport/stray.py: stray is in no layer of LAYERS",
        "fluxexport/low/a.py:5 → fluxexport.high.g: low (layer 1) imports high (layer 2), a higher layer",
        "circle high → low → high: fluxexport/high.py:2 → fluxexport.low.a; fluxexport/low/a.py:5 → fluxexport.high.g",
    ]
    assert {(i.source, i.target) for i in imports_of(modules)} >= {("top", "errors"), ("top", "high")}


def test_the_checker_places_family_parts_in_their_layers():
    modules = {
        "fluxexport.errors": ("fluxexport/errors.py", "", False),
        "fluxexport.families": ("fluxexport/families/__init__.py", "from fluxexport.families import x\n", True),
        "fluxexport.families.x": ("fluxexport/families/x/__init__.py", "", True),
        "fluxexport.families.x.high": ("fluxexport/families/x/high.py", "from fluxexport.top import t\n", False),
        "fluxexport.families.x.low": ("fluxexport/families/x/low.py", "from fluxexport.low import a\n", False),
        "fluxexport.low": ("fluxexport/low.py", "def f(family):\n    return family.part('high')\n", False),
        "fluxexport.high": ("fluxexport/high.py", "def f(family):\n    return family.part('low')\n", False),
        "fluxexport.top": ("fluxexport/top.py", "", False),
    }
    layers = (("errors",), ("families",), ("low",), ("high",), ("top",))
    assert unit_of("fluxexport.families.x.high") == "families.high"
    assert layering_problems(modules, layers) == [
        "fluxexport/families/x/high.py:1 → fluxexport.top.t: families.high (layer 3) imports top (layer 4), a higher "
        "layer",
        "fluxexport/low.py:2 → family.part('high'): low (layer 2) asks a family for its high part (layer 3), a higher "
        "layer",
    ]
