"""The fused Triton CP-MTP loss against the other ways of doing the same work.

Every implementation computes mixture_nll(u, weight, log_w, targets) forward and backward:

- ``triton``: ``cpd_mtp.kernels.mixture_nll_triton`` (gradient filtering at its default);
- ``reference``: materialised logits (the oracle);
- ``chunked``: the pure-torch chunked autograd function;
- ``compiled``: ``torch.compile`` of the reference;
- ``cce``: Apple's cut-cross-entropy (``cut_cross_entropy.linear_cross_entropy``) on the
  flattened M = N·n·r rows with ``reduction="none"``, followed by the mixture step, so its
  backward receives the per-row upstream gradient gamma_{t,a} · g_t. Skipped, with the reason
  recorded, when the package (an optional ``bench`` extra) or CUDA is missing.

Each (case, impl) runs in its own process so its peak memory is its own. Reported per case:
p20/p50/p80 of the fwd+bwd time, peak extra memory (GPU: ``max_memory_allocated``; CPU: peak
RSS), and achieved TFLOP/s against the GEMM work of about 8·M·d·V FLOPs per fwd+bwd (2 for the
forward logits, 2 to recompute them, 2 each for dU and dW_U).

    python benchmarks/bench_kernels.py                 # GPU sweep, bf16 (needs CUDA)
    python benchmarks/bench_kernels.py --smoke         # tiny shapes, CPU Triton interpreter

Results: docs/benchmarks/kernels[_smoke].json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ["triton", "reference", "chunked", "compiled", "cce"]
TARGET = {"N": 8192, "n": 4, "r": 8, "V": 32000, "d": 2048, "dtype": "bfloat16"}
GOAL = "H100, bf16, at the target case: peak memory <= 1.2x CCE's and time <= CCE's"
GPU_CASES = [  # (N, n, r, V, d): the target and one-factor sweeps around it
    (8192, 4, 8, 32000, 2048),
    (2048, 4, 8, 32000, 2048),
    (8192, 1, 1, 32000, 2048),
    (8192, 4, 1, 32000, 2048),
    (8192, 4, 4, 32000, 2048),
    (8192, 4, 8, 8000, 2048),
    (8192, 4, 8, 32000, 1024),
]
SMOKE_CASES = [(8, 2, 2, 100, 24), (16, 2, 3, 200, 32)]


def gemm_flops(case: dict[str, Any]) -> float:
    """About 8·M·d·V FLOPs for fwd+bwd without filtering, M = N·n·r."""
    return 8.0 * case["N"] * case["n"] * case["r"] * case["d"] * case["V"]


def _peak_rss_reset() -> None:
    # Writing 5 to clear_refs resets the peak-RSS high-water mark (VmHWM) on Linux.
    Path("/proc/self/clear_refs").write_text("5")


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def build_step(case: dict[str, Any]):
    """The inputs and a fwd+bwd closure for ``case``; raises ImportError for a missing impl."""
    import torch

    from cpd_mtp.ops import mixture_logsumexp, mixture_nll
    from cpd_mtp.ops.reference import row_logprobs_reference

    device, dtype = case["device"], getattr(torch, case["dtype"])
    g = torch.Generator().manual_seed(0)
    n_tokens, n_future, rank, vocab, dim = (case[k] for k in ("N", "n", "r", "V", "d"))
    u = (torch.randn(n_tokens, n_future, rank, dim, generator=g) / dim**0.5).to(device, dtype)
    weight = (torch.randn(vocab, dim, generator=g) / 4).to(device, dtype)
    log_w = torch.log_softmax(torch.randn(n_tokens, rank, generator=g), -1).to(device)
    targets = torch.randint(0, vocab, (n_tokens, n_future), generator=g).to(device)
    leaves = (u.requires_grad_(), weight.requires_grad_(), log_w.requires_grad_())
    impl = case["impl"]

    if impl in ("triton", "reference", "chunked"):

        def loss():
            return mixture_nll(u, weight, log_w, targets, impl=impl)

    elif impl == "compiled":

        def ref_loss(u, weight, log_w, targets):
            return mixture_logsumexp(row_logprobs_reference(u, weight, targets), log_w)[0]

        compiled = torch.compile(ref_loss)

        def loss():
            return compiled(u, weight, log_w, targets)

    elif impl == "cce":
        from cut_cross_entropy import linear_cross_entropy  # optional: the `bench` extra

        if not device.startswith("cuda"):
            raise ImportError("cut-cross-entropy needs CUDA")

        row_targets = targets[:, :, None].expand(-1, -1, rank).reshape(-1)

        def loss():
            ce = linear_cross_entropy(u.reshape(-1, dim), weight, row_targets, reduction="none")
            row_lp = -ce.float().view(n_tokens, n_future, rank)
            return mixture_logsumexp(row_lp, log_w)[0]

    else:
        raise ValueError(f"unknown impl {impl!r}")

    def step() -> None:
        loss().sum().backward()
        for leaf in leaves:
            leaf.grad = None

    return step


def worker(case: dict[str, Any]) -> dict[str, Any]:
    if case.get("interpret"):
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import harness
    import torch

    try:
        step = build_step(case)
    except ImportError as exc:
        return {**case, "skipped": f"{type(exc).__name__}: {exc}"}
    cuda = case["device"].startswith("cuda")
    step()  # warm-up: compilation, allocator pools, autotuning
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _peak_rss_reset()
        base = _vm_kib("VmRSS")
    times = harness.time_runs(step, case["repeats"], warmup=0, cuda=cuda)
    peak = (torch.cuda.max_memory_allocated() if cuda else _vm_kib("VmHWM")) - base
    stats = harness.percentiles(times)
    return {
        **case,
        "time_s": stats,
        "peak_extra_bytes": max(peak, 0),
        "gemm_flops": gemm_flops(case),
        "tflops_p50": gemm_flops(case) / stats["p50"] / 1e12,
    }


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if "time_s" in r]
    cases = list(dict.fromkeys(r["label"] for r in results))
    impls = [i for i in IMPLS if any(r["impl"] == i for r in done)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / max(len(impls), 1)
    metrics = (
        ("fwd+bwd time p50 (s), p20-p80 bars", lambda r: r["time_s"]["p50"]),
        ("peak extra memory (MiB)", lambda r: r["peak_extra_bytes"] / 2**20),
        ("achieved TFLOP/s (8·M·d·V / p50)", lambda r: r["tflops_p50"]),
    )
    for ax, (name, value) in zip(axes, metrics):
        for i, impl in enumerate(impls):
            rows = {r["label"]: r for r in done if r["impl"] == impl}
            xs = [j + i * width for j in range(len(cases))]
            ys = [value(rows[c]) if c in rows else 0.0 for c in cases]
            err = None
            if name.startswith("fwd+bwd"):
                err = [
                    [
                        rows[c]["time_s"]["p50"] - rows[c]["time_s"]["p20"] if c in rows else 0
                        for c in cases
                    ],
                    [
                        rows[c]["time_s"]["p80"] - rows[c]["time_s"]["p50"] if c in rows else 0
                        for c in cases
                    ],
                ]
            ax.bar(xs, ys, width, yerr=err, label=impl)
        ax.set_xticks(
            [j + width * (len(impls) - 1) / 2 for j in range(len(cases))], cases, rotation=20
        )
        ax.set_xlabel("N, n, r, V, d")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def target_verdict(results: list[dict[str, Any]], smoke: bool, device_name: str) -> dict[str, Any]:
    """Where the GPU goal stands: measured ratios at the target case, or pending."""
    label = ",".join(str(TARGET[k]) for k in ("N", "n", "r", "V", "d"))
    rows = {r["impl"]: r for r in results if r["label"] == label and r["dtype"] == TARGET["dtype"]}
    tri, cce = rows.get("triton", {}), rows.get("cce", {})
    if smoke or "time_s" not in tri or "time_s" not in cce:
        return {
            "goal": GOAL,
            "case": TARGET,
            "status": "pending: no GPU was lent when this harness was written; run "
            "`python benchmarks/bench_kernels.py` on an H100 with cut-cross-entropy installed",
        }
    mem_ratio = tri["peak_extra_bytes"] / max(cce["peak_extra_bytes"], 1)
    time_ratio = tri["time_s"]["p50"] / cce["time_s"]["p50"]
    return {
        "goal": GOAL,
        "case": TARGET,
        "device": device_name,
        "memory_ratio_vs_cce": mem_ratio,
        "time_ratio_vs_cce": time_ratio,
        "status": "met" if mem_ratio <= 1.2 and time_ratio <= 1.0 else "not met",
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    parser.add_argument("--cases", nargs="+", help="N,n,r,V,d tuples")
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    if args.repeats is not None and args.repeats < 1:  # `or` below would turn 0 into a default
        parser.error(f"argument --repeats: must be at least 1, got {args.repeats}")

    import harness
    import torch

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        parser.error("the full benchmark needs CUDA; use --smoke on a CPU machine")
    dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    repeats = args.repeats or (5 if args.smoke else 10)
    if args.cases:
        cases = [tuple(int(x) for x in c.split(",")) for c in args.cases]
    else:
        cases = SMOKE_CASES if args.smoke else GPU_CASES
    out = args.out or ROOT / "docs" / "benchmarks" / (
        "kernels_smoke.json" if args.smoke else "kernels.json"
    )
    env = harness.environment(device)
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
                device=device,
                dtype=dtype,
                repeats=repeats,
                interpret=args.smoke,
            )
            row = harness.run_worker(Path(__file__), case)
            results.append(row)
            if "time_s" in row:
                print(
                    f"{label:>26s} {impl:>10s} {row['time_s']['p50'] * 1e3:10.2f} ms "
                    f"{row['peak_extra_bytes'] / 2**20:9.1f} MiB {row['tflops_p50']:9.4f} TFLOP/s"
                )
            else:
                print(f"{label:>26s} {impl:>10s}  {row.get('skipped') or 'ERROR ' + row['error']}")
    payload = {
        **env,
        "benchmark": "mixture_nll fwd+bwd: triton kernels vs reference, chunked, compiled, CCE",
        "mode": "smoke (CPU, Triton interpreter: times are not GPU performance)"
        if args.smoke
        else "gpu",
        "config": {
            "impls": args.impls,
            "dtype": dtype,
            "repeats": repeats,
            "device": device,
            "cases": [list(c) for c in cases],
            "flops_model": "8*M*d*V, M=N*n*r",
            "TRITON_INTERPRET": "1" if args.smoke else os.environ.get("TRITON_INTERPRET", "0"),
        },
        "target": target_verdict(results, args.smoke, env["device"]),
        "results": results,
    }
    harness.write_json(out, payload)
    title = f"mixture_nll fwd+bwd, {dtype}, {env['device']}" + (
        " [smoke: CPU interpreter]" if args.smoke else ""
    )
    plot(results, out.with_suffix(".png"), title)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return payload


if __name__ == "__main__":
    main()
