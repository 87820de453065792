"""The cost of one speculative iteration against one autoregressive step, on a real model.

A retrofit in base mode pays, per iteration: one trunk forward over the fed tokens (the kept
token and m drafts), the base lm_head on those positions, and one product of the n·r expert
rows with W_U's rows (all V, or the K of a draft vocabulary) at the anchor. An autoregressive
step pays one trunk forward over one token and the lm_head on it. This benchmark measures both
on the same model in the same run, interleaved:

- ``ar``: Hugging Face greedy ``generate`` of the original model, seconds per new token;
- ``spec(K)``: ``cpd_mtp.generate`` (greedy, m = n - 1 drafts every iteration, no EOS) of the
  base-mode model with an untrained head, seconds per iteration (its acceptance is irrelevant
  here: the cost of an iteration does not depend on how many drafts are accepted, except for
  the tokens fed).

    python benchmarks/bench_iteration.py                       # SmolLM2 (make smollm2), n=4 r=4
    python benchmarks/bench_iteration.py --quick               # fewer tokens, to the scratch dir

The ratio spec/ar is the break-even tokens per iteration: below it speculation cannot win.
Results: ``docs/benchmarks/iteration.json`` (``--quick``: ``benchmarks/results/tmp/``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from cpd_mtp.apps.models import model_path

PROMPT = 'import os\n\n\ndef read_lines(path):\n    """Return the lines of a file."""\n'


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=model_path("smollm2"))
    parser.add_argument("--n-future", type=harness.positive_int, default=4)
    parser.add_argument("--rank", type=harness.positive_int, default=4)
    parser.add_argument("--draft-vocab", type=harness.positive_int, nargs="*", default=[8192])
    parser.add_argument("--new-tokens", type=harness.positive_int, default=48)
    parser.add_argument("--repeats", type=harness.positive_int, default=5)
    parser.add_argument("--threads", type=harness.positive_int, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 12, 2
    out = args.out or (
        harness.SCRATCH_DIR / "iteration.json"
        if args.quick
        else Path("docs") / "benchmarks" / "iteration.json"
    )
    if args.threads:
        torch.set_num_threads(args.threads)

    from cpd_mtp.decoding import generate
    from cpd_mtp.hf.loading import load_causal_lm
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    base, tokenizer = load_causal_lm(args.model)
    original = copy.deepcopy(base)
    vocab = base.config.vocab_size
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    variants = {}
    for k in [None, *args.draft_vocab]:
        kwargs = {"draft_vocab_size": k} if k and k < vocab else {}
        model = CPDMTPForCausalLM.from_causal_lm(
            copy.deepcopy(base), args.n_future, args.rank, next_token="base", **kwargs
        ).eval()
        if kwargs:
            model.head.set_draft_vocab(torch.arange(k))
        variants[f"spec_K{k or vocab}"] = model

    def ar() -> float:
        start = time.perf_counter()
        original.generate(
            ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
        )
        return (time.perf_counter() - start) / args.new_tokens

    def spec(model) -> float:
        out = generate(model, ids, args.new_tokens, eos_token_id=[])
        return out.wall_time_s / max(out.forwards, 1)

    times: dict[str, list[float]] = {"ar_step": [], **{name: [] for name in variants}}
    with torch.no_grad():
        ar(), [spec(m) for m in variants.values()]  # warm-up
        for _ in range(args.repeats):  # interleaved, so machine drift hits every variant
            times["ar_step"].append(ar())
            for name, model in variants.items():
                times[name].append(spec(model))
    ratios = {name: [s / a for s, a in zip(times[name], times["ar_step"])] for name in variants}
    result = {
        "environment": harness.environment("cpu"),
        "config": {
            "model": harness.portable_path(args.model),
            "n_future": args.n_future,
            "rank": args.rank,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "prompt_tokens": int(ids.shape[1]),
        },
        "seconds": {name: harness.percentiles(v) for name, v in times.items()},
        "iteration_over_ar_step": {name: harness.percentiles(v) for name, v in ratios.items()},
    }
    harness.write_json(out, result)
    print(f"{result['environment']['device']}, {torch.get_num_threads()} threads")
    print(f"AR step (HF generate)      {statistics.median(times['ar_step']) * 1e3:7.1f} ms")
    for name in variants:
        ratio = harness.percentiles(ratios[name])
        print(
            f"{name:<26s} {statistics.median(times[name]) * 1e3:7.1f} ms per iteration = "
            f"{ratio['p50']:.2f}x an AR step (p20 {ratio['p20']:.2f}, p80 {ratio['p80']:.2f})"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
