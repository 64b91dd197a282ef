"""The package layout shows the layers, and lower layers never import upper ones (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bundle"

# Layer of each top-level part of ``bundle``: a module may import its own layer and those below it.
LAYERS = {
    "settings": 0, "io": 0, "limits": 0, "precision": 0,
    "physics": 1,
    "networks": 2, "metrics": 2,
    "recon": 3,
    "transforms": 4,
    "workflows": 5,
    "monailabel": 6, "cli": 6,
}


def _part(module: str) -> str | None:
    """``bundle.physics.geometry`` -> ``physics``; ``None`` for the package root or a non-bundle module."""
    names = module.split(".")
    return names[1] if names[0] == "bundle" and len(names) > 1 else None


def _imports(path: Path) -> set[str]:
    """Every ``bundle...`` module that ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("bundle.")}


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_part_has_a_layer():
    parts = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES} - {"__init__"}
    assert parts <= set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS and docs/architecture.md"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_from_a_layer_above(path):
    own = _part("bundle." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    if own is None:
        return
    upward = sorted(
        name for name in _imports(path) if (part := _part(name)) in LAYERS and LAYERS[part] > LAYERS[own]
    )
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {own}) imports from layers above it: {upward}"


# Longer on purpose, each with its reason (the rule: ~150 lines a class, ~50 a function).
LONGER = {
    ("recon/sampler.py", "sample"): "the sampler is one function whose numbered steps are the algorithm",
    ("recon/classical.py", "tv_reconstruct"): "ADMM's four numbered updates in one loop, as the algorithm reads",
    ("workflows/inference.py", "__init__"): "one argument per setting of configs/inference.json",
    ("recon/inferers.py", "__init__"): "one argument per sampler setting, each range-checked where it is stored",
}


def _code_lines(node: ast.AST) -> int:
    """Lines of ``node`` without the docstrings of it and of the functions and classes inside it."""
    docs = sum(
        sub.body[0].end_lineno - sub.body[0].lineno + 1
        for sub in ast.walk(node)
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and sub.body
        and isinstance(sub.body[0], ast.Expr) and isinstance(sub.body[0].value, ast.Constant)
        and isinstance(sub.body[0].value.value, str)
    )
    return node.end_lineno - node.lineno + 1 - docs


def test_classes_and_functions_stay_small():
    found = []
    for path in MODULES:
        where = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = 160 if isinstance(node, ast.ClassDef) else 50
                if _code_lines(node) > limit and (where, node.name) not in LONGER:
                    found.append(f"{where}:{node.lineno} {node.name}: {_code_lines(node)} lines (limit {limit})")
    assert not found, "split these, or add them to LONGER with the reason: " + "; ".join(found)
