"""The retrofit study: which head, and how many minutes, make decoding fastest?

For one model (SmolLM2-135M-Instruct by default), ``cpd-mtp retrofit`` runs at a **wall-clock
budget** (``--minutes``, the whole command: data, training, export) for every named
configuration in ``--configs`` (:data:`CONFIGS`: the recipe and its variants) and every seed.
Heads of the same seed and data settings share the first one's data: the later ones train on
the same examples and are charged the seconds the first took to make them, so every head gets
the same data and the same minutes. With several ``--minutes`` the study is a scaling curve.

Each head is measured afterwards on held-out chat and code prompts by
``cpd_mtp.decoding.measure.measure_decoders``: the original model's Hugging Face ``generate``,
the alternatives that need no training (HF greedy and HF prompt lookup in the packed layout,
this decoder with context drafts only), the head's drafts alone, and the default decoder;
tokens per forward, acceptance by depth, the speedups, and whether every token was the
original model's.

    python -m cpd_mtp.apps.retrofit_study --configs default,fusion-add --minutes 6
    python -m cpd_mtp.apps.retrofit_study --configs default --minutes 3,6,12,24 --out docs/scaling
    python -m cpd_mtp.apps.retrofit_study --quick          # a smoke run, to runs/ only

Results go to ``results.json``, ``table.md`` and a plot in ``--out``; the JSON is rewritten
after every run, and a rerun with the same settings skips the runs it holds.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

from cpd_mtp.apps.results import environment, portable_path, write_json
from cpd_mtp.utils.args import positive_int

# Named configurations: overrides of the retrofit's defaults (the recipe is "default").
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "fusion-add": {"head.token_fusion": "add"},
    "unconditioned": {"head.token_conditioned": False},
    "rank1": {"head.rank": 1},
    "rank4": {"head.rank": 4},
    "chat-only": {"data.chat_share": 1.0},
    "code-only": {"data.chat_share": 0.0},
    "n3": {"head.n_future": 3},
}
# The settings that decide a run's data (heads that agree on them share it).
DATA_KEYS = ("data.chat_share",)
QUICK_DIR = Path("runs") / "retrofit_study_quick" / "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cpd_mtp.apps.models import model_path

    parser.add_argument("--model", type=Path, default=model_path("smollm2"))
    parser.add_argument("--configs", default="default", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--minutes", default="6", help="budget per head; several: a curve")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--prompts", type=positive_int, default=6, help="held-out per kind")
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--work-dir", type=Path, default=Path("runs") / "retrofit_study")
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny budgets)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument(
        "overrides", nargs="*", help="retrofit keys for every run, e.g. data.max_files=100"
    )


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parsed lists, checked in one line each."""
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    try:
        minutes = [float(m) for m in args.minutes.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as err:
        parser.error(f"--minutes / --seeds: {err}")
    if any(m <= 0 for m in minutes):
        parser.error("--minutes: every budget must be > 0")
    if args.quick:
        minutes, args.prompts, args.new_tokens, args.repeats = [1.0], 1, 12, 1
    args.config_names, args.minute_list, args.seed_list = names, minutes, seeds
    args.settings = {}
    for word in args.overrides:
        key, sep, value = word.partition("=")
        if not sep:
            parser.error(f"override {word!r} is not key=value")
        args.settings[key.strip()] = _yaml(value)
    try:  # every key checked now, not after the first run
        run_config(args, names[0], minutes[0], seeds[0], {})
    except ValueError as err:
        parser.error(str(err))
    if args.out is None:
        args.out = QUICK_DIR if args.quick else Path("runs") / "retrofit_study" / "results"
    if args.quick and Path(args.out).resolve().is_relative_to(Path("docs").resolve()):
        parser.error("--quick never writes into docs/: give --out elsewhere")
    if not args.model.exists():
        parser.error(f"--model {args.model} does not exist (make smollm2)")
    return args


def _yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def run_config(
    args: argparse.Namespace, name: str, minutes: float, seed: int, extra: dict[str, Any]
) -> Any:
    from cpd_mtp.training.config import load_retrofit_config

    return load_retrofit_config(
        {
            "model.path": str(args.model),
            "run.out_dir": str(args.work_dir / f"{name}-{minutes:g}min-s{seed}"),
            "run.minutes": minutes,
            "run.seed": seed,
            "run.overwrite": True,  # the study's own scratch folders
            "run.measure_prompts": 0,  # measured below, on more prompts
            "run.measure_share": 0.0,
            "run.eval_every": 10**9,
            "run.save_every": 10**9,
            "run.progress": args.progress,
            **getattr(args, "settings", {}),
            **CONFIGS[name],
            **extra,
        }
    )


def one_run(
    args: argparse.Namespace,
    base: tuple[Any, Any],
    prompts: dict[str, list[Any]],
    name: str,
    minutes: float,
    seed: int,
    shared: dict[str, Any] | None,
) -> dict[str, Any]:
    """Retrofit one head within its minutes, then measure it: one record of the results."""
    from cpd_mtp.decoding.measure import measure_decoders
    from cpd_mtp.training.retrofit import RetrofitTrainer

    cfg = run_config(args, name, minutes, seed, {})
    start = time.perf_counter()
    kwargs = {}
    if shared is not None:
        kwargs = {"data_examples": shared["examples"], "data_seconds": shared["seconds"]}
    trainer = RetrofitTrainer(cfg, base=base, **kwargs)
    try:
        val = trainer.train()
    finally:
        trainer.close()
    seconds = time.perf_counter() - start
    measured = measure_decoders(
        trainer.model,
        base[0],
        prompts,
        args.new_tokens,
        decoders=("hf", "hf_packed", "hf_lookup", "context", "cp", "default"),
        repeats=args.repeats,
    )
    record = {
        "name": name,
        "minutes": minutes,
        "seed": seed,
        "overrides": CONFIGS[name],
        "steps": trainer.resolved.run.steps,
        "examples": len(trainer.train_data),
        "target_tokens": trainer.training_tokens,
        "data": {"examples": trainer.plan["examples"], "seconds": trainer.data_s},
        "data_tokens_per_s": trainer.data_rate,
        "run_seconds": seconds,
        "usage_entropy": val.get("val/usage_entropy"),
        **measured,
    }
    del trainer
    gc.collect()
    return record


def table(runs: list[dict[str, Any]]) -> str:
    """One row per run: the headline numbers per kind of prompt, trusted flags shown."""
    kinds = sorted({k for r in runs for k in r["kinds"]})
    head = ["config", "minutes", "seed", "target tokens", "steps"]
    for kind in kinds:
        head += [f"{kind} tpf (default / context / head)", f"{kind} vs best zero-training"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        row = [run["name"], f"{run['minutes']:g}", str(run["seed"]), f"{run['target_tokens']:,}",
               str(run["steps"])]  # fmt: skip
        for kind in kinds:
            summary = run["kinds"].get(kind)
            if summary is None:
                row += ["-", "-"]
                continue
            d = summary["decoders"]
            tpf = " / ".join(
                f"{d[n]['tokens_per_forward']:.2f}" if n in d else "-"
                for n in ("default", "context", "cp")
            )
            best = summary["vs_best_zero_training"]
            trust = "" if best["trusted"] else " (untrusted)"
            row += [tpf, f"{best['median']:.2f}x [{best['p20']:.2f}, {best['p80']:.2f}]{trust}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Tokens per forward and speedup over the best zero-training alternative against minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k for r in runs for k in r["kinds"]})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["name"] for r in runs}):
        for kind in kinds:
            points = sorted(
                (r["minutes"], r["kinds"][kind])
                for r in runs
                if r["name"] == name and kind in r["kinds"]
            )
            if not points:
                continue
            minutes = [m for m, _ in points]
            axes[0].plot(minutes, [s["decoders"]["default"]["tokens_per_forward"] for _, s in points],
                         marker="o", label=f"{name} {kind}")  # fmt: skip
            axes[1].plot(minutes, [s["vs_best_zero_training"]["median"] for _, s in points],
                         marker="o", label=f"{name} {kind}")  # fmt: skip
    axes[0].set(xlabel="retrofit minutes", ylabel="tokens per forward (default decoder)")
    axes[1].set(xlabel="retrofit minutes", ylabel="speedup over the best zero-training")
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    for ax in axes:
        ax.legend(fontsize=7)
        if len({r["minutes"] for r in runs}) > 1:
            ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    from cpd_mtp.hf.loading import load_causal_lm
    from cpd_mtp.training.retrofit import held_out_prompts

    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    settings = {
        "model": portable_path(args.model),
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "overrides": args.settings,
    }
    runs: list[dict[str, Any]] = []
    if results_path.is_file():
        import json

        old = json.loads(results_path.read_text())
        if old.get("settings") == settings:
            runs = old.get("runs", [])
    done = {(r["name"], r["minutes"], r["seed"]) for r in runs}
    if done:
        print(f"{len(done)} runs done already ({results_path}); running the others", flush=True)
    base = load_causal_lm(args.model, progress=False)
    base[0].eval()
    prompts = held_out_prompts(run_config(args, "default", 1.0, 0, {}), base[1], args.prompts)
    shared: dict[tuple, dict[str, Any]] = {}
    for minutes in args.minute_list:
        for seed in args.seed_list:
            for name in args.config_names:
                data_key = (minutes, seed, *(CONFIGS[name].get(k) for k in DATA_KEYS))
                if (name, minutes, seed) in done:
                    continue
                print(f"== {name}, {minutes:g} minutes, seed {seed} ==", flush=True)
                record = one_run(args, base, prompts, name, minutes, seed, shared.get(data_key))
                shared.setdefault(data_key, record["data"])
                runs.append(record)
                write_json(
                    results_path,
                    {"environment": environment("cpu"), "settings": settings, "runs": runs},
                )
    (args.out / "table.md").write_text(table(runs))
    plot(runs, args.out / "speedup_vs_minutes.png")
    print(table(runs))
    print(f"wrote {results_path}, table.md and speedup_vs_minutes.png")
    return {"runs": runs}


def main(argv: list[str] | None = None) -> None:
    """``python -m cpd_mtp.apps.retrofit_study ...`` is ``cpd-mtp bench retrofit ...``."""
    parser = argparse.ArgumentParser(prog="cpd-mtp bench retrofit")
    add_arguments(parser)
    run_study(check_args(parser.parse_args(argv), parser))


if __name__ == "__main__":
    main()
