"""Shared pieces of the benchmark harness: timing, memory, worker processes.

Every benchmark writes one JSON file holding the device, the versions, the configuration and,
per case, the p20/p50/p80 of several timed runs; ratios are taken against a baseline measured
in the same run. The record itself (environment, percentiles, paths relative to the current
directory, JSON) comes from ``cpd_mtp.apps.results``, shared with the rank study.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cpd_mtp.apps.results import (  # noqa: F401 (the benchmarks use them as harness.*)
    device_name,
    environment,
    portable_path,
    write_json,
)
from cpd_mtp.utils.args import positive_int  # noqa: F401
from cpd_mtp.utils.stats import percentiles  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
# Where exploratory runs (``--quick``, custom cases) write unless given ``--out``: git-ignored,
# so they never replace the published results under ``docs/benchmarks/``.
SCRATCH_DIR = ROOT / "benchmarks" / "results" / "tmp"


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


def add_output_arguments(parser: Any, name: str) -> None:
    """``--quick`` (a smoke run) and ``--out``: the published JSON is
    ``docs/benchmarks/<name>.json``; a quick run writes to the scratch folder instead."""
    parser.add_argument("--quick", action="store_true", help="a smoke run, to the scratch dir")
    parser.add_argument("--out", type=Path, default=None, help="the JSON to write")
    parser.set_defaults(benchmark_name=name)


def write_results(args: Any, record: dict[str, Any]) -> Path:
    """Write ``record`` with the environment to ``args.out`` (default: published, or the
    scratch folder for ``--quick``; a quick run never replaces a published file)."""
    name = args.benchmark_name
    out = args.out or (
        SCRATCH_DIR / f"{name}.json"
        if args.quick
        else ROOT / "docs" / "benchmarks" / f"{name}.json"
    )
    if args.quick and Path(out).resolve().is_relative_to((ROOT / "docs").resolve()):
        raise SystemExit("error: a --quick run never writes into docs/: give --out elsewhere")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"environment": environment("cpu"), **record})
    print(f"wrote {out}", flush=True)
    return Path(out)
