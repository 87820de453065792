"""The wheel: what ``pip wheel .`` builds is a complete package that works outside the checkout.

One wheel is built per session (from a copy of the package sources, so a stale ``build/`` in
the checkout cannot leak into it) and installed with ``pip install --target`` into a temporary
directory. The checks run in a subprocess whose working directory is not the checkout and whose
``PYTHONPATH`` is that directory, so only the installed files can be found.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("demo", "tiny", "small")
ZERO_STAGES = (0, 1, 2, 3)
# What the build reads: the sources and the two metadata files (README.md is the long description).
SOURCES = ("cpd_mtp", "kernels", "pyproject.toml", "setup.cfg", "README.md")
# In a checkout, cpd_mtp.kernels is this file pointing at kernels/; the wheel holds kernels/ itself.
CHECKOUT_SHIM = "cpd_mtp/kernels/__init__.py"

# setuptools >= 70.1 builds wheels itself (no separate `wheel` package needed).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None,
    reason="building a wheel without isolation needs setuptools in the environment",
)


def _pip(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--no-deps", "--no-build-isolation", "-q"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert result.returncode == 0, f"pip {args[0]} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel`` builds from a clean copy of the sources."""
    src = tmp_path_factory.mktemp("src")
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=junk)
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _pip("wheel", str(src), "-w", str(dist), cwd=dist)
    (built,) = dist.glob("cpd_mtp-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the wheel installed with ``pip install --target``."""
    target = tmp_path_factory.mktemp("site")
    _pip("install", "--target", str(target), str(wheel), cwd=wheel.parent)
    return target


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_ships_the_presets_and_deepspeed_configs(wheel: Path) -> None:
    names = _names(wheel)
    expected = {f"cpd_mtp/training/presets/{name}.yaml" for name in PRESETS} | {
        f"cpd_mtp/training/presets/deepspeed/zero{stage}.json" for stage in ZERO_STAGES
    }
    assert expected <= names, sorted(expected - names)


def test_wheel_has_every_package_and_no_top_level_kernels(wheel: Path) -> None:
    names = _names(wheel)
    top_level = {name.split("/", 1)[0] for name in names if "/" in name}
    assert top_level == {"cpd_mtp", wheel.name.split("-py3")[0] + ".dist-info"}, top_level
    assert not any(name.startswith("kernels/") for name in names)
    # Every folder of the source tree with an __init__.py is in the wheel (setup.cfg lists the
    # packages by hand, so a new sub-package must be added there).
    inits = {
        f"cpd_mtp/{path.relative_to(ROOT / 'cpd_mtp').as_posix()}"
        for path in (ROOT / "cpd_mtp").rglob("__init__.py")
    } - {CHECKOUT_SHIM}
    assert inits <= names, sorted(inits - names)
    # The kernels folder is shipped as it is, without the checkout's pointer to it.
    assert CHECKOUT_SHIM not in names
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ would shadow PyPI's kernels"
    sources = {
        f"cpd_mtp/kernels/{path.relative_to(ROOT / 'kernels').as_posix()}"
        for path in (ROOT / "kernels").rglob("*.py")
    }
    assert sources <= names, sorted(sources - names)


def test_wheel_declares_the_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        info = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        entry_points = archive.read(info).decode()
    assert "cpd-mtp = cpd_mtp.cli:main" in entry_points


# Run in the subprocess: the installed package finds its own presets and DeepSpeed JSONs.
_PROBE = """
import json, sys
from pathlib import Path
import cpd_mtp
from cpd_mtp.training.config import load_train_config
from cpd_mtp.training.trainer import deepspeed_config
from cpd_mtp.kernels.ops import row_logprobs_triton  # the kernels, from the wheel's cpd_mtp/kernels/
import cpd_mtp.kernels.ops as kernel_ops
assert kernel_ops.__file__.startswith(str(Path(cpd_mtp.__file__).parent)), kernel_ops.__file__

presets = {}
for name in sys.argv[1].split(","):
    cfg = load_train_config(name)
    presets[name] = {"steps": cfg.run.steps, "rank": cfg.head.rank, "zero": cfg.run.zero_stage}
stages = {}
for stage in range(4):
    cfg = load_train_config("tiny", [f"run.zero_stage={stage}"])
    stages[stage] = deepspeed_config(cfg, on_gpu=False)["zero_optimization"]["stage"]
print(json.dumps({"file": cpd_mtp.__file__, "presets": presets, "stages": stages}))
"""


def test_installed_wheel_loads_presets_outside_the_checkout(
    wheel: Path, installed: Path, tmp_path: Path
) -> None:
    pytest.importorskip("omegaconf", reason="the train extra is not installed")
    pytest.importorskip("deepspeed", reason="the train extra is not installed")
    env = {**os.environ, "PYTHONPATH": str(installed), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, ",".join(PRESETS)],
        cwd=tmp_path,  # not the checkout: nothing is found relative to the source tree
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(installed.resolve()), report["file"]
    assert not Path(report["file"]).resolve().is_relative_to(ROOT), report["file"]
    for name in PRESETS:
        # Each preset is read from the installed file, not the dataclass defaults.
        expected = _preset_values(installed / "cpd_mtp" / "training" / "presets" / f"{name}.yaml")
        got = report["presets"][name]
        assert {k: got[k] for k in expected} == expected, (name, got, expected)
    assert report["stages"] == {str(stage): stage for stage in ZERO_STAGES}


def _preset_values(path: Path) -> dict[str, int]:
    """The preset's own ``run.steps``, ``head.rank`` and ``run.zero_stage``, where it sets them."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path))
    run, head = raw.get("run", {}), raw.get("head", {})
    values = {"steps": run.get("steps"), "rank": head.get("rank"), "zero": run.get("zero_stage")}
    return {k: v for k, v in values.items() if v is not None}


def test_deepspeed_configs_are_valid_json() -> None:
    for stage in ZERO_STAGES:
        path = ROOT / "cpd_mtp" / "training" / "presets" / "deepspeed" / f"zero{stage}.json"
        assert isinstance(json.loads(path.read_text()), dict), path
