"""The lock (``constraints.txt``): what ``make test`` and ``make demo`` install, exactly.

A fresh machine installs whatever the registry serves that day unless told otherwise; the
Makefile installs through the lock, so it gets what the suite passed with. ``make test-latest``
sets ``CPD_MTP_UNLOCKED=1``: it runs the suite on the newest allowed versions on purpose.
"""

from __future__ import annotations

import os
import re
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
# What the README names as the tested versions.
HEADLINE = ("torch", "transformers", "deepspeed", "triton", "datasets", "kernels")


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        assert match, f"constraints.txt: not an exact pin: {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_the_lock_pins_every_package_exactly_and_no_cuda_package():
    pins = locked()
    assert pins["torch"] == "2.13.0"  # the CPU wheel on disk; no "+cpu" so CUDA builds match
    for name in ("transformers", "kernels", "deepspeed", "triton", "datasets", "pytest"):
        assert name in pins, name
    assert not [name for name in pins if name.startswith("nvidia")]


def test_the_makefile_installs_through_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := constraints.txt" in makefile
    assert "pip install -c $(LOCK) -e '.[all]'" in makefile
    assert re.search(r"^\$\(VENV\)/\.installed: .*\$\(LOCK\)", makefile, re.MULTILINE)


@pytest.mark.skipif(
    os.environ.get("CPD_MTP_UNLOCKED") == "1", reason="make test-latest: newest versions"
)
def test_the_installed_environment_is_the_lock():
    pins = locked()
    # The environment's own site-packages: setuptools puts its vendored copies (packaging,
    # platformdirs, ...) on sys.path once imported, and those are not what pip installed.
    site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist.version
        for dist in metadata.distributions(path=sorted(site))
    }
    wrong = {
        name: (version, installed.get(name))
        for name, version in pins.items()
        if installed.get(name) is None or Version(installed[name]).public != Version(version).public
    }
    assert not wrong, f"installed versions differ from constraints.txt (run make install): {wrong}"


def test_every_locked_version_is_inside_the_ranges_users_get():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    pins = locked()
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == "cpd-mtp" or name not in pins:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])


def test_the_readme_names_the_tested_versions():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    pins = locked()
    for name in HEADLINE:
        assert f"{name} {pins[name]}" in readme, f"README.md does not name {name} {pins[name]}"
