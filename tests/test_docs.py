"""The documentation site: it builds with warnings as errors, its examples run, and it covers
every public name.

1. ``mkdocs build --strict`` into a temporary directory: a broken link or anchor, a page
   missing from the nav, or a mkdocstrings reference that does not resolve fails the build.
2. Every ```python block of ``docs/**/*.md`` and ``README.md`` runs, each in a fresh
   namespace, on CPU. A block opts out only by not being ```python (```bash, ```text, ...).
3. Every name in ``cpd_mtp.__all__`` and ``cpd_mtp.ops.__all__`` has its own docstring and a
   ``:::`` entry in the API reference pages.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.md"))
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)  # fmt: skip


def _markdown_files() -> list[Path]:
    return [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]


def _python_blocks() -> list[tuple[str, str]]:
    """(id, code) of every ```python block, ids like ``quickstart.md:42``."""
    blocks = []
    for path in _markdown_files():
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match["info"].strip().split(" ")[0].lower() not in ("python", "py"):
                continue
            line = text.count("\n", 0, match.start()) + 1
            indent = match["indent"]
            body = "".join(
                row[len(indent) :] if row.startswith(indent) else row
                for row in match["body"].splitlines(keepends=True)
            )
            blocks.append((f"{path.relative_to(ROOT)}:{line}", body))
    return blocks


BLOCKS = _python_blocks()


# ----------------------------------------------------------------------------- 1. the build


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason="the docs extra is not installed"
)
def test_site_builds_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    )
    for page in ("index.html", "concepts/index.html", "api/head/index.html", "kernels/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


# ----------------------------------------------------------------------------- 2. examples


def test_examples_were_found() -> None:
    names = {block_id.split(":")[0] for block_id, _ in BLOCKS}
    assert "docs/quickstart.md" in names and "docs/concepts.md" in names, names


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_example_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)  # anything an example writes lands in a temporary directory
    torch.manual_seed(0)
    namespace = {"__name__": "__docs_example__"}
    exec(compile(code, "<docs example>", "exec"), namespace)


# ----------------------------------------------------------------------------- 3. coverage


def _public_names() -> list[tuple[str, str]]:
    import cpd_mtp
    import cpd_mtp.ops

    return [(module.__name__, name) for module in (cpd_mtp, cpd_mtp.ops) for name in module.__all__]


def _attribute_docstring(module_name: str, name: str) -> str | None:
    """The string literal right after ``name = ...`` in the module that defines it."""
    spec = importlib.util.find_spec(module_name)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    body = tree.body
    for node, following in itertools.pairwise(body):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and (
            isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
        ):
            return following.value.value
    return None


@pytest.mark.parametrize(("module_name", "name"), _public_names())
def test_public_name_has_docstring(module_name: str, name: str) -> None:
    obj = getattr(sys.modules[module_name], name)
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        # A dataclass without a docstring gets its signature as __doc__.
        assert doc and not doc.startswith(f"{name}("), f"{module_name}.{name} has no docstring"
    elif callable(obj):
        assert inspect.getdoc(obj), f"{module_name}.{name} has no docstring"
    else:
        doc = _attribute_docstring(module_name, name)
        assert doc, f"{module_name}.{name} needs a docstring (a string literal after it)"


@pytest.mark.parametrize(("module_name", "name"), _public_names())
def test_public_name_in_api_reference(module_name: str, name: str) -> None:
    documented = set()
    for page in API_PAGES:
        documented |= set(re.findall(r"^::: (\S+)", page.read_text(encoding="utf-8"), re.M))
    assert any(entry.rsplit(".", 1)[-1] == name for entry in documented), (
        f"{module_name}.{name} has no ':::' entry in docs/api/*.md"
    )
