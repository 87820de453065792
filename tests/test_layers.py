"""The package's layers import downward only, as ``docs/architecture.md`` draws them.

Every ``import`` and ``from ... import`` of every module under ``cpd_mtp/`` (also those inside
functions) is read with ``ast``; a module may import its own layer and the layers below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cpd_mtp"
# Bottom to top; a layer's number is its height. hf, decoding and training are one tier in the
# drawing; within it decoding sits below hf (generation wraps the decoder) and training on top.
LAYERS = {
    "utils": 0,
    "kernels": 1,
    "ops": 2,
    "config": 3,
    "experts": 3,
    "fusion": 3,
    "balance": 3,
    "head": 3,
    "metrics": 3,
    "decoding": 4,
    "hf": 5,
    "training": 6,
    "apps": 7,
    "cli": 8,
}


def layer_of(module: str) -> str | None:
    """The layer of a ``cpd_mtp...`` module name, None for other packages and the package root."""
    parts = module.split(".")
    if parts[0] != "cpd_mtp" or len(parts) < 2:
        return None
    return parts[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.stem != "__init__")


def test_every_layer_is_listed():
    on_disk = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES}
    assert on_disk - {"__main__"} <= set(LAYERS), on_disk - set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_downward_only(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    upward = [
        f"{path.relative_to(PACKAGE)}:{line} imports {module}"
        for line, module in imports_of(path)
        if (target := layer_of(module)) in LAYERS and LAYERS[target] > LAYERS[own]
    ]
    assert not upward, upward


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check is not vacuous: a training module importing the cli is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def main():\n    from cpd_mtp.cli import main\n")
    assert [(layer_of(m), LAYERS[layer_of(m)]) for _, m in imports_of(bad)] == [("cli", 8)]
    assert LAYERS["cli"] > LAYERS["training"]
