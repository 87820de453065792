"""This commit's decoder against an earlier commit's, on the same machine, in one run.

A worker process per round (the package of one checkout on its ``PYTHONPATH``) loads
SmolLM2-135M-Instruct, attaches a CP head with the same seed (n = 4, r = 2, base mode, the API
both versions share), and decodes the same held-out code prompts greedily with the default
decoder (``cpd_mtp.generate``: the ``auto`` tree with context drafts), timing each prompt.
Rounds alternate between the two checkouts, so a drift of the machine hits both. Reported:
the ratio of this version's seconds per prompt to the earlier one's (median, p20, p80 over
prompts and rounds), tokens per forward of each, and whether both decoded the same tokens.

    git worktree add /tmp/previous HEAD~1
    python benchmarks/bench_versions.py --old /tmp/previous   # docs/benchmarks/versions.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from cpd_mtp.apps.results import portable_path

WORKER = r"""
import json, sys, sysconfig, time
from pathlib import Path
import torch
from cpd_mtp.hf.loading import load_causal_lm
from cpd_mtp.hf.modeling import CPDMTPForCausalLM
from cpd_mtp.decoding import generate

model_path, prompts_n, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base, tok = load_causal_lm(model_path, progress=False)
torch.manual_seed(0)
model = CPDMTPForCausalLM.from_causal_lm(base, n_future=4, rank=2, next_token="base").eval()
stdlib = Path(sysconfig.get_paths()["stdlib"])
files = sorted(stdlib.glob("[t-z]*.py"))[:prompts_n]
prompts = [tok(f.read_text(errors="replace")[:400], return_tensors="pt").input_ids[:, :48]
           for f in files]
generate(model, prompts[0], 8)  # warm-up: packed weights, the forward-cost probe
out = []
for ids in prompts:
    start = time.perf_counter()
    result = generate(model, ids, new)
    out.append({"seconds": time.perf_counter() - start, "tokens": result.new_tokens,
                "tokens_per_forward": result.tokens_per_forward,
                "sequence": result.sequences[0].tolist()})
print("RESULT " + json.dumps(out))
"""


def run_round(checkout: Path, model: Path, prompts: int, new: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(model), str(prompts), str(new)],
        env=env, cwd=checkout, capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main(argv: list[str] | None = None) -> None:
    from cpd_mtp.apps.models import model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the earlier commit")
    parser.add_argument("--model", type=Path, default=model_path("smollm2"))
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    harness.add_output_arguments(parser, "versions")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.rounds = 2, 16, 1
    new_checkout = harness.ROOT
    model = args.model.resolve()
    results: dict[str, list[list[dict]]] = {"old": [], "new": []}
    for index in range(args.rounds):
        order = ("old", "new") if index % 2 == 0 else ("new", "old")
        for which in order:
            checkout = args.old if which == "old" else new_checkout
            print(f"round {index + 1}/{args.rounds}: {which} ({checkout})", flush=True)
            results[which].append(
                run_round(checkout.resolve(), model, args.prompts, args.new_tokens)
            )
    ratios = [
        n["seconds"] / o["seconds"]
        for old_round, new_round in zip(results["old"], results["new"])
        for o, n in zip(old_round, new_round)
    ]
    same = all(
        o["sequence"] == n["sequence"]
        for old_round, new_round in zip(results["old"], results["new"])
        for o, n in zip(old_round, new_round)
    )

    def tpf(which: str) -> float:
        rows = [r for round_ in results[which] for r in round_]
        return sum(r["tokens"] for r in rows) / sum(
            r["tokens"] / r["tokens_per_forward"] for r in rows
        )

    old_rev = subprocess.run(["git", "-C", str(args.old), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    summary = harness.percentiles(ratios)
    print(f"this version's seconds / {old_rev}'s: {summary['p50']:.3f} (p20 {summary['p20']:.3f}, "
          f"p80 {summary['p80']:.3f}); tokens per forward {tpf('new'):.2f} vs {tpf('old'):.2f}; "
          f"same tokens: {same}")  # fmt: skip
    for rounds in results.values():
        for round_ in rounds:
            for row in round_:
                row.pop("sequence")
    harness.write_results(
        args,
        {
            "config": {
                k: portable_path(v) if isinstance(v, Path) else v for k, v in vars(args).items()
            },
            "old_commit": old_rev,
            "seconds_ratio_new_over_old": summary,
            "tokens_per_forward": {"new": tpf("new"), "old": tpf("old")},
            "same_tokens": same,
            "rounds": results,
        },
    )


if __name__ == "__main__":
    main()
