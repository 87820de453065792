"""Lossy decoding's trade: speed against quality, per rule and threshold.

A retrofitted export (``runs/bench-retrofit/final``, written by ``benchmarks/bench_retrofit.py``)
decodes held-out chat prompts (through the chat template) and held-out code prompts, greedy, the
model's EOS, with exact decoding, each lossy rule at several thresholds
(``cpd_mtp.decoding.acceptance``) and the zero-training alternatives (HF greedy and HF prompt
lookup in the packed layout, this decoder with context drafts only), interleaved prompt by
prompt in a rotating order. Per setting and kind of prompt it reports:

- speed: seconds per token, tokens per forward, and the per-prompt speedup (median, p20-p80)
  over exact decoding and over the best zero-training alternative of each prompt;
- quality 1: the original model's mean log-likelihood per token of the text, against its greedy
  text's (one full forward of the original model over prompt + continuation);
- quality 2: the share of outputs identical to greedy;
- quality 3: arithmetic with a known answer: ``What is a + b?`` through the chat template, a and
  b in [2, 19] from a seeded generator (no retrofit trains on them); the reply's answer (the
  integer after its first ``=``, else its first integer) must be a + b. Reported beside greedy decoding's own score on the same questions.

    python benchmarks/bench_lossy.py           # docs/benchmarks/lossy.json and lossy.png
    python benchmarks/bench_lossy.py --quick   # 2 prompts, 2 settings: the scratch folder
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from cpd_mtp.apps.models import model_path
from cpd_mtp.apps.results import portable_path

# (name, options): exact decoding and each lossy rule from strict to loose.
SETTINGS = [
    ("exact", {}),
    ("typical eps=0.3", {"acceptance": "typical", "typical_epsilon": 0.3, "typical_delta": 0.3}),
    ("typical eps=0.09", {"acceptance": "typical", "typical_epsilon": 0.09, "typical_delta": 0.3}),
    ("typical eps=0.03", {"acceptance": "typical", "typical_epsilon": 0.03, "typical_delta": 0.3}),
    ("confident tau=0.95", {"acceptance": "confident", "confidence": 0.95}),
    ("confident tau=0.8", {"acceptance": "confident", "confidence": 0.8}),
    ("confident tau=0.5", {"acceptance": "confident", "confidence": 0.5}),
]
ZERO_TRAINING = ("hf_packed", "hf_lookup", "context")
ANSWER = re.compile(r"-?\d+")


def arithmetic_questions(count: int, seed: int = 1234) -> list[tuple[str, int]]:
    """``count`` questions ``What is a + b?`` with their answers, a and b in [2, 19] (sums the
    135M model gets right often enough for a loss to show)."""
    rng = random.Random(seed)
    questions = []
    for _ in range(count):
        a, b = rng.randint(2, 19), rng.randint(2, 19)
        questions.append((f"What is {a} + {b}? Reply with the number only.", a + b))
    return questions


def is_correct(answer: str, expected: int) -> bool:
    """Whether the reply's answer is ``expected``: the first integer after its first ``=``
    (replies often restate the sum, ``7 + 5 = 12``), else its first integer."""
    _, equals, after = answer.partition("=")
    found = ANSWER.search(after if equals else answer)
    return found is not None and int(found.group()) == expected


def mean_log_likelihood(original: Any, sequence: Any, prompt_length: int) -> float:
    """The original model's mean log-probability per new token of ``sequence`` (1-D ids)."""
    import torch

    new = sequence.shape[0] - prompt_length
    if new <= 0:
        return 0.0
    with torch.no_grad():
        logits = original(sequence[None]).logits[0, prompt_length - 1 : -1].float()
    log_p = torch.log_softmax(logits, -1).gather(1, sequence[prompt_length:, None])
    return float(log_p.mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=model_path("smollm2"))
    parser.add_argument("--export", type=Path, default=Path("runs/bench-retrofit/final"))
    parser.add_argument("--prompts", type=int, default=6, help="held-out prompts per kind")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--questions", type=int, default=30, help="arithmetic questions")
    parser.add_argument("--plot", type=Path, default=None, help="default: beside the JSON")
    harness.add_output_arguments(parser, "lossy")
    args = parser.parse_args(argv)
    settings = SETTINGS
    if args.quick:
        args.prompts, args.new_tokens, args.repeats, args.questions = 1, 16, 1, 2
        settings = [SETTINGS[0], SETTINGS[2]]
    if not (args.export / "config.json").is_file():
        parser.error(
            f"--export {args.export} holds no export: run `python benchmarks/bench_retrofit.py` "
            "first (it writes runs/bench-retrofit/final), or give one"
        )

    import time

    import torch

    from cpd_mtp.decoding.measure import decoder_call, summarise_speedup
    from cpd_mtp.decoding.speculative import generate
    from cpd_mtp.hf.loading import load_causal_lm
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM
    from cpd_mtp.training.config import load_retrofit_config
    from cpd_mtp.training.retrofit import held_out_prompts

    original, tokenizer = load_causal_lm(args.model, progress=False)
    original.eval()
    model = CPDMTPForCausalLM.from_pretrained(args.export, base_model=original).eval()
    cfg = load_retrofit_config({"model.path": str(args.model), "run.out_dir": "unused"})
    prompts = held_out_prompts(cfg, tokenizer, args.prompts)

    def ours(options: dict[str, Any], new_tokens: int):
        def run(ids):
            out = generate(model, ids, new_tokens, **options)
            return out.sequences, out

        return run

    names = [*ZERO_TRAINING, *(name for name, _ in settings)]
    runs = {z: decoder_call(z, model, original, args.new_tokens) for z in ZERO_TRAINING}
    runs.update({name: ours(options, args.new_tokens) for name, options in settings})
    first = next(p for kind in prompts.values() for p in kind)
    for name in names:  # untimed: one-time costs (the forward-cost probe, allocations)
        runs[name](first[None])

    results: dict[str, Any] = {"kinds": {}}
    count = 0
    for kind, kind_prompts in prompts.items():
        seconds = {n: [] for n in names}
        tokens = {n: [] for n in names}
        tpf = {n: [] for n in names}
        identical = {n: [] for n in names}
        likelihood = {n: [] for n in names}
        unverified = {n: 0 for n in names}
        for repeat in range(args.repeats):
            for i, prompt in enumerate(kind_prompts):
                ids = prompt[None]
                order = names[count % len(names) :] + names[: count % len(names)]
                outputs = {}
                for name in order:
                    start = time.perf_counter()
                    outputs[name] = runs[name](ids)
                    seconds[name].append(time.perf_counter() - start)
                count += 1
                greedy = outputs["exact"][0]
                for name in names:
                    sequence, stats = outputs[name]
                    new = int(sequence.shape[1] - ids.shape[1])
                    tokens[name].append(new)
                    identical[name].append(bool(torch.equal(sequence, greedy)))
                    if repeat == 0:
                        likelihood[name].append(
                            mean_log_likelihood(original, sequence[0], ids.shape[1])
                        )
                    if stats is not None:  # this decoder's runs (HF's have no statistics)
                        tpf[name].append(stats.tokens_per_forward)
                        unverified[name] += stats.unverified_tokens
                print(f"{kind} {i + 1}/{len(kind_prompts)} (pass {repeat + 1})", flush=True)
        per_kind = {}
        for name, _ in settings:
            best = [
                min(seconds[z][j] / max(tokens[z][j], 1) for z in ZERO_TRAINING)
                / (seconds[name][j] / max(tokens[name][j], 1))
                for j in range(len(seconds[name]))
            ]
            vs_exact = [
                (seconds["exact"][j] / max(tokens["exact"][j], 1))
                / (seconds[name][j] / max(tokens[name][j], 1))
                for j in range(len(seconds[name]))
            ]
            per_kind[name] = {
                "s_per_token": sum(seconds[name]) / max(sum(tokens[name]), 1),
                "tokens_per_forward": sum(tpf[name]) / max(len(tpf[name]), 1),
                "vs_exact": summarise_speedup(vs_exact),
                "vs_best_zero_training": summarise_speedup(best),
                "identical_to_greedy": sum(identical[name]) / len(identical[name]),
                "mean_log_likelihood": sum(likelihood[name]) / len(likelihood[name]),
                "unverified_share": unverified[name] / max(sum(tokens[name]), 1),
            }
        per_kind["greedy_log_likelihood"] = per_kind["exact"]["mean_log_likelihood"]
        results["kinds"][kind] = per_kind

    # Quality 3: arithmetic with known answers, every setting on the same questions.
    questions = arithmetic_questions(args.questions)
    scores = {name: 0 for name, _ in settings}
    for question, answer in questions:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        for name, options in settings:
            sequence, _ = ours(options, 16)(ids)
            reply = tokenizer.decode(sequence[0, ids.shape[1] :], skip_special_tokens=True)
            scores[name] += is_correct(reply, answer)
    results["arithmetic"] = {
        "questions": len(questions),
        "accuracy": {name: scores[name] / len(questions) for name in scores},
    }

    print_table(results, [name for name, _ in settings])
    path = harness.write_results(
        args,
        {
            "config": {
                k: portable_path(v) if isinstance(v, Path) else v for k, v in vars(args).items()
            },
            "settings": dict(settings),
            "results": results,
        },
    )
    plot(results, [name for name, _ in settings], args.plot or path.with_suffix(".png"))


def print_table(results: dict[str, Any], names: list[str]) -> None:
    """One line per setting and kind: the speed and the three qualities."""
    accuracy = results["arithmetic"]["accuracy"]
    for kind, per_kind in results["kinds"].items():
        print(f"\n{kind}: greedy log-likelihood {per_kind['greedy_log_likelihood']:.3f}")
        for name in names:
            row = per_kind[name]
            print(
                f"  {name:20s} tpf {row['tokens_per_forward']:.2f}  "
                f"vs exact {row['vs_exact']['median']:.2f}x  "
                f"vs best zero-training {row['vs_best_zero_training']['median']:.2f}x  "
                f"identical {row['identical_to_greedy']:.0%}  "
                f"log-lik {row['mean_log_likelihood']:.3f}  "
                f"unverified {row['unverified_share']:.0%}  arithmetic {accuracy[name]:.0%}"
            )


def plot(results: dict[str, Any], names: list[str], path: Path) -> None:
    """Speedup over the best zero-training alternative against quality, a curve per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["kinds"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        per_kind = results["kinds"][kind]
        for rule in ("typical", "confident"):
            chosen = ["exact", *(n for n in names if n.startswith(rule))]
            xs = [per_kind[n]["identical_to_greedy"] for n in chosen]
            ys = [per_kind[n]["vs_best_zero_training"]["median"] for n in chosen]
            ax.plot(xs, ys, marker="o", label=rule)
            for x, y, n in zip(xs, ys, chosen):
                ax.annotate(n.split(" ")[-1], (x, y), fontsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(
            title=kind,
            xlabel="share of outputs identical to greedy",
            ylabel="speedup over the best zero-training",
        )
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
