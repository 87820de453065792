"""The retrofit study: which head drafts best for a real pretrained model in a given time?

For one model (SmolLM2-135M-Instruct by default), heads-only retrofits in base mode
(``cpd_mtp.training.retrofit``) at n = 4 for every rank in ``--ranks``, every data recipe in
``--distill``, with and without token conditioning (``--conditioned``) and for every seed in
``--seeds``, all at the **same wall-clock budget** (``--minutes`` per head: data, state caching
and training; ``--minutes 0`` gives every head the same token budget instead, as the first
study did). The heads of one seed and data recipe share its data: the first makes it within
its budget, the others train on the same blocks and are charged the minutes it took, so every
head gets the same data and the same minutes.

Each trained head is measured on held-out code prompts (standard-library files outside the
training split) by ``cpd_mtp.decoding.measure.measure_retrofit``, once with the default decoder
(the ``auto`` draft tree, CP and prompt-lookup drafts) and once as a chain of the CP head's
drafts: tokens per forward and acceptance per draft depth, greedy and sampled, the greedy wall
clock against the original model's Hugging Face ``generate`` and against the best zero-training
alternative (HF greedy or HF prompt lookup in the packed layout) in the same run; plus the top-1
and top-5 accuracy of the first draft on validation text, and the gate's usage.

Order: the configurations of each seed run in a different order (the first seed as listed, the
next reversed, ...), so a drift of the machine during the study does not favour one; each
measurement interleaves the decoders prompt by prompt.

    python -m cpd_mtp.apps.retrofit_study                  # the published study (docs/)
    python -m cpd_mtp.apps.retrofit_study --quick          # a smoke run, to runs/ only

Results go to ``results.json``, ``table.md`` and plots in ``--out`` (default
``docs/retrofit_study``; ``--quick`` defaults elsewhere and never writes into ``docs/``). The
JSON is rewritten after every configuration: a killed study keeps what it finished, and a rerun
with the same settings skips it (so a study may be run in parts, one command per grid).
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

DISTILLS = ("none", "generated", "generated_kl", "kl")
PUBLISHED_DIR = Path("docs") / "retrofit_study"
QUICK_DIR = Path("runs") / "retrofit_study_quick" / "results"


# ---------------------------------------------------------------------- plan
def plan(
    ranks: list[int], distills: list[str], seeds: list[int], conditioned: list[bool] = (False,)
) -> list[tuple[int, str, int, bool]]:
    """(seed, distill, rank, conditioned) in run order: each seed's configurations in the
    order listed, reversed for every other seed, so a drift over time biases none."""
    order = []
    for index, seed in enumerate(seeds):
        configs = list(itertools.product(distills, conditioned, ranks))
        if index % 2:
            configs.reverse()
        order += [(seed, distill, rank, cond) for distill, cond, rank in configs]
    return order


def run_name(seed: int, distill: str, rank: int, conditioned: bool = False) -> str:
    return f"r{rank}-{distill}{'-cond' if conditioned else ''}-s{seed}"


def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What fixes the results: a rerun skips finished configurations only when these agree."""
    return {
        "model": portable_path(args.model),
        "n_future": args.n_future,
        "tokens": args.tokens,
        "minutes": args.minutes,
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
def retrofit_config(
    args: argparse.Namespace, seed: int, distill: str, rank: int, conditioned: bool = False
):
    from cpd_mtp.training.config import load_retrofit_config

    budget = {"run.minutes": args.minutes} if args.minutes is not None else {}
    return load_retrofit_config(
        {
            "model.path": str(args.model),
            "run.out_dir": str(args.work_dir / run_name(seed, distill, rank, conditioned)),
            "head.n_future": args.n_future,
            "head.rank": rank,
            "head.token_conditioned": conditioned,
            **budget,
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


def first_draft_accuracy(trainer: Any) -> dict[str, float | None]:
    """Top-1 and top-5 of the head's first draft (x_{t+2} given x_{t+1}) on the run's
    validation blocks (corpus text), ``cpd_mtp.metrics.first_draft_hits``."""
    import numpy as np

    from cpd_mtp.metrics import first_draft_hits

    head, data = trainer.engine.module.eval(), trainer.val_data
    hits, positions = {1: 0, 5: 0}, 0
    for start in range(0, len(data), 8):
        hidden, ids = data.batch(np.arange(start, min(start + 8, len(data))), trainer.device)
        found, count = first_draft_hits(head, hidden, ids, (1, 5))
        positions += count
        for k in hits:
            hits[k] += found[k]
    return {f"top{k}": hits[k] / positions if positions else None for k in hits}


def train_and_measure(
    args: argparse.Namespace,
    base: tuple[Any, Any],
    prompts: list[torch.Tensor],
    seed: int,
    distill: str,
    rank: int,
    conditioned: bool = False,
    shared_data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Retrofit one head, load its export, measure it; one record of ``results.json``.

    ``shared_data`` (``--minutes``): the training blocks and the seconds the first head of the
    same seed and data recipe spent making them; this head trains on the same blocks and its
    budget is charged the same seconds, so every head gets the same data and minutes.
    """
    from cpd_mtp.decoding.measure import measure_retrofit
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM
    from cpd_mtp.training.retrofit import RetrofitTrainer

    cfg = retrofit_config(args, seed, distill, rank, conditioned)
    start = time.perf_counter()
    shared = {}
    if shared_data is not None:
        shared = {"data_blocks": shared_data["blocks"], "data_seconds": shared_data["seconds"]}
    trainer = RetrofitTrainer(cfg, base=base, **shared)
    try:
        val = trainer.train()
        accuracy = first_draft_accuracy(trainer)
    finally:
        trainer.close()
    seconds = time.perf_counter() - start
    final = Path(cfg.run.out_dir) / "final"
    model = CPDMTPForCausalLM.from_pretrained(final, base_model=base[0]).eval()
    measure = {
        "prompts": prompts,
        "max_new_tokens": args.new_tokens,
        "temperature": args.temperature,
        "repeats": args.repeats,
        "seed": seed,
    }
    measured = measure_retrofit(model, base[0], **measure)  # the default decoder: "auto"
    chain = measure_retrofit(model, base[0], **measure, baselines=False, draft_tree="chain")
    del model
    gc.collect()
    usage = [val.get(f"val/expert_usage/{a}") for a in range(rank)]
    return {
        "name": run_name(seed, distill, rank, conditioned),
        "seed": seed,
        "distill": distill,
        "rank": rank,
        "conditioned": conditioned,
        "train_tokens_per_s": trainer.tokens_per_s,
        "training_tokens": trainer.training_tokens,
        "steps": trainer.resolved.run.steps,
        "data": {"blocks": len(trainer.train_data), "seconds": trainer.data_ready_s},
        "data_seconds": trainer.cache_time_s,
        "run_seconds": seconds,
        "validation": val,
        "first_draft": accuracy,
        "usage": usage,
        "usage_entropy": val.get("val/usage_entropy"),
        **measured,
        "chain": chain,
    }


# ---------------------------------------------------------------------- summaries
def _mean_and_range(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def _mean_rates(group: list[dict[str, Any]], mode: str) -> list[float | None]:
    """Mean acceptance per draft position over seeds (None where no seed verified it; a tree
    decoder's runs may reach different depths)."""
    means = []
    rows = [r[mode]["acceptance_per_position"] for r in group]
    for j in range(max(len(rates) for rates in rows)):
        rates = [rates[j] for rates in rows if j < len(rates) and rates[j] is not None]
        means.append(statistics.fmean(rates) if rates else None)
    return means


def _config_key(run: dict[str, Any]) -> tuple[str, bool, int]:
    return run["distill"], bool(run.get("conditioned", False)), run["rank"]


def _stat(group: list[dict[str, Any]], get) -> dict[str, float] | None:
    """Mean and range over seeds of ``get(run)``; None when any run lacks it."""
    try:
        values = [get(r) for r in group]
    except (KeyError, TypeError):
        return None
    if any(v is None for v in values):
        return None
    return _mean_and_range(values)


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (distill, conditioned, rank): mean and range over seeds of the headline
    numbers, for the default decoder (``auto`` tree) and, where measured, the chain."""
    rows = []
    for distill, conditioned, rank in sorted({_config_key(r) for r in runs}):
        group = [r for r in runs if _config_key(r) == (distill, conditioned, rank)]
        row: dict[str, Any] = {
            "distill": distill,
            "conditioned": conditioned,
            "rank": rank,
            "seeds": len(group),
        }
        row["greedy_tpf"] = _stat(group, lambda r: r["greedy"]["tokens_per_forward"])
        row["sampled_tpf"] = _stat(group, lambda r: r["sampled"]["tokens_per_forward"])
        row["chain_greedy_tpf"] = _stat(group, lambda r: r["chain"]["greedy"]["tokens_per_forward"])
        row["chain_sampled_tpf"] = _stat(
            group, lambda r: r["chain"]["sampled"]["tokens_per_forward"]
        )
        row["speedup"] = _stat(group, lambda r: r["greedy"]["speedup"]["median"])
        row["chain_speedup"] = _stat(group, lambda r: r["chain"]["greedy"]["speedup"]["median"])
        row["baseline_speedup"] = _stat(
            group, lambda r: r["greedy"]["speedup_over_best_baseline"]["median"]
        )
        row["top1"] = _stat(group, lambda r: r["first_draft"]["top1"])
        row["top5"] = _stat(group, lambda r: r["first_draft"]["top5"])
        row["usage_entropy"] = _stat(group, lambda r: r["usage_entropy"])
        row["identical"] = all(
            r["greedy"]["identical"] and r.get("chain", {}).get("greedy", {}).get("identical", True)
            for r in group
        )
        row["train_tokens_per_s"] = _stat(group, lambda r: r["train_tokens_per_s"])
        row["training_tokens"] = _stat(group, lambda r: r["training_tokens"])
        row["greedy_acceptance"] = _mean_rates(group, "greedy")
        if all("chain" in r for r in group):
            chains = [r["chain"] for r in group]
            row["chain_acceptance"] = _mean_rates(chains, "greedy")
        if row["sampled_tpf"] is not None:
            row["sampled_acceptance"] = _mean_rates(group, "sampled")
        rows.append(row)
    return rows


def _label(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("distill", "conditioned", "rank", "greedy_tpf")}


def _margin(best: dict[str, Any], other: dict[str, Any], key: str) -> dict[str, Any]:
    """best - other on ``key``, against the seeds' spread (the larger half-range of the two)."""
    margin = best[key]["mean"] - other[key]["mean"]
    half = max((row[key]["max"] - row[key]["min"]) / 2 for row in (best, other))
    return {"margin": margin, "seed_half_range": half, "beyond_seed_spread": abs(margin) > half}


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The configuration with the most greedy tokens per forward (default decoder) and its
    margin over the runner-up; and, per data recipe and conditioning, the best rank > 1
    against rank 1 for each decoder (chain, tree; greedy, sampled), with the seeds' spread."""
    ranked = sorted(rows, key=lambda row: row["greedy_tpf"]["mean"], reverse=True)
    best = ranked[0]
    result: dict[str, Any] = {"best": _label(best)}
    if len(ranked) > 1:
        second = ranked[1]
        result |= {"runner_up": _label(second), **_margin(best, second, "greedy_tpf")}
    claims = {}
    modes = ("greedy_tpf", "sampled_tpf", "chain_greedy_tpf", "chain_sampled_tpf")
    for distill, conditioned in sorted({(row["distill"], row["conditioned"]) for row in rows}):
        own = [
            row for row in rows if (row["distill"], row["conditioned"]) == (distill, conditioned)
        ]
        one = [row for row in own if row["rank"] == 1]
        more = [row for row in own if row["rank"] > 1]
        if not (one and more):
            continue
        by_mode = {}
        for mode in modes:
            usable = [row for row in more if row.get(mode) is not None]
            if one[0].get(mode) is None or not usable:
                continue
            top = max(usable, key=lambda row: row[mode]["mean"])
            by_mode[mode] = {
                "rank1": one[0][mode]["mean"],
                "best_rank": top["rank"],
                "best": top[mode]["mean"],
                **_margin(top, one[0], mode),
            }
        name = f"{distill}{'-cond' if conditioned else ''}"
        claims[name] = by_mode
        if "greedy_tpf" in by_mode:  # the first study's key, kept
            claims[name]["gain"] = by_mode["greedy_tpf"]["margin"]
    result["rank_gain_by_distill"] = claims
    return result


def _fmt(stat: dict[str, float] | None, digits: int = 2) -> str:
    if stat is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"


def markdown_table(rows: list[dict[str, Any]], machine: str, settings: dict[str, Any]) -> str:
    from cpd_mtp.decoding.output import format_rates

    budget = (
        f"{settings['minutes']:g} minutes per head (data, state caching and training; heads "
        "of one seed and data recipe share the data and are charged its minutes)"
        if settings.get("minutes") is not None
        else f"{settings['tokens']:,} training tokens per head"
    )
    lines = [
        f"Retrofit study: {settings['model']}, n = {settings['n_future']}, heads only, {budget}, "
        f"draft vocabulary {settings['draft_vocab']}, {settings['prompts']} held-out prompts x "
        f"{settings['new_tokens']} new tokens. Machine: {machine}.",
        "",
        "Mean over seeds [min, max]. tpf: tokens per forward; tree: the default decoder "
        '(`draft_tree="auto"`, CP drafts and prompt-lookup drafts in one tree); chain: '
        f"the CP head's drafts alone; sampled at T = {settings['temperature']}. Speedup: the "
        "original model's HF greedy `generate` time over the tree decoder's, median over "
        "prompts; vs best: over the faster of HF greedy and HF prompt lookup in the packed "
        "layout. Top-1/5: the first draft (x_{t+2} given x_{t+1}) on validation text. "
        "Usage: the entropy of the mean gate weights over log r (1 even, 0 collapsed).",
        "",
        "| distill | cond | r | tree greedy tpf | tree sampled tpf | chain greedy tpf | "
        "chain sampled tpf | chain acceptance per depth | top-1 / top-5 | usage | "
        "speedup vs HF greedy | vs best | identical | train tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        accept = format_rates(row.get("chain_acceptance") or row["greedy_acceptance"])
        top = (
            f"{row['top1']['mean']:.2f} / {row['top5']['mean']:.2f}"
            if row.get("top1") and row.get("top5")
            else "n/a"
        )
        usage = f"{row['usage_entropy']['mean']:.2f}" if row.get("usage_entropy") else "n/a"
        lines.append(
            f"| {row['distill']} | {'yes' if row.get('conditioned') else 'no'} | {row['rank']} | "
            f"{_fmt(row['greedy_tpf'])} | {_fmt(row.get('sampled_tpf'))} | "
            f"{_fmt(row.get('chain_greedy_tpf'))} | {_fmt(row.get('chain_sampled_tpf'))} | "
            f"{accept} | {top} | {usage} | {_fmt(row['speedup'])}x | "
            f"{_fmt(row.get('baseline_speedup'))}x | {'yes' if row['identical'] else 'NO'} | "
            f"{_fmt(row['train_tokens_per_s'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Tokens per forward against rank for each decoder, one line per data recipe and
    conditioning; and the chain's acceptance by depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    panels = (
        ("chain_greedy_tpf", "chain, greedy"),
        ("greedy_tpf", "tree (auto), greedy"),
        ("sampled_tpf", "tree (auto), sampled"),
    )
    recipes = sorted({(row["distill"], row["conditioned"]) for row in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    for ax, (key, title) in zip(axes, panels):
        for distill, cond in recipes:
            own = [
                row for row in rows
                if (row["distill"], row["conditioned"]) == (distill, cond) and row.get(key)
            ]  # fmt: skip
            if not own:
                continue
            ranks = [row["rank"] for row in own]
            mean = [row[key]["mean"] for row in own]
            low = [row[key]["mean"] - row[key]["min"] for row in own]
            high = [row[key]["max"] - row[key]["mean"] for row in own]
            label = f"{distill}{', conditioned' if cond else ''}"
            ax.errorbar(ranks, mean, yerr=[low, high], marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_title(f"tokens per forward: {title}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    paths.append(out / "tokens_per_forward_vs_rank.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(recipes), figsize=(4.5 * len(recipes), 3.6), squeeze=False)
    for ax, (distill, cond) in zip(axes[0], recipes):
        for row in rows:
            if (row["distill"], row["conditioned"]) != (distill, cond):
                continue
            accept = row.get("chain_acceptance") or row["greedy_acceptance"]
            values = [float("nan") if a is None else a for a in accept]
            ax.plot(range(2, len(accept) + 2), values, marker="o", label=f"r={row['rank']}")
        ax.set_title(f"chain acceptance: {distill}{', cond.' if cond else ''}")
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
    conditioned = [c == "yes" for c in args.conditioned]
    order = [
        c for c in plan(args.ranks, args.distill, args.seeds, conditioned)
        if run_name(*c) not in done
    ]  # fmt: skip
    started = time.perf_counter()
    for index, (seed, distill, rank, cond) in enumerate(order):
        name = run_name(seed, distill, rank, cond)
        print(f"[{index + 1}/{len(order)}] {name}: training ...", flush=True)
        # With a budget, the first head of a (seed, recipe) makes the data; the rest share it.
        shared = next(
            (
                r["data"] for r in payload["runs"]
                if (r["seed"], r["distill"]) == (seed, distill) and r.get("data")
            ),
            None,
        ) if args.minutes is not None else None  # fmt: skip
        record = train_and_measure(args, base, prompts, seed, distill, rank, cond, shared)
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
    add("--ranks", type=positive_int, nargs="+", default=[1, 2, 4])
    add("--distill", choices=DISTILLS, nargs="+", default=["generated"])
    add("--seeds", type=int, nargs="+", default=[0, 1])
    add("--n-future", type=positive_int, default=4)
    add("--tokens", type=positive_int, default=24_576, help="training tokens per head (cap)")
    add(
        "--minutes", type=float, default=1.5,
        help="wall-clock minutes per head (data + training); 0: equal tokens instead",
    )  # fmt: skip
    add("--conditioned", choices=["no", "yes"], nargs="+", default=["no", "yes"])
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
        args.minutes = 0.5 if args.minutes is not None else None
        args.max_files = args.max_files or 40
        args.work_dir = Path("runs") / "retrofit_study_quick"
    args.out = args.out or (QUICK_DIR if args.quick else PUBLISHED_DIR)
    if args.quick and args.out.resolve().is_relative_to(Path("docs").resolve()):
        parser.error("--quick runs never write into docs/")
    if args.minutes is not None and args.minutes <= 0:
        args.minutes = None  # equal tokens, as the first study
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
