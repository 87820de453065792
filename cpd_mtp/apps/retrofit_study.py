"""The retrofit study: does a rank-r head draft better than rank 1 on a real pretrained model?

For one model (SmolLM2-135M-Instruct by default), heads-only retrofits in base mode
(``cpd_mtp.training.retrofit``) at n = 4 for every rank in ``--ranks``, every distillation in
``--distill`` and every seed in ``--seeds``, all at the same token budget. Each trained head is
measured on held-out code prompts (standard-library files outside the training split) by
``cpd_mtp.decoding.measure.measure_retrofit``: tokens per forward and acceptance per draft
position, greedy and sampled, and the greedy wall clock against the original model's Hugging
Face ``generate`` in the same run.

Order: the configurations of each seed run in a different order (the first seed as listed, the
next reversed, ...), so a drift of the machine during the study does not favour a rank or a
distillation; each measurement interleaves the two decoders prompt by prompt.

    python -m cpd_mtp.apps.retrofit_study                  # the published study (docs/)
    python -m cpd_mtp.apps.retrofit_study --quick          # a smoke run, to runs/ only

Results go to ``results.json``, ``table.md`` and plots in ``--out`` (default
``docs/retrofit_study``; ``--quick`` defaults elsewhere and never writes into ``docs/``). The
JSON is rewritten after every configuration: a killed study keeps what it finished, and a rerun
with the same settings skips it.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from cpd_mtp.apps.results import environment, portable_path, write_json
from cpd_mtp.utils.args import positive_int

DISTILLS = ("none", "generated", "kl")
PUBLISHED_DIR = Path("docs") / "retrofit_study"
QUICK_DIR = Path("runs") / "retrofit_study_quick" / "results"


# ---------------------------------------------------------------------- plan
def plan(ranks: list[int], distills: list[str], seeds: list[int]) -> list[tuple[int, str, int]]:
    """(seed, distill, rank) in run order: each seed's configurations in the order listed,
    reversed for every other seed, so a drift over time biases no configuration."""
    order = []
    for index, seed in enumerate(seeds):
        configs = list(itertools.product(distills, ranks))
        if index % 2:
            configs.reverse()
        order += [(seed, distill, rank) for distill, rank in configs]
    return order


def run_name(seed: int, distill: str, rank: int) -> str:
    return f"r{rank}-{distill}-s{seed}"


def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What fixes the results: a rerun skips finished configurations only when these agree."""
    return {
        "model": portable_path(args.model),
        "n_future": args.n_future,
        "tokens": args.tokens,
        "draft_vocab": args.draft_vocab,
        "block_size": args.block_size,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "expert_type": args.expert_type,
        "max_files": args.max_files,
        "prompts": args.prompts,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "temperature": args.temperature,
        "repeats": args.repeats,
    }


# ---------------------------------------------------------------------- one configuration
def retrofit_config(args: argparse.Namespace, seed: int, distill: str, rank: int):
    from cpd_mtp.training.config import load_retrofit_config

    return load_retrofit_config(
        {
            "model.path": str(args.model),
            "run.out_dir": str(args.work_dir / run_name(seed, distill, rank)),
            "head.n_future": args.n_future,
            "head.rank": rank,
            "head.draft_vocab_size": args.draft_vocab,
            "head.expert_type": args.expert_type,
            "data.tokens": args.tokens,
            "data.distill": distill,
            "data.block_size": args.block_size,
            "data.epochs": args.epochs,
            "data.max_files": args.max_files,
            "run.seed": seed,
            "run.micro_batch_size": args.batch_size,
            "optim.lr": args.lr,
            "run.eval_every": 10**9,  # validation at the end only
            "run.save_every": 10**9,
            "run.overwrite": True,  # the study's own scratch folders
            "run.measure_prompts": 0,  # the study measures every head itself
            "run.progress": args.progress,
        }
    )


def train_and_measure(
    args: argparse.Namespace,
    base: tuple[Any, Any],
    prompts: list[torch.Tensor],
    seed: int,
    distill: str,
    rank: int,
) -> dict[str, Any]:
    """Retrofit one head, load its export, measure it; one record of ``results.json``."""
    from cpd_mtp.decoding.measure import measure_retrofit
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM
    from cpd_mtp.training.retrofit import RetrofitTrainer

    cfg = retrofit_config(args, seed, distill, rank)
    start = time.perf_counter()
    trainer = RetrofitTrainer(cfg, base=base)
    try:
        val = trainer.train()
    finally:
        trainer.close()
    seconds = time.perf_counter() - start
    final = Path(cfg.run.out_dir) / "final"
    model = CPDMTPForCausalLM.from_pretrained(final, base_model=base[0]).eval()
    measured = measure_retrofit(
        model,
        base[0],
        prompts,
        args.new_tokens,
        temperature=args.temperature,
        repeats=args.repeats,
        seed=seed,
    )
    del model
    gc.collect()
    return {
        "name": run_name(seed, distill, rank),
        "seed": seed,
        "distill": distill,
        "rank": rank,
        "train_tokens_per_s": trainer.tokens_per_s,
        "data_seconds": trainer.cache_time_s,
        "run_seconds": seconds,
        "validation": val,
        **measured,
    }


# ---------------------------------------------------------------------- summaries
def _mean_and_range(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def _mean_rates(group: list[dict[str, Any]], mode: str, positions: int) -> list[float | None]:
    """Mean acceptance per draft position over seeds (None where no seed verified it)."""
    means = []
    for j in range(positions):
        rates = [r[mode]["acceptance_per_position"][j] for r in group]
        rates = [rate for rate in rates if rate is not None]
        means.append(statistics.fmean(rates) if rates else None)
    return means


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (distill, rank): mean and range over seeds of the headline numbers."""
    rows = []
    keys = sorted({(r["distill"], r["rank"]) for r in runs}, key=lambda k: (k[0], k[1]))
    for distill, rank in keys:
        group = [r for r in runs if (r["distill"], r["rank"]) == (distill, rank)]
        row: dict[str, Any] = {"distill": distill, "rank": rank, "seeds": len(group)}
        row["greedy_tpf"] = _mean_and_range([r["greedy"]["tokens_per_forward"] for r in group])
        if all("sampled" in r for r in group):
            row["sampled_tpf"] = _mean_and_range(
                [r["sampled"]["tokens_per_forward"] for r in group]
            )
        row["speedup"] = _mean_and_range([r["greedy"]["speedup"]["median"] for r in group])
        row["identical"] = all(r["greedy"]["identical"] for r in group)
        row["train_tokens_per_s"] = _mean_and_range([r["train_tokens_per_s"] for r in group])
        positions = len(group[0]["greedy"]["acceptance_per_position"])
        row["greedy_acceptance"] = _mean_rates(group, "greedy", positions)
        if "sampled_tpf" in row:
            row["sampled_acceptance"] = _mean_rates(group, "sampled", positions)
        rows.append(row)
    return rows


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The configuration with the most greedy tokens per forward, and its margin over the
    runner-up against the seeds' spread (the larger half-range of the two)."""
    ranked = sorted(rows, key=lambda row: row["greedy_tpf"]["mean"], reverse=True)
    best = ranked[0]
    result: dict[str, Any] = {"best": {k: best[k] for k in ("distill", "rank", "greedy_tpf")}}
    if len(ranked) > 1:
        second = ranked[1]
        margin = best["greedy_tpf"]["mean"] - second["greedy_tpf"]["mean"]
        half = max(
            (row["greedy_tpf"]["max"] - row["greedy_tpf"]["min"]) / 2 for row in (best, second)
        )
        result |= {
            "runner_up": {k: second[k] for k in ("distill", "rank", "greedy_tpf")},
            "margin": margin,
            "seed_half_range": half,
            "beyond_seed_spread": margin > half,
        }
    # Rank 1 against the best rank > 1 of the same distillation: the paper's claim.
    claims = {}
    for distill in sorted({row["distill"] for row in rows}):
        own = [row for row in rows if row["distill"] == distill]
        one = [row for row in own if row["rank"] == 1]
        more = [row for row in own if row["rank"] > 1]
        if one and more:
            top = max(more, key=lambda row: row["greedy_tpf"]["mean"])
            claims[distill] = {
                "rank1_greedy_tpf": one[0]["greedy_tpf"]["mean"],
                "best_rank": top["rank"],
                "best_greedy_tpf": top["greedy_tpf"]["mean"],
                "gain": top["greedy_tpf"]["mean"] - one[0]["greedy_tpf"]["mean"],
            }
    result["rank_gain_by_distill"] = claims
    return result


def _fmt(stat: dict[str, float] | None, digits: int = 2) -> str:
    if stat is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"


def markdown_table(rows: list[dict[str, Any]], machine: str, settings: dict[str, Any]) -> str:
    lines = [
        f"Retrofit study: {settings['model']}, n = {settings['n_future']}, heads only, "
        f"{settings['tokens']:,} training tokens per head, draft vocabulary "
        f"{settings['draft_vocab']}, {settings['prompts']} held-out prompts x "
        f"{settings['new_tokens']} new tokens. Machine: {machine}.",
        "",
        "Mean over seeds [min, max]. tpf: tokens per forward. Speedup: the original model's HF "
        "greedy `generate` time over speculative decoding's, median over prompts.",
        "",
        "| distill | r | greedy tpf | sampled tpf (T) | greedy acceptance per position | "
        "speedup vs HF greedy | identical | train tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        from cpd_mtp.decoding.output import format_rates

        accept = format_rates(row["greedy_acceptance"])
        lines.append(
            f"| {row['distill']} | {row['rank']} | {_fmt(row['greedy_tpf'])} | "
            f"{_fmt(row.get('sampled_tpf'))} | {accept} | {_fmt(row['speedup'])}x | "
            f"{'yes' if row['identical'] else 'NO'} | {_fmt(row['train_tokens_per_s'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """tokens per forward against rank (greedy and sampled), and acceptance by position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in zip(axes, ("greedy_tpf", "sampled_tpf"), ("greedy", "sampled")):
        for distill in DISTILLS:
            own = [row for row in rows if row["distill"] == distill and key in row]
            if not own:
                continue
            ranks = [row["rank"] for row in own]
            mean = [row[key]["mean"] for row in own]
            low = [row[key]["mean"] - row[key]["min"] for row in own]
            high = [row[key]["max"] - row[key]["mean"] for row in own]
            ax.errorbar(ranks, mean, yerr=[low, high], marker="o", capsize=3, label=distill)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_title(f"tokens per forward ({title})")
        ax.grid(alpha=0.3)
    axes[0].legend(title="distill")
    fig.tight_layout()
    paths.append(out / "tokens_per_forward_vs_rank.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(DISTILLS), figsize=(12, 3.6), sharey=True)
    for ax, distill in zip(axes, DISTILLS):
        for row in (row for row in rows if row["distill"] == distill):
            accept = row["greedy_acceptance"]
            values = [float("nan") if a is None else a for a in accept]
            ax.plot(range(2, len(accept) + 2), values, marker="o", label=f"r={row['rank']}")
        ax.set_title(f"greedy acceptance, distill={distill}")
        ax.set_xlabel("drafted offset")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    paths.append(out / "acceptance_by_position.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_results(out: Path, payload: dict[str, Any], with_plots: bool) -> None:
    rows = aggregate(payload["runs"])
    payload["summary"] = rows
    payload["verdict"] = verdict(rows) if rows else None
    write_json(out / "results.json", payload)
    from cpd_mtp.utils.files import atomic_write_text

    atomic_write_text(
        out / "table.md",
        markdown_table(rows, payload["environment"]["device"], payload["settings"]),
    )
    if with_plots and rows:
        plot(rows, out)


# ---------------------------------------------------------------------- the study
def held_out_prompts(cfg: Any, tokenizer: Any, n: int, prompt_tokens: int) -> list[torch.Tensor]:
    """``held_out_prompt_ids`` with its error as this program's one-line exit."""
    from cpd_mtp.training.retrofit import held_out_prompt_ids

    try:
        return held_out_prompt_ids(cfg, tokenizer, n, prompt_tokens)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    from cpd_mtp.hf.loading import load_causal_lm

    out: Path = args.out
    settings = study_settings(args)
    payload: dict[str, Any] = {
        "environment": environment("cpu"),
        "settings": settings,
        "runs": [],
    }
    previous = out / "results.json"
    if previous.exists() and not args.restart:
        import json

        old = json.loads(previous.read_text())
        if old.get("settings") == settings:
            payload["runs"] = old["runs"]
            print(f"continuing {previous}: {len(payload['runs'])} configurations done")
        else:
            print(f"{previous} holds a study with other settings: it will be replaced")
    done = {run["name"] for run in payload["runs"]}

    base = load_causal_lm(args.model)
    base[0].eval()
    # Every run splits the documents alike: any configuration's split gives the prompts.
    split = retrofit_config(args, 0, "none", 1)
    prompts = held_out_prompts(split, base[1], args.prompts, args.prompt_tokens)
    order = [c for c in plan(args.ranks, args.distill, args.seeds) if run_name(*c) not in done]
    started = time.perf_counter()
    for index, (seed, distill, rank) in enumerate(order):
        name = run_name(seed, distill, rank)
        print(f"[{index + 1}/{len(order)}] {name}: training ...", flush=True)
        record = train_and_measure(args, base, prompts, seed, distill, rank)
        payload["runs"].append(record)
        write_results(out, payload, with_plots=not args.no_plots)
        greedy = record["greedy"]
        elapsed = time.perf_counter() - started
        eta = elapsed / (index + 1) * (len(order) - index - 1)
        print(
            f"[{index + 1}/{len(order)}] {name}: greedy {greedy['tokens_per_forward']:.2f} "
            f"tokens/forward, speedup {greedy['speedup']['median']:.2f}x, identical "
            f"{greedy['identical']}; train {record['train_tokens_per_s']:,.0f} tok/s; "
            f"{record['run_seconds']:.0f} s (ETA {eta / 60:.0f} min)",
            flush=True,
        )
    if not order:
        write_results(out, payload, with_plots=not args.no_plots)
    print(markdown_table(payload["summary"], payload["environment"]["device"], settings))
    print(f"wrote {out / 'results.json'}")
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's options (``cpd-mtp bench retrofit``, ``python -m cpd_mtp.apps.retrofit_study``)."""
    from cpd_mtp.apps.models import model_path

    add = parser.add_argument
    add("--model", type=Path, default=model_path("smollm2"), help="HF folder or .gguf")
    add("--ranks", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    add("--distill", choices=DISTILLS, nargs="+", default=list(DISTILLS))
    add("--seeds", type=int, nargs="+", default=[0, 1])
    add("--n-future", type=positive_int, default=4)
    add("--tokens", type=positive_int, default=24_576, help="training tokens per head")
    add("--draft-vocab", type=positive_int, default=4096)
    add("--block-size", type=positive_int, default=128)
    add("--batch-size", type=positive_int, default=8)
    add("--epochs", type=float, default=2.0)
    add("--lr", type=float, default=2e-3)
    add("--expert-type", default="linear", choices=["linear", "resblock", "lowrank"])
    add("--max-files", type=positive_int, default=None)
    add("--prompts", type=positive_int, default=6, help="held-out prompts measured")
    add("--prompt-tokens", type=positive_int, default=48)
    add("--new-tokens", type=positive_int, default=48)
    add("--temperature", type=float, default=0.7, help="the sampled measurement's T")
    add("--repeats", type=positive_int, default=1, help="timed greedy passes over the prompts")
    add("--work-dir", type=Path, default=Path("runs") / "retrofit_study", help="the runs")
    add("--out", type=Path, default=None, help=f"results (default {PUBLISHED_DIR})")
    add("--quick", action="store_true", help="a smoke run: small, never into docs/")
    add("--restart", action="store_true", help="ignore finished configurations")
    add("--no-plots", action="store_true")
    add("--progress", action="store_true", help="the progress of each run")


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Apply ``--quick`` and the default ``--out``; a bad setting is a one-line usage error."""
    if args.quick:
        args.ranks, args.seeds = args.ranks[:2], args.seeds[:1]
        args.tokens, args.prompts, args.new_tokens = 2048, 2, 16
        args.max_files = args.max_files or 40
        args.work_dir = Path("runs") / "retrofit_study_quick"
    args.out = args.out or (QUICK_DIR if args.quick else PUBLISHED_DIR)
    if args.quick and args.out.resolve().is_relative_to(Path("docs").resolve()):
        parser.error("--quick runs never write into docs/")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if not args.model.exists():
        parser.error(f"no model at {args.model} (run `make smollm2`)")
    return args


def main(argv: list[str] | None = None) -> None:
    """``python -m cpd_mtp.apps.retrofit_study ...`` is ``cpd-mtp bench retrofit ...``."""
    parser = argparse.ArgumentParser(prog="cpd-mtp bench retrofit")
    add_arguments(parser)
    run_study(check_args(parser.parse_args(argv), parser))


if __name__ == "__main__":
    main()
