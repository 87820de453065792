"""The retrofit as a user runs it, against the alternatives that need no training.

1. ``cpd-mtp retrofit --model <SmolLM2 GGUF> --out runs/bench-retrofit --minutes M`` with every
   default, as a separate command, its wall clock timed (the budget bounds it, measurement
   included).
2. The export loaded as users load it (``CPDMTPForCausalLM.from_pretrained``), and held-out chat
   (through the chat template) and code prompts decoded by every decoder of
   ``cpd_mtp.decoding.measure`` (the original model's HF ``generate``; HF greedy and HF prompt
   lookup in the packed layout; this decoder with context drafts only; the head's drafts only;
   plain ``model.generate``), interleaved prompt by prompt, greedy, the model's EOS.
3. The same for a freshly attached, untrained head (the retrofit's defaults): what the decoder
   does when the head has learned nothing.

The JSON holds the environment, the settings, the command's wall clock and both measurements,
and the targets (default over the best zero-training alternative, tokens per forward) with
whether each was met.

    python benchmarks/bench_retrofit.py                    # docs/benchmarks/retrofit.json
    python benchmarks/bench_retrofit.py --quick            # 1 minute, 1 prompt: the scratch dir
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from cpd_mtp.apps.models import model_path
from cpd_mtp.apps.results import portable_path

# The targets of the retrofit (default decoder, median over prompts).
TARGETS = {"chat": {"vs_best": 1.3, "tpf": 2.0}, "code": {"vs_best": 1.3, "tpf": 2.8}}
UNTRAINED_TARGET = {"chat": 0.95}
DECODERS = ("hf", "hf_packed", "hf_lookup", "context", "cp", "default")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=model_path("smollm2"))
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--prompts", type=int, default=10, help="held-out prompts per kind")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=Path("runs") / "bench-retrofit")
    parser.add_argument("--skip-train", action="store_true", help="measure the existing export")
    harness.add_output_arguments(parser, "retrofit")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.prompts, args.new_tokens, args.repeats = 1.5, 1, 16, 1

    import torch

    from cpd_mtp.decoding.measure import format_report, measure_decoders
    from cpd_mtp.hf.loading import load_causal_lm
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM
    from cpd_mtp.training.config import MODEL_SIZED_FIELDS, load_retrofit_config
    from cpd_mtp.training.retrofit import held_out_prompts, retrofit_head_config

    command = [sys.executable, "-m", "cpd_mtp.cli", "retrofit", "--model", str(args.model),
               "--out", str(args.out_dir), "--minutes", f"{args.minutes:g}", "--overwrite"]  # fmt: skip
    wall = None
    if not args.skip_train:
        print(" ".join(command[2:]), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ})
        wall = time.perf_counter() - start
    final = args.out_dir / "final"
    original, tokenizer = load_causal_lm(args.model, progress=False)
    original.eval()
    model = CPDMTPForCausalLM.from_pretrained(final, base_model=original).eval()
    cfg = load_retrofit_config({"model.path": str(args.model), "run.out_dir": "unused"})
    prompts = held_out_prompts(cfg, tokenizer, args.prompts)
    progress = lambda line: print(line, flush=True)  # noqa: E731
    trained = measure_decoders(model, original, prompts, args.new_tokens, decoders=DECODERS,
                               repeats=args.repeats, progress=progress)  # fmt: skip
    print(format_report(trained, args.new_tokens), flush=True)

    # A freshly attached head, untrained: the retrofit's defaults for this model.
    head_cfg = retrofit_head_config(cfg, original.config.hidden_size, original.config.vocab_size)
    settings = {k: v for k, v in head_cfg.to_dict().items() if k not in MODEL_SIZED_FIELDS}
    torch.manual_seed(0)
    fresh = CPDMTPForCausalLM.from_causal_lm(original, freeze_trunk=True, **settings).eval()
    fresh.generation_config = model.generation_config
    if fresh.head.draft_ids is not None:
        fresh.head.set_draft_vocab(model.head.draft_ids)
    untrained = measure_decoders(fresh, original, prompts, args.new_tokens,
                                 decoders=("hf", "hf_packed", "hf_lookup", "context", "default"),
                                 repeats=args.repeats, progress=progress)  # fmt: skip
    print("untrained head:" + format_report(untrained, args.new_tokens), flush=True)

    met = {}
    for kind, target in TARGETS.items():
        if kind in trained["kinds"]:
            summary = trained["kinds"][kind]
            met[kind] = {
                "vs_best_zero_training": summary["vs_best_zero_training"]["median"],
                "tokens_per_forward": summary["decoders"]["default"]["tokens_per_forward"],
                "target": target,
                "met": summary["vs_best_zero_training"]["median"] >= target["vs_best"]
                and summary["decoders"]["default"]["tokens_per_forward"] >= target["tpf"],
            }
    for kind, target in UNTRAINED_TARGET.items():
        if kind in untrained["kinds"]:
            value = untrained["kinds"][kind]["vs_best_zero_training"]["median"]
            met[f"untrained_{kind}"] = {"vs_best_zero_training": value, "target": target,
                                        "met": value >= target}  # fmt: skip
    harness.write_results(
        args,
        {
            "config": {
                k: portable_path(v) if isinstance(v, Path) else v for k, v in vars(args).items()
            },
            "command": " ".join(["cpd-mtp", *command[4:]]),
            "command_wall_s": wall,
            "minutes": args.minutes,
            "within_10_percent": None if wall is None else wall <= 1.1 * 60 * args.minutes,
            "trained": trained,
            "untrained": untrained,
            "targets": met,
        },
    )


if __name__ == "__main__":
    main()
