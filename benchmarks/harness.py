"""Shared pieces of the benchmark harness: environment record, timing, percentiles, JSON.

Every benchmark writes one JSON file holding the device, the versions, the configuration and,
per case, the p20/p50/p80 of several timed runs; ratios are taken against a baseline measured
in the same run. Paths in results are recorded relative to the repository (:func:`portable_path`),
never as this machine's absolute paths.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
# Where exploratory runs (``--quick``, custom cases) write unless given ``--out``: git-ignored,
# so they never replace the published results under ``docs/benchmarks/``.
SCRATCH_DIR = ROOT / "benchmarks" / "results" / "tmp"


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a bad count is a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def portable_path(path: str | os.PathLike[str] | None) -> str | None:
    """``path`` as results record it: relative to the repository root when inside it, else
    its last two components (e.g. ``demo/final``), so no machine's absolute paths leak."""
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    try:
        return resolved.relative_to(ROOT).as_posix()
    except ValueError:
        return Path(*resolved.parts[-2:]).as_posix() if len(resolved.parts) > 2 else resolved.name


def device_name(device: str = "cpu") -> str:
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
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "deepspeed", "cpd_mtp", "cut-cross-entropy"):
        try:  # metadata, not import: importing deepspeed alone takes seconds
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"device": device_name(device), "platform": platform.platform(), "versions": versions}


def percentiles(values: list[float]) -> dict[str, float]:
    """p20, p50 and p80 (linear interpolation) of a list of numbers."""
    if len(values) == 1:
        return {"p20": values[0], "p50": values[0], "p80": values[0], "n": 1}
    q = statistics.quantiles(values, n=10, method="inclusive")
    return {"p20": q[1], "p50": statistics.median(values), "p80": q[7], "n": len(values)}


def time_runs(
    fn: Callable[[], None], repeats: int, warmup: int = 1, cuda: bool = False
) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def current_rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_worker(script: Path, case: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run ``script --worker CASE_JSON`` in a fresh process; its last stdout line is JSON."""
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", json.dumps(case)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        return {**case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
