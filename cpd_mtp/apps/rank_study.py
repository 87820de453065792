"""The rank study: does rank r beat rank 1, measured end to end on the embedded corpus.

    cpd-mtp bench ranks                  # the default size, about an hour on 2 CPU cores
    cpd-mtp bench ranks --size tiny      # seconds; what the tests run
    cpd-mtp bench ranks --size gpu       # larger models for a GPU

Every configuration trains with the same token budget and seeds through
``cpd_mtp.training.trainer`` (one process each), then is measured on the validation split and
on held-out prompts:

- (a) ``ntp``: plain next-token model, n = 1, r = 1;
- (b) ``n4_r1``: n = 4 with rank 1 (independent heads);
- (c) ``n4_r2``, ``n4_r4``, ``n4_r8``: n = 4 with rank 2, 4, 8;
- (d) ``ft_r1``, ``ft_r4``, ``ft_r8``: the trunk of (a), frozen, with new heads only;
- (e) ``n4_r8_none``, ``n4_r8_importance``: the load-balancing ablation at r = 8 (``switch``
  is ``n4_r8``).

Paths are relative to the current directory (``make bench-ranks`` runs from the repository
root). Outputs under ``--out`` (default ``docs/rank_study``): ``results.json`` with every number and
its config, ``table.md``, and the plots ``joint_nll_vs_rank.png``,
``tokens_per_forward_vs_rank.png``, ``acceptance_by_position.png``, ``expert_usage.png``.
The trained runs (checkpoints, exports, metrics) go under ``--runs`` (default
``runs/rank_study``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cpd_mtp.apps.results import environment, write_json
from cpd_mtp.utils.args import positive_int

# torch is imported where it is used: the command line reads PLAN and SIZES without it.


@dataclass(frozen=True)
class RunSpec:
    """One configuration of the study."""

    name: str
    group: str  # "scratch", "finetune" or "ablation"
    n_future: int
    rank: int
    balance: str = "switch"
    finetune_from: str | None = None  # the run whose trunk is frozen and reused


PLAN = [
    RunSpec("ntp", "scratch", 1, 1),
    RunSpec("n4_r1", "scratch", 4, 1),
    RunSpec("n4_r2", "scratch", 4, 2),
    RunSpec("n4_r4", "scratch", 4, 4),
    RunSpec("n4_r8", "scratch", 4, 8),
    RunSpec("ft_r1", "finetune", 4, 1, finetune_from="ntp"),
    RunSpec("ft_r4", "finetune", 4, 4, finetune_from="ntp"),
    RunSpec("ft_r8", "finetune", 4, 8, finetune_from="ntp"),
    RunSpec("n4_r8_none", "ablation", 4, 8, balance="none"),
    RunSpec("n4_r8_importance", "ablation", 4, 8, balance="importance"),
]

# Training overrides per size; every run of a size gets the same token budget.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "train": [
            *("trunk.hidden_size=32", "trunk.num_layers=2", "trunk.num_heads=2"),
            *("data.vocab_size=300", "data.max_files=40", "data.block_size=32"),
            *("run.micro_batch_size=4", "run.steps=6", "run.eval_every=6", "run.eval_batches=2"),
            *("optim.warmup_steps=2", "optim.lr=1e-2"),
        ],
        "finetune_steps": 4,
        "seeds": 1,
        "prompts": 2,
        "prompt_tokens": 16,
        "new_tokens": 12,
    },
    "default": {
        "train": [
            *("trunk.hidden_size=96", "trunk.num_layers=3", "trunk.num_heads=4"),
            *("data.vocab_size=1024", "data.block_size=128", "run.micro_batch_size=8"),
            *("run.steps=250", "run.eval_every=250", "run.eval_batches=16"),
            *("optim.warmup_steps=25", "optim.lr=3e-3"),
        ],
        "finetune_steps": 125,
        "seeds": 3,
        "prompts": 8,
        "prompt_tokens": 48,
        "new_tokens": 48,
    },
    "gpu": {
        "train": [
            *("trunk.hidden_size=512", "trunk.num_layers=8", "trunk.num_heads=8"),
            *("data.vocab_size=4096", "data.block_size=512", "run.micro_batch_size=32"),
            *("run.steps=3000", "run.eval_every=3000", "run.eval_batches=32", "run.dtype=bf16"),
            *("optim.warmup_steps=200", "optim.lr=1e-3"),
        ],
        "finetune_steps": 1500,
        "seeds": 3,
        "prompts": 32,
        "prompt_tokens": 64,
        "new_tokens": 128,
    },
}


def run_dir(runs: Path, spec: RunSpec, seed: int) -> Path:
    return runs / spec.name / f"seed{seed}"


def train_overrides(spec: RunSpec, seed: int, size: dict[str, Any], runs: Path) -> list[str]:
    """The ``cpd_mtp.training.trainer`` overrides of one run."""
    overrides = [
        *size["train"],
        f"run.out_dir={run_dir(runs, spec, seed)}",
        f"run.seed={seed}",
        f"run.save_every={10**9}",  # one checkpoint, at the end
        "run.progress=false",
        "run.overwrite=true",  # a re-run of the study replaces its own runs
        "run.wandb_mode=disabled",
        f"head.n_future={spec.n_future}",
        f"head.rank={spec.rank}",
        f"head.balance={spec.balance}",
        "head.expert_type=resblock",
    ]
    if spec.finetune_from is not None:
        base = run_dir(runs, next(s for s in PLAN if s.name == spec.finetune_from), seed)
        steps = size["finetune_steps"]
        overrides += [
            f"trunk.init_from={base / 'final'}",
            "trunk.freeze_trunk=true",
            f"run.steps={steps}",
            f"run.eval_every={steps}",
        ]
    return overrides


def train_one(spec: RunSpec, seed: int, size: dict[str, Any], runs: Path) -> dict[str, Any]:
    """Train one run in its own process; its validation metrics and median step time."""
    directory = run_dir(runs, spec, seed)
    cmd = [sys.executable, "-m", "cpd_mtp.training.trainer", "--preset", "demo"]
    cmd += train_overrides(spec, seed, size, runs)
    # A child picks its own rendezvous, whatever a distributed parent set.
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"training {spec.name} seed {seed} failed:\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    val = {k[4:]: v for k, v in records[-1].items() if k.startswith("val/")}
    times = [r["step_time_s"] for r in records[1:]] or [records[0]["step_time_s"]]
    return {"val": val, "step_time_s": statistics.median(times), "steps": len(records)}


def measure_decoding(model_dir: Path, prompts: list[list[int]], new_tokens: int, seed: int) -> dict:
    """Tokens per forward and acceptance (greedy, sampling at T=1) and speedup over HF greedy."""
    import torch

    with torch.no_grad():
        return _measure_decoding(model_dir, prompts, new_tokens, seed)


def _measure_decoding(
    model_dir: Path, prompts: list[list[int]], new_tokens: int, seed: int
) -> dict:
    import torch

    from cpd_mtp.decoding import generate
    from cpd_mtp.decoding.stats import DecodingStats
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    model = CPDMTPForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    result: dict[str, Any] = {}
    for mode in ("greedy", "sample"):
        generator = torch.Generator().manual_seed(seed)
        # No EOS stop: the HF baseline below decodes every token too (min_new_tokens). The
        # study compares the heads' own chains: acceptance per drafted offset, no context.
        outs = [
            generate(
                model,
                torch.tensor([ids]),
                new_tokens,
                do_sample=mode == "sample",
                generator=generator,
                eos_token_id=[],
                draft_tree="chain",
            )
            for ids in prompts
        ]
        stats = DecodingStats.combine(out.stats for out in outs)
        from cpd_mtp.decoding.output import json_rates

        result[mode] = {
            "tokens_per_forward": stats.new_tokens / stats.forwards,
            "acceptance": json_rates(stats.acceptance_rate),
            "time_s": sum(out.wall_time_s for out in outs),
        }
    start = time.perf_counter()
    for ids in prompts:
        x = torch.tensor([ids])
        model.generate(
            x,
            speculative=False,  # HF's own loop, the autoregressive baseline
            attention_mask=torch.ones_like(x),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    ar_time = time.perf_counter() - start
    result["autoregressive_time_s"] = ar_time
    result["greedy"]["speedup"] = ar_time / result["greedy"]["time_s"]
    return result


def summarise(values: list[float]) -> dict[str, float]:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    spread = statistics.stdev(clean) if len(clean) > 1 else 0.0
    return {"mean": statistics.fmean(clean), "std": spread, "n": len(clean)}


def usage_entropy(val: dict[str, float], rank: int) -> float:
    """Entropy (nats) of the mean expert usage; ln r means a uniform split."""
    w = [val[f"expert_usage/{a}"] for a in range(rank)]
    return -sum(p * math.log(p) for p in w if p > 0)


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds of every reported number, per configuration."""
    ntp_times = [r["step_time_s"] for r in runs if r["name"] == "ntp"]
    base_time = statistics.fmean(ntp_times) if ntp_times else None
    rows = []
    for spec in PLAN:
        mine = [r for r in runs if r["name"] == spec.name]
        if mine:
            rows.append(_config_row(spec, mine, base_time))
    return rows


def _config_row(
    spec: RunSpec, mine: list[dict[str, Any]], base_time: float | None
) -> dict[str, Any]:
    """Mean and spread over the seeds ``mine`` of one configuration."""

    def get(f: Callable[[dict[str, Any]], float]) -> dict[str, float]:
        return summarise([f(r) for r in mine])

    def val(key: str) -> dict[str, float]:
        return get(lambda r: r["val"][key])

    def decode(mode: str, key: str) -> dict[str, float]:
        return get(lambda r: r["decode"][mode][key])

    def acceptance(mode: str) -> list[dict[str, float]]:
        return [
            get(lambda r, j=j: r["decode"][mode]["acceptance"][j]) for j in range(spec.n_future - 1)
        ]

    return {
        **asdict(spec),
        "seeds": len(mine),
        "joint_nll_per_target": val("joint_nll_per_target"),
        "next_token_nll": val("next_token_nll"),
        "per_head_nll": [val(f"head_nll/{s}") for s in range(1, spec.n_future + 1)],
        "usage_entropy": get(lambda r: usage_entropy(r["val"], spec.rank)),
        "gate_entropy": val("gate_entropy"),
        "expert_usage": [val(f"expert_usage/{a}") for a in range(spec.rank)],
        "step_time_s": get(lambda r: r["step_time_s"]),
        "step_time_vs_ntp": get(lambda r: r["step_time_s"] / base_time) if base_time else None,
        "greedy_tokens_per_forward": decode("greedy", "tokens_per_forward"),
        "sample_tokens_per_forward": decode("sample", "tokens_per_forward"),
        "greedy_speedup": decode("greedy", "speedup"),
        "greedy_acceptance": acceptance("greedy"),
        "sample_acceptance": acceptance("sample"),
    }


def fmt(stat: dict[str, float] | None, digits: int = 3) -> str:
    if stat is None or stat["n"] == 0:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], machine: str, size: str) -> str:
    lines = [
        f"Rank study, size `{size}`, on {machine}. Mean ± standard deviation over seeds.",
        "",
        "| config | n | r | balance | joint NLL / target | next-token NLL | usage entropy | "
        "step time vs ntp | tok/fwd greedy | tok/fwd sample | greedy speedup | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['n_future']} | {r['rank']} | {r['balance']} | "
            f"{fmt(r['joint_nll_per_target'])} | {fmt(r['next_token_nll'])} | "
            f"{fmt(r['usage_entropy'], 2)} | {fmt(r['step_time_vs_ntp'], 2)} | "
            f"{fmt(r['greedy_tokens_per_forward'], 2)} | {fmt(r['sample_tokens_per_forward'], 2)} | "
            f"{fmt(r['greedy_speedup'], 2)} | {r['seeds']} |"
        )
    lines += [
        "",
        "Acceptance rate per draft position (greedy; sampling at T=1):",
        "",
        "| config | greedy alpha_1..3 | sample alpha_1..3 |",
        "|---|---|---|",
    ]
    for r in rows:
        if r["n_future"] > 1:
            g = ", ".join(fmt(a, 2) for a in r["greedy_acceptance"])
            s = ", ".join(fmt(a, 2) for a in r["sample_acceptance"])
            lines.append(f"| {r['name']} | {g} | {s} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = {
        "scratch (n=4)": [r for r in rows if r["group"] == "scratch" and r["n_future"] == 4],
        "frozen trunk (n=4)": [r for r in rows if r["group"] == "finetune"],
    }

    def errorbar(ax, key, sub=None):
        for label, members in groups.items():
            if not members:
                continue
            xs = [m["rank"] for m in members]
            stats = [m[key] if sub is None else m[key][sub] for m in members]
            means, spreads = [s["mean"] for s in stats], [s["std"] for s in stats]
            ax.errorbar(xs, means, yerr=spreads, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.legend()

    fig, ax = plt.subplots(figsize=(5, 3.6))
    errorbar(ax, "joint_nll_per_target")
    ax.set_ylabel("validation joint NLL per target (nats)")
    paths.append(out / "joint_nll_vs_rank.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=110), plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    keys = ("greedy_tokens_per_forward", "sample_tokens_per_forward")
    for ax, key, title in zip(axes, keys, ("greedy", "sampling, T=1")):
        errorbar(ax, key)
        ax.set_title(title)
    axes[0].set_ylabel("tokens per trunk forward")
    paths.append(out / "tokens_per_forward_vs_rank.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=110), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in rows:
        if r["n_future"] > 1:
            means = [a["mean"] for a in r["greedy_acceptance"]]
            ax.plot(range(1, len(means) + 1), means, marker="o", label=r["name"])
    ax.set_xlabel("draft position j (token t+1+j)")
    ax.set_ylabel("greedy acceptance rate alpha_j")
    ax.set_xticks([1, 2, 3])
    ax.legend(fontsize=7, ncol=2)
    paths.append(out / "acceptance_by_position.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=110), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    eights = [r for r in rows if r["rank"] == 8]
    width = 0.8 / max(len(eights), 1)
    for i, r in enumerate(eights):
        usage = sorted((u["mean"] for u in r["expert_usage"]), reverse=True)
        ax.bar(
            [a + i * width for a in range(8)], usage, width, label=f"{r['name']} ({r['balance']})"
        )
    ax.set_xlabel("expert, sorted by usage")
    ax.set_ylabel("mean gate weight")
    if eights:
        ax.legend(fontsize=7)
    paths.append(out / "expert_usage.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=110), plt.close(fig)
    return paths


def held_out_prompts(size: dict[str, Any], runs: Path) -> list[list[int]]:
    """Token ids of held-out prompts, with the tokenizer the runs trained with."""
    from transformers import AutoTokenizer

    model_dir = run_dir(runs, PLAN[0], 0) / "final"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    from cpd_mtp.training.config import data_config, load_train_config
    from cpd_mtp.training.data import build_corpus

    settings = load_train_config("demo", size["train"]).data
    corpus = build_corpus(data_config(settings, progress=False))
    texts = corpus.held_out_prompts(size["prompts"], prompt_tokens=size["prompt_tokens"])
    return [tokenizer(t).input_ids for t in texts]


def run_study(
    size_name: str,
    out: Path,
    runs: Path | None = None,
    seeds: int | None = None,
    only: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and measure every configuration; write JSON, markdown and plots under ``out``.

    ``seeds`` (default: the size's) must be at least 1. Nothing is written under ``out`` unless
    at least one run finished, so a bad call never replaces published results.
    """
    import torch

    size = SIZES[size_name]
    # ``seeds or default`` would turn an explicit 0 into the default; check instead.
    n_seeds = size["seeds"] if seeds is None else seeds
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    runs = runs if runs is not None else out / "runs"
    plan = [s for s in PLAN if only is None or s.name in only or s.name == "ntp"]
    results, prompts = [], None
    started = time.perf_counter()
    for spec in plan:
        for seed in range(n_seeds):
            t0 = time.perf_counter()
            result = train_one(spec, seed, size, runs)
            if prompts is None:
                prompts = held_out_prompts(size, runs)
            model_dir = run_dir(runs, spec, seed) / "final"
            result["decode"] = measure_decoding(model_dir, prompts, size["new_tokens"], seed)
            results.append({"name": spec.name, "seed": seed, **result})
            val, greedy = result["val"], result["decode"]["greedy"]
            log(
                f"[{time.perf_counter() - started:7.0f} s] {spec.name} seed {seed}: "
                f"joint/target {val['joint_nll_per_target']:.3f}, "
                f"next-token {val['next_token_nll']:.3f}, "
                f"greedy tok/fwd {greedy['tokens_per_forward']:.2f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    if not results:
        raise RuntimeError(f"the study produced no runs; nothing written to {out}")
    rows = aggregate(results)
    out.mkdir(parents=True, exist_ok=True)
    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    payload = {
        **env,
        "size": size_name,
        "size_config": size,
        "seeds": n_seeds,
        "plan": [asdict(s) for s in plan],
        "runs": results,
        "summary": rows,
        "wall_time_s": time.perf_counter() - started,
    }
    write_json(out / "results.json", payload)
    (out / "table.md").write_text(markdown_table(rows, env["device"], size_name))
    plot(rows, out)
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        help="seeds per configuration (at least 1; default: the size's)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[spec.name for spec in PLAN],
        help="a subset of configurations (ntp always runs: the others compare to it)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("docs/rank_study"), help="results: JSON, table, plots"
    )
    parser.add_argument(
        "--runs",
        type=Path,
        default=Path("runs/rank_study"),
        help="the trained runs: checkpoints, exports, metrics",
    )


def run_command(args: argparse.Namespace) -> None:
    payload = run_study(args.size, args.out, args.runs, args.seeds, args.only)
    print((args.out / "table.md").read_text())
    print(f"wrote {args.out} in {payload['wall_time_s'] / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    """``python -m cpd_mtp.apps.rank_study ...`` is ``cpd-mtp bench ranks ...``."""
    parser = argparse.ArgumentParser(prog="cpd-mtp bench ranks")
    add_arguments(parser)
    run_command(parser.parse_args(argv))


if __name__ == "__main__":
    main()
