"""Forward+backward time and peak extra memory of the mixture loss implementations.

Each (case, impl) runs in its own process so that its peak memory is its own. Results of the
default sweep go to ``docs/benchmarks/loss.json`` and ``docs/benchmarks/loss.png``; ``--quick``
and ``--cases`` runs go to ``benchmarks/results/tmp/`` (git-ignored) unless ``--out`` is given.
Times and memory are also given as ratios against ``reference`` measured in the same run.

    python benchmarks/bench_loss.py                      # the default sweep on this machine
    python benchmarks/bench_loss.py --quick              # tiny shapes, seconds
    python benchmarks/bench_loss.py --impls reference chunked --cases 1024,4,8,16000,256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CASES = [  # (N, n, r, V, d)
    (1024, 4, 1, 16000, 256),
    (1024, 4, 4, 16000, 256),
    (1024, 4, 8, 4000, 256),
    (1024, 4, 8, 16000, 256),
]
QUICK_CASES = [(64, 2, 2, 500, 32), (64, 4, 4, 1000, 32)]


def reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets the peak-RSS high-water mark (VmHWM) on Linux.
    Path("/proc/self/clear_refs").write_text("5")


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return harness.peak_rss_bytes()


def worker(case: dict[str, Any]) -> dict[str, Any]:
    from cpd_mtp import ops

    device = case["device"]
    dtype = getattr(torch, case["dtype"])
    g = torch.Generator(device="cpu").manual_seed(0)
    n_tokens, n_future, rank, vocab, dim = (case[k] for k in ("N", "n", "r", "V", "d"))
    u = (torch.randn(n_tokens, n_future, rank, dim, generator=g) / dim**0.5).to(device, dtype)
    weight = torch.randn(vocab, dim, generator=g).to(device, dtype)
    log_w = torch.log_softmax(torch.randn(n_tokens, rank, generator=g), -1).to(device, dtype)
    targets = torch.randint(0, vocab, (n_tokens, n_future), generator=g).to(device)
    for leaf in (u, weight, log_w):
        leaf.requires_grad_()

    def step() -> None:
        nll = ops.mixture_nll(u, weight, log_w, targets, impl=case["impl"])
        nll.sum().backward()
        for leaf in (u, weight, log_w):
            leaf.grad = None

    cuda = device.startswith("cuda")
    # The peak covers the first call too: after it the allocator keeps freed blocks, so a later
    # call's work buffers would no longer raise the process's footprint.
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = harness.current_rss_bytes()
    times = harness.time_runs(step, case["repeats"], warmup=1, cuda=cuda)
    peak = (torch.cuda.max_memory_allocated() if cuda else vm_hwm_bytes()) - base
    return {**case, "time_s": harness.percentiles(times), "peak_extra_bytes": max(peak, 0)}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({r["label"] for r in results}, key=lambda s: [int(x) for x in s.split(",")])
    impls = sorted({r["impl"] for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        rows = {r["label"]: r for r in results if r["impl"] == impl and "error" not in r}
        xs = [j + i * width for j in range(len(cases))]
        axes[0].bar(
            xs, [rows[c]["time_s"]["p50"] if c in rows else 0 for c in cases], width, label=impl
        )
        axes[1].bar(
            xs,
            [rows[c]["peak_extra_bytes"] / 2**20 if c in rows else 0 for c in cases],
            width,
            label=impl,
        )
    for ax, title in zip(axes, ("fwd+bwd time, median (s)", "peak extra memory (MiB)")):
        ax.set_xticks(
            [j + width * (len(impls) - 1) / 2 for j in range(len(cases))], cases, rotation=20
        )
        ax.set_xlabel("N, n, r, V, d")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"mixture_nll on {results[0]['device_name']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_out(args: argparse.Namespace) -> Path:
    """Only the default sweep writes the published ``docs/benchmarks/loss.json``."""
    if args.quick or args.cases:
        return harness.SCRATCH_DIR / "loss.json"
    return ROOT / "docs" / "benchmarks" / "loss.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    parser.add_argument("--cases", nargs="+", help="N,n,r,V,d tuples")
    parser.add_argument("--impls", nargs="+", default=["reference", "chunked"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=harness.positive_int, default=5)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default: docs/benchmarks/loss.json for the default "
        "sweep, benchmarks/results/tmp/loss.json otherwise)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    args.out = default_out(args) if args.out is None else args.out
    if args.cases:
        cases = [tuple(int(x) for x in c.split(",")) for c in args.cases]
    else:
        cases = QUICK_CASES if args.quick else DEFAULT_CASES
    env = harness.environment(args.device)
    results = []
    for n_tokens, n_future, rank, vocab, dim in cases:
        label = f"{n_tokens},{n_future},{rank},{vocab},{dim}"
        for impl in args.impls:
            case = dict(
                N=n_tokens,
                n=n_future,
                r=rank,
                V=vocab,
                d=dim,
                impl=impl,
                label=label,
                device=args.device,
                dtype=args.dtype,
                repeats=args.repeats,
            )
            row = harness.run_worker(Path(__file__), case)
            row["device_name"] = env["device"]
            results.append(row)
            if "error" in row:
                print(f"{label:>24s} {impl:>10s}  ERROR {row['error']}")
            else:
                print(
                    f"{label:>24s} {impl:>10s}  {row['time_s']['p50'] * 1e3:9.1f} ms  "
                    f"{row['peak_extra_bytes'] / 2**20:9.1f} MiB"
                )
    for row in results:  # ratios against reference from the same run
        base = next(
            (r for r in results if r["label"] == row["label"] and r["impl"] == "reference"), None
        )
        if base and "error" not in base and "error" not in row:
            row["time_ratio_vs_reference"] = row["time_s"]["p50"] / base["time_s"]["p50"]
            row["memory_ratio_vs_reference"] = row["peak_extra_bytes"] / max(
                base["peak_extra_bytes"], 1
            )
    config = vars(args) | {"out": harness.portable_path(args.out)}
    payload = {**env, "benchmark": "mixture_nll fwd+bwd", "config": config, "results": results}
    harness.write_json(args.out, payload)
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return payload


if __name__ == "__main__":
    main()
