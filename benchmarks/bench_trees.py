"""Draft trees against chains and against the zero-training baselines, on SmolLM2-135M.

Every decoder runs on the same held-out standard-library prompts (never trained on), 64 new
tokens, batch 1, interleaved prompt by prompt so machine drift hits every variant alike:

- baselines, on the original model: Hugging Face greedy ``generate`` as users run it (``hf``);
  the same inside ``few_row_linears`` (``hf_fast``: oneDNN with packed weights, the layout this
  decoder uses, a speedup that needs no training); Hugging Face prompt lookup
  (``prompt_lookup_num_tokens=10``) plain (``hf_lookup``) and in that layout
  (``hf_lookup_fast``);
- this decoder on the retrofitted model (``make demo``'s export): a chain, trees of 4, 8, 16 and
  32 nodes, ``auto`` without and with context drafts; with ``--rank-exports``, the ``auto``
  tree of other exports too (the rank question);
- sampled at T = 0.7: the original model's HF sampling in the fast layout against the chain and
  the ``auto`` tree (tokens per forward and time; the distribution is tested, not benchmarked).

Reported per variant: tokens per forward, acceptance by depth, the histogram of accepted depth,
the speedup over ``hf``, ``hf_fast`` and the best zero-training baseline (median with p20/p80
over prompts and passes), and whether greedy tokens equal ``hf``'s. Also: the measured cost of
a forward by fed tokens, and a ``torch.profiler`` split of a 1-token and a 16-token forward.

    python benchmarks/bench_trees.py                # docs/benchmarks/trees.json and trees.png
    python benchmarks/bench_trees.py --quick        # 2 prompts, 1 pass, to the scratch dir
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from cpd_mtp.apps.models import model_path

TREES = ("chain", 4, 8, 16, 32, "auto")
BASELINES = ("hf", "hf_fast", "hf_lookup", "hf_lookup_fast")


def _profile_forward(model: Any, prefix: torch.Tensor, fed: int) -> dict[str, float]:
    """Milliseconds of one cached forward over ``fed`` tokens, split by kind of operator."""
    from torch.profiler import ProfilerActivity, profile

    from cpd_mtp.decoding.cache import decoding_cache
    from cpd_mtp.decoding.forward import feed_chain
    from cpd_mtp.ops.few_rows import few_row_linear, few_row_linears

    mask = torch.ones(1, prefix.shape[1], dtype=torch.bool)
    with torch.no_grad(), few_row_linears(model):
        _, cache = model.trunk_hidden(prefix, cache=decoding_cache(model), use_cache=True)
        tokens = prefix[:, -fed:] if fed <= prefix.shape[1] else prefix[:, :1].expand(1, fed)
        n_valid = torch.tensor([prefix.shape[1]])
        for _ in range(2):  # warm-up (and the packed weights)
            hidden, cache = feed_chain(model, tokens, mask, n_valid, cache)
            few_row_linear(hidden, model.head.weight)
            cache.crop(-fed)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                hidden, cache = feed_chain(model, tokens, mask, n_valid, cache)
                few_row_linear(hidden, model.head.weight)  # as the decoder computes it
                cache.crop(-fed)
    split = {"linear layers": 0.0, "attention": 0.0, "rest": 0.0}
    for event in prof.key_averages():
        name = event.key
        ms = event.self_cpu_time_total / 1e3 / 5
        if "mkldnn" in name or name in ("aten::mm", "aten::addmm", "aten::bmm"):
            split["linear layers"] += ms
        elif "scaled_dot_product" in name or "softmax" in name:
            split["attention"] += ms
        else:
            split["rest"] += ms
    split["total"] = sum(split.values())
    return split


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=model_path("smollm2"))
    parser.add_argument("--export", type=Path, default=Path("runs/demo-smollm2/final"))
    parser.add_argument("--rank-exports", type=Path, nargs="*", default=[])
    parser.add_argument("--prompts", type=harness.positive_int, default=8)
    parser.add_argument("--new-tokens", type=harness.positive_int, default=64)
    parser.add_argument("--repeats", type=harness.positive_int, default=2)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--quick", action="store_true", help="2 prompts, 1 pass, scratch output")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.repeats = 2, 1
    out = args.out or (
        harness.SCRATCH_DIR / "trees.json" if args.quick else Path("docs/benchmarks/trees.json")
    )
    for path in [args.export, *args.rank_exports]:
        if not (path / "config.json").is_file():
            sys.exit(f"error: no export at {path}: run `make demo` (or cpd-mtp retrofit) first")

    from cpd_mtp.apps import demo
    from cpd_mtp.decoding import generate
    from cpd_mtp.decoding.output import json_rates
    from cpd_mtp.hf.loading import load_causal_lm
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM
    from cpd_mtp.ops.few_rows import few_row_linears
    from cpd_mtp.training.retrofit import held_out_prompts

    base, tokenizer = load_causal_lm(args.model, progress=False)
    models = {"demo": CPDMTPForCausalLM.from_pretrained(args.export).eval()}
    for path in args.rank_exports:
        loaded = CPDMTPForCausalLM.from_pretrained(path).eval()
        models[f"r{loaded.head.config.rank}:{path.parent.name}"] = loaded
    demo_parser = argparse.ArgumentParser()
    demo.add_arguments(demo_parser)
    # Held-out code (standard-library files outside the training split), as before.
    prompts = held_out_prompts(demo._config(demo_parser.parse_args([])), tokenizer, args.prompts)
    prompts = prompts["code"]
    new = args.new_tokens

    def hf(ids, fast: bool, lookup: bool, sample: bool = False) -> tuple[float, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": new, "do_sample": sample}
        if lookup:
            kwargs["prompt_lookup_num_tokens"] = 10
        if sample:
            kwargs["temperature"] = args.temperature
        start = time.perf_counter()
        with torch.no_grad():
            if fast:
                with few_row_linears(base):
                    ids_out = base.generate(ids, **kwargs)
            else:
                ids_out = base.generate(ids, **kwargs)
        return time.perf_counter() - start, ids_out

    variants: dict[str, dict[str, Any]] = {}
    for tree in TREES:
        variants[f"{tree}"] = {"model": "demo", "draft_tree": tree, "context_drafts": False}
    variants["auto+context"] = {"model": "demo", "draft_tree": "auto", "context_drafts": True}
    for name in models:
        if name != "demo":
            for tree in (4, "auto"):
                variants[f"{name} {tree}"] = {"model": name, "draft_tree": tree,
                                               "context_drafts": False}  # fmt: skip
    sampled = {"sample chain": "chain", "sample auto+context": "auto"}

    times: dict[str, list[float]] = {name: [] for name in (*BASELINES, *variants, "hf_sample")}
    times.update({name: [] for name in sampled})
    records: dict[str, list[Any]] = {name: [] for name in (*variants, *sampled)}
    identical = {name: True for name in variants}
    generator = torch.Generator().manual_seed(0)
    # Warm-up: packed weights, the forward-cost probe of every model, tokenizer caches.
    hf(prompts[0][None], True, False)
    for model in models.values():
        generate(model, prompts[0][None], 8)
    for rep in range(args.repeats):
        for i, prompt in enumerate(prompts):
            ids = prompt[None]
            print(f"pass {rep + 1}/{args.repeats}, prompt {i + 1}/{len(prompts)}", flush=True)
            seconds, reference = hf(ids, False, False)
            times["hf"].append(seconds)
            times["hf_fast"].append(hf(ids, True, False)[0])
            times["hf_lookup"].append(hf(ids, False, True)[0])
            times["hf_lookup_fast"].append(hf(ids, True, True)[0])
            for name, spec in variants.items():
                result = generate(models[spec["model"]], ids, new, draft_tree=spec["draft_tree"],
                                  context_drafts=spec["context_drafts"])  # fmt: skip
                times[name].append(result.wall_time_s)
                records[name].append(result.stats)
                identical[name] &= torch.equal(result.sequences, reference)
            times["hf_sample"].append(hf(ids, True, False, sample=True)[0])
            for name, tree in sampled.items():
                result = generate(models["demo"], ids, new, do_sample=True,
                                  temperature=args.temperature, draft_tree=tree,
                                  context_drafts=tree == "auto", generator=generator)  # fmt: skip
                times[name].append(result.wall_time_s)
                records[name].append(result.stats)

    from cpd_mtp.decoding.stats import DecodingStats

    best_baseline = min(("hf_fast", "hf_lookup_fast"), key=lambda b: statistics.median(times[b]))
    summary: dict[str, Any] = {}
    for name in (*variants, *sampled):
        stats = DecodingStats.combine(records[name])
        base_name = "hf_sample" if name in sampled else "hf"
        entry: dict[str, Any] = {
            "tokens_per_forward": stats.tokens_per_forward,
            "acceptance_by_depth": json_rates(stats.acceptance_rate),
            "accepted_depths": stats.accepted_depths,
            "tree_sizes": {str(k): v for k, v in stats.tree_sizes.items()},
            "seconds": harness.percentiles(times[name]),
            f"speedup_over_{base_name}": harness.percentiles(
                [b / t for b, t in zip(times[base_name], times[name])]
            ),
        }
        if name not in sampled:
            entry["identical_to_hf"] = identical[name]
            for other in ("hf_fast", best_baseline):
                entry[f"speedup_over_{other}"] = harness.percentiles(
                    [b / t for b, t in zip(times[other], times[name])]
                )
        summary[name] = entry
    cost = models["demo"]
    from cpd_mtp.decoding.speculative import _FORWARD_COSTS

    measured_cost = _FORWARD_COSTS.get(cost)
    profile_prefix = prompts[0][None]
    result = {
        "environment": harness.environment("cpu"),
        "config": {
            "model": harness.portable_path(args.model),
            "export": harness.portable_path(args.export),
            "head": models["demo"].head.config.to_dict(),
            "prompts": len(prompts),
            "new_tokens": new,
            "repeats": args.repeats,
            "temperature": args.temperature,
            "threads": torch.get_num_threads(),
        },
        "baselines_seconds": {name: harness.percentiles(times[name]) for name in BASELINES},
        "hf_sample_seconds": harness.percentiles(times["hf_sample"]),
        "best_zero_training_baseline": best_baseline,
        "decoders": summary,
        "forward_cost_vs_fed_tokens": (
            {str(k): v for k, v in measured_cost.relative().items()} if measured_cost else {}
        ),
        "profile_ms": {
            str(fed): _profile_forward(models["demo"], profile_prefix, fed) for fed in (1, 16)
        },
    }
    harness.write_json(out, result)
    _plot(result, out.with_suffix(".png"))
    print(f"{result['environment']['device']}, {torch.get_num_threads()} threads; best "
          f"zero-training baseline: {best_baseline}")  # fmt: skip
    for name, entry in summary.items():
        key = "speedup_over_hf_sample" if name in sampled else "speedup_over_hf"
        speed = entry[key]
        extra = ""
        if name not in sampled:
            fast = entry[f"speedup_over_{best_baseline}"]
            extra = (
                f", {fast['p50']:.2f}x over {best_baseline}, identical {entry['identical_to_hf']}"
            )
        print(f"{name:<24s} {entry['tokens_per_forward']:.2f} tokens/forward, "
              f"{speed['p50']:.2f}x [{speed['p20']:.2f}, {speed['p80']:.2f}] over "
              f"{key.removeprefix('speedup_over_')}{extra}")  # fmt: skip
    print(f"wrote {out}")


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result["decoders"] if not n.startswith("sample")]
    best = result["best_zero_training_baseline"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for offset, key, label in ((-0.2, "speedup_over_hf", "over HF greedy"),
                               (0.2, f"speedup_over_{best}", f"over {best}")):  # fmt: skip
        mids = [result["decoders"][n][key]["p50"] for n in names]
        low = [m - result["decoders"][n][key]["p20"] for m, n in zip(mids, names)]
        high = [result["decoders"][n][key]["p80"] - m for m, n in zip(mids, names)]
        xs = [i + offset for i in range(len(names))]
        ax.bar(xs, mids, width=0.4, yerr=[low, high], capsize=3, label=label)
    for i, name in enumerate(names):
        tpf = result["decoders"][name]["tokens_per_forward"]
        ax.text(i, 0.05, f"{tpf:.2f}\ntpf", ha="center", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup (median, p20-p80)")
    ax.set_title(f"Draft trees on SmolLM2-135M, greedy, {result['environment']['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
