"""The documentation site: it builds with warnings as errors, its examples run, and it covers
every public name.

1. ``mkdocs build --strict`` into a temporary directory: a broken link or anchor, a page
   missing from the nav, or a mkdocstrings reference that does not resolve fails the build.
2. Every ```python block of ``docs/**/*.md`` and ``README.md`` runs, each in a fresh
   namespace, on CPU. A block opts out only by not being ```python (```bash, ```text, ...).
3. Every name in ``cpd_mtp.__all__`` and ``cpd_mtp.ops.__all__`` has its own docstring and a
   ``:::`` entry in the API reference pages.
4. The docs match the tree: every dotted ``cpd_mtp.x`` name and every ``cpd_mtp/...`` path they
   mention exists, nothing cites the design notes, and the README's layout table and the
   architecture page name every sub-package.
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
# A fenced block: its indentation, its info string (```python), its body, and the closing fence
# at the same indentation.
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


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
    pages = ("index.html", "concepts/index.html", "architecture/index.html", "api/head/index.html")
    for page in (*pages, "kernels/index.html"):
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
    """The string literal right after ``name = ...`` in the module that defines it, following
    ``from module import name`` re-exports (a package's ``__init__`` re-exports its modules')."""
    spec = importlib.util.find_spec(module_name)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    body = tree.body
    for node, following in itertools.pairwise(body):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and (
            isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
        ):
            return following.value.value
    for node in body:
        imported = isinstance(node, ast.ImportFrom) and node.module and node.level == 0
        if imported and any((alias.asname or alias.name) == name for alias in node.names):
            return _attribute_docstring(node.module, name)
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


# ----------------------------------------------------------------------------- 4. the tree

DOTTED = re.compile(r"\bcpd_mtp(?:\.[A-Za-z_]\w*)+")
# A repository path in a code span: `cpd_mtp/training/presets/demo.yaml`, `kernels/`, ...
PATH = re.compile(r"`((?:cpd_mtp|kernels|benchmarks|scripts|tests)/[\w./-]*)`")


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` is a module, or an attribute reached from the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise  # a dependency of an existing module is missing: not a stale name
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _mentions(pattern: re.Pattern[str]) -> dict[str, set[str]]:
    """Each match of ``pattern`` in the markdown files, with the files that mention it."""
    found: dict[str, set[str]] = {}
    for path in _markdown_files():
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            name = match[1] if pattern.groups else match[0]
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_dotted_names_in_docs_exist() -> None:
    stale = {name: files for name, files in _mentions(DOTTED).items() if not _resolves(name)}
    assert not stale, f"names the docs mention that do not exist: {stale}"


def test_repository_paths_in_docs_exist() -> None:
    # Outputs of runs and benchmarks (results/tmp/) are not part of the tree.
    mentions = _mentions(PATH).items()
    stale = {p: f for p, f in mentions if "/tmp/" not in p and not (ROOT / p).exists()}
    assert not stale, f"paths the docs mention that do not exist: {stale}"


def test_docs_do_not_cite_design_notes() -> None:
    for path in _markdown_files():
        text = path.read_text(encoding="utf-8")
        assert "DESIGN" not in text and "§" not in text, path


def test_layout_names_every_subpackage() -> None:
    folders = {
        f"cpd_mtp/{init.parent.relative_to(ROOT / 'cpd_mtp').as_posix()}/"
        for init in (ROOT / "cpd_mtp").glob("*/__init__.py")
        if init.parent.name != "kernels"  # the checkout's pointer to kernels/
    } | {"kernels/"}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout") :]
    architecture = (DOCS / "architecture.md").read_text(encoding="utf-8")
    for folder in sorted(folders):
        assert f"`{folder}`" in layout, f"README.md's layout table lacks {folder}"
        short = folder.removeprefix("cpd_mtp/")
        assert f"`{folder}`" in architecture or f"`{short}`" in architecture, (
            f"docs/architecture.md lacks {folder}"
        )
