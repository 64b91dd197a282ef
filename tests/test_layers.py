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
