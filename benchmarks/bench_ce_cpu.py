"""Plain cross-entropy on the CPU: ``chunked`` against Cut Cross-Entropy's ``torch_compile``.

At n = 1, r = 1 the CP loss is plain cross-entropy over N rows, so ``cpd_mtp.ops.row_logprobs``
with ``impl="chunked"`` can be timed against Cut Cross-Entropy's ``torch_compile``
implementation (``linear_cross_entropy(e, c, targets, impl="torch_compile")``, which
materialises the whole (N, V) logit matrix in one compiled graph) and against eager
``F.cross_entropy(e @ c.T, targets)`` on the same inputs, all with the sum reduction.

Each repeat times forward + backward of every implementation once, in an order that rotates
from one repeat to the next (interleaved, so a slow spell on a shared machine hits all of
them), after warm-up calls that exclude compilation. The ratio chunked / CCE is taken per
repeat; its median and spread are reported, and a spread wider than ``TRUST_SPREAD`` of the
median is flagged as too wide to trust. ``chunked_v0`` is the chunked implementation as it was
before issue 12, kept here only as the "before" of the comparison. All implementations are
checked against ``reference`` (same loss and gradients) before anything is timed.

    python benchmarks/bench_ce_cpu.py            # N=4096, V=32000, d=256: docs/benchmarks/ce_cpu.json
    python benchmarks/bench_ce_cpu.py --quick    # a small shape, seconds: benchmarks/results/tmp/
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHAPE = {"N": 4096, "V": 32000, "d": 256}
QUICK_SHAPE = {"N": 256, "V": 2000, "d": 64}
IMPLS = ("chunked", "cce_torch_compile", "reference", "chunked_v0")
# A ratio whose p20..p80 range is wider than this fraction of its median is not trusted.
TRUST_SPREAD = 0.10


class _ChunkedV0(torch.autograd.Function):
    """``cpd_mtp.ops.chunked`` before issue 12 (fp32 case), for the before/after comparison only.

    Rows per chunk from a byte budget with three fp32 buffers per row, ``index_select`` of the
    kept rows, softmax recomputed in backward and the one-hot added by advanced indexing.
    """

    @staticmethod
    def forward(ctx, u_rows, weight, row_targets, ignore_index, chunk_rows):
        rows = torch.nonzero(row_targets != ignore_index).squeeze(1)
        picked_targets = row_targets[rows]
        out = torch.zeros(u_rows.shape[0], dtype=torch.float32)
        for start in range(0, rows.shape[0], chunk_rows):
            idx = rows[start : start + chunk_rows]
            tgt = picked_targets[start : start + chunk_rows]
            logits = (u_rows.index_select(0, idx) @ weight.T).to(torch.float32)
            out[idx] = torch.log_softmax(logits, dim=-1).gather(1, tgt[:, None]).squeeze(1)
            del logits
        ctx.save_for_backward(u_rows, weight, rows, picked_targets)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u_rows, weight, rows, picked_targets = ctx.saved_tensors
        chunk_rows = ctx.chunk_rows
        row_grad = grad_out.reshape(-1).to(torch.float32)[rows]
        grad_u = torch.zeros_like(u_rows)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32)
        for start in range(0, rows.shape[0], chunk_rows):
            idx = rows[start : start + chunk_rows]
            tgt = picked_targets[start : start + chunk_rows]
            x = u_rows.index_select(0, idx)
            logits = (x @ weight.T).to(torch.float32)
            g = row_grad[start : start + chunk_rows]
            grad_logits = torch.softmax(logits, dim=-1).mul_(-g[:, None])
            del logits
            grad_logits[torch.arange(idx.shape[0]), tgt] += g
            grad_logits = grad_logits.to(weight.dtype)
            grad_u[idx] = grad_logits @ weight
            grad_w.addmm_(grad_logits.T, x)
            del grad_logits
        return grad_u, grad_w, None, None, None


def make_inputs(n_rows: int, vocab: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n_rows, dim, generator=g) / dim**0.5
    c = torch.randn(vocab, dim, generator=g) / dim**0.5 * 4  # logits of a few units
    targets = torch.randint(0, vocab, (n_rows,), generator=g)
    return e, c, targets


def make_impls(chunk_bytes: int) -> dict[str, Callable]:
    """Each maps (e, c, targets) to the summed cross-entropy, differentiable in e and c."""
    from cut_cross_entropy import linear_cross_entropy

    from cpd_mtp import ops
    from cpd_mtp.ops.chunked import chunk_rows_for_budget

    def chunked(e, c, targets):
        lp = ops.row_logprobs(
            e[:, None, None, :], c, targets[:, None], impl="chunked", chunk_bytes=chunk_bytes
        )
        return -lp.sum()

    def chunked_v0(e, c, targets):
        rows = chunk_rows_for_budget(c.shape[0], chunk_bytes)
        return -_ChunkedV0.apply(e, c, targets, -100, rows).sum()

    def cce_torch_compile(e, c, targets):
        return linear_cross_entropy(e, c, targets, impl="torch_compile", reduction="sum")

    def reference(e, c, targets):
        return F.cross_entropy(e @ c.T, targets, reduction="sum")

    return {
        "chunked": chunked,
        "cce_torch_compile": cce_torch_compile,
        "reference": reference,
        "chunked_v0": chunked_v0,
    }


def fwd_bwd(fn: Callable, e, c, targets):
    e = e.detach().requires_grad_()
    c = c.detach().requires_grad_()
    loss = fn(e, c, targets)
    loss.backward()
    return loss.detach(), e.grad, c.grad


def check_agreement(impls: dict[str, Callable], e, c, targets) -> dict[str, float]:
    """Assert every implementation gives reference's loss and gradients; return max errors."""
    want = fwd_bwd(impls["reference"], e, c, targets)
    errors = {}
    for name, fn in impls.items():
        got = fwd_bwd(fn, e, c, targets)
        for label, a, b in zip(("loss", "grad_e", "grad_c"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{name} {label}")
        errors[name] = max((a - b).abs().max().item() for a, b in zip(got, want))
    return errors


def ratio_summary(ratios: list[float]) -> dict[str, Any]:
    stats = harness.percentiles(ratios)
    spread = (stats["p80"] - stats["p20"]) / stats["p50"]
    return {
        "per_repeat": ratios,
        **stats,
        "min": min(ratios),
        "max": max(ratios),
        "relative_spread_p20_p80": spread,
        "too_wide_to_trust": spread > TRUST_SPREAD,
    }


def default_out(args: argparse.Namespace) -> Path:
    """Only the default run writes the published ``docs/benchmarks/ce_cpu.json``."""
    if args.quick:
        return harness.SCRATCH_DIR / "ce_cpu.json"
    return ROOT / "docs" / "benchmarks" / "ce_cpu.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small shape (seconds)")
    parser.add_argument("--repeats", type=harness.positive_int, default=5)
    parser.add_argument("--warmup", type=harness.positive_int, default=2)
    parser.add_argument("--chunk-bytes", type=harness.positive_int, default=64 * 2**20)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default: docs/benchmarks/ce_cpu.json, or "
        "benchmarks/results/tmp/ce_cpu.json with --quick)",
    )
    args = parser.parse_args(argv)
    args.out = default_out(args) if args.out is None else args.out
    shape = QUICK_SHAPE if args.quick else DEFAULT_SHAPE
    env = harness.environment("cpu")
    load_before = os.getloadavg()
    e, c, targets = make_inputs(shape["N"], shape["V"], shape["d"])
    impls = make_impls(args.chunk_bytes)
    max_errors = check_agreement(impls, e, c, targets)  # also the first warm-up (compiles)
    for _ in range(args.warmup):
        for fn in impls.values():
            fwd_bwd(fn, e, c, targets)
    names = list(impls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            start = time.perf_counter()
            fwd_bwd(impls[name], e, c, targets)
            times[name].append(time.perf_counter() - start)
        print(
            f"repeat {repeat + 1}/{args.repeats}: "
            + "  ".join(f"{n} {times[n][-1]:.3f} s" for n in names),
            flush=True,
        )
    ratios = {
        "chunked_vs_cce_torch_compile": [
            a / b for a, b in zip(times["chunked"], times["cce_torch_compile"])
        ],
        "chunked_vs_reference": [a / b for a, b in zip(times["chunked"], times["reference"])],
        "chunked_vs_chunked_v0": [a / b for a, b in zip(times["chunked"], times["chunked_v0"])],
        "chunked_v0_vs_cce_torch_compile": [
            a / b for a, b in zip(times["chunked_v0"], times["cce_torch_compile"])
        ],
    }
    summary = {key: ratio_summary(values) for key, values in ratios.items()}
    for key, row in summary.items():
        flag = "  (spread too wide to trust)" if row["too_wide_to_trust"] else ""
        print(
            f"{key}: median {row['p50']:.3f}, p20..p80 {row['p20']:.3f}..{row['p80']:.3f}, "
            f"min..max {row['min']:.3f}..{row['max']:.3f}{flag}"
        )
    config = vars(args) | shape | {"out": harness.portable_path(args.out), "dtype": "float32"}
    payload = {
        **env,
        "benchmark": "cross-entropy fwd+bwd (sum), interleaved repeats",
        "config": config,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "max_abs_error_vs_reference": max_errors,
        "time_s": {name: {**harness.percentiles(v), "per_repeat": v} for name, v in times.items()},
        "ratios": summary,
        "trust_spread": TRUST_SPREAD,
    }
    harness.write_json(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
