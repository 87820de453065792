"""What every program's results share: argument types, the environment record, paths, JSON.

Results record paths relative to the current directory (:func:`portable_path`; the Makefile
runs from the repository root), never this machine's absolute paths.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

from cpd_mtp.utils.files import atomic_write_text

# Versions recorded with every result (from package metadata: importing deepspeed takes seconds).
RECORDED_PACKAGES = ("triton", "transformers", "deepspeed", "cpd_mtp", "cut-cross-entropy")


def portable_path(path: str | os.PathLike[str] | None) -> str | None:
    """``path`` as results record it: relative to the current directory when inside it, else
    its last two components (e.g. ``demo/final``), so no machine's absolute paths leak."""
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(*resolved.parts[-2:]).as_posix() if len(resolved.parts) > 2 else resolved.name


def device_name(device: str = "cpu") -> str:
    """The GPU's name, or the CPU model with its core and torch thread counts."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment(device: str = "cpu") -> dict[str, Any]:
    """The device, the platform and the versions of the packages that set the numbers."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"device": device_name(device), "platform": platform.platform(), "versions": versions}


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically (a kill leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
