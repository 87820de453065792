"""The main job, as ``make demo`` runs it: make SmolLM2-135M-Instruct faster without changing it.

1. Load the real model (the GGUF ``make smollm2`` fetched) and retrofit a CP-MTP drafting head
   onto it, heads only, in base mode, self-distilled on its own greedy continuations of the
   embedded corpus (the Python standard library): ``cpd_mtp.training.retrofit``.
2. Complete a held-out prompt with the exported model.
3. Decode held-out prompts with self-speculative decoding and with the original model's own
   Hugging Face ``generate``, interleaved, and report tokens per forward, acceptance per draft
   position, the wall-clock speedup (median and spread over prompts) and whether every token
   was identical.

    python -m cpd_mtp.apps.demo                       # about 10 minutes on 2 cores
    python -m cpd_mtp.apps.demo --minutes 20          # a longer retrofit, more acceptance
    python -m cpd_mtp.apps.demo --skip-train          # measure runs/demo-smollm2/final again

The retrofit is ``cpd-mtp retrofit``'s defaults (the recipe) with a wall-clock budget:
``--minutes`` bounds data, state caching and training together.

``python -m cpd_mtp.apps.demo`` is ``cpd-mtp demo``; the from-scratch pretraining demo is
``cpd-mtp demo-scratch`` (``cpd_mtp.apps.scratch_demo``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cpd_mtp.utils.args import positive_int

OUT_DIR = Path("runs") / "demo-smollm2"
# The retrofit's share of `make demo`'s 10 minutes; the measurement after it takes the rest.
DEMO_MINUTES = 6.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (``cpd-mtp demo`` and ``python -m cpd_mtp.apps.demo``)."""
    from cpd_mtp.apps.models import model_path

    parser.add_argument(
        "--model", type=Path, default=model_path("smollm2"), help="HF folder or .gguf"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="run folder (replaced)")
    parser.add_argument(
        "--minutes", type=float, default=DEMO_MINUTES, help="the retrofit's wall-clock budget"
    )
    parser.add_argument("--rank", type=positive_int, default=None, help="experts r")
    parser.add_argument(
        "--n-future", type=positive_int, default=None, help="tokens per draft window n"
    )
    parser.add_argument(
        "--tokens", type=positive_int, default=None, help="most generated training tokens"
    )
    parser.add_argument("--draft-vocab", type=positive_int, default=None, help="draft vocabulary K")
    parser.add_argument("--prompts", type=positive_int, default=8, help="held-out prompts measured")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument(
        "--repeats", type=positive_int, default=2, help="timed passes over the prompts"
    )
    parser.add_argument("--skip-train", action="store_true", help="measure the existing export")


def _config(args: argparse.Namespace):
    """The demo's ``RetrofitConfig``."""
    from cpd_mtp.training.config import load_retrofit_config

    chosen = {
        "head.n_future": args.n_future,
        "head.rank": args.rank,
        "head.draft_vocab_size": args.draft_vocab,
        "data.tokens": args.tokens,
    }
    return load_retrofit_config(
        {
            "model.path": str(args.model),
            "run.out_dir": str(args.out),
            "run.minutes": args.minutes,
            **{key: value for key, value in chosen.items() if value is not None},
            "run.eval_every": 10**9,  # validation at the start and the end
            "run.overwrite": True,  # `make demo` replaces its own earlier run
            "run.measure_prompts": 0,  # the demo measures more prompts itself, below
        }
    )


def _retrofit(cfg: Any, base: tuple[Any, Any]) -> None:
    from cpd_mtp.training.retrofit import RetrofitTrainer

    head, data = cfg.head, cfg.data
    print(
        f"== retrofit: n={head.n_future}, r={head.rank}, draft vocabulary "
        f"{head.draft_vocab_size}, {data.distill} data (at most {data.tokens:,} tokens), heads "
        f"only, within {cfg.run.minutes:g} minutes ==",
        flush=True,
    )
    trainer = RetrofitTrainer(cfg, base=base)
    try:
        trainer.train()
    finally:
        trainer.close()


def run(args: argparse.Namespace) -> None:
    import torch

    from cpd_mtp.decoding import generate
    from cpd_mtp.decoding.measure import format_report, measure_retrofit
    from cpd_mtp.hf.loading import load_causal_lm
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM
    from cpd_mtp.training.retrofit import held_out_prompt_ids

    if not args.model.exists():
        sys.exit(f"error: no model at {args.model} (run `make smollm2`)")
    final = args.out / "final"
    if args.skip_train and not final.is_dir():
        sys.exit(f"error: --skip-train needs an export at {final}; run the demo without it first")
    cfg = _config(args)
    base = load_causal_lm(args.model)
    base[0].eval()
    if not args.skip_train:
        _retrofit(cfg, base)
    model = CPDMTPForCausalLM.from_pretrained(final).eval()
    tokenizer = base[1]
    try:
        prompts = held_out_prompt_ids(cfg, tokenizer, args.prompts, prompt_tokens=48)
    except ValueError as err:
        sys.exit(f"error: {err}")

    with torch.no_grad():
        out = generate(model, prompts[0][None], args.max_new_tokens)
    print("\n== a held-out prompt (standard-library code the head never saw), completed ==")
    print(
        tokenizer.decode(prompts[0])
        + "⟨"
        + tokenizer.decode(out.sequences[0, len(prompts[0]) :])
        + "⟩"
    )
    print(f"({out.stats.tokens_per_forward:.2f} tokens per forward; the completion is between ⟨ ⟩)")

    measured = measure_retrofit(
        model, base[0], prompts, args.max_new_tokens, repeats=args.repeats, temperature=0.7
    )
    print(format_report(measured, len(prompts), args.max_new_tokens, args.repeats))
    print(f"\nThe retrofitted model is in {final} (loads with CPDMTPForCausalLM.from_pretrained).")
    print("Next:")
    print(f"  cpd-mtp generate --model {final} --prompt 'def parse(' --max-new-tokens 64")
    print(
        f"  cpd-mtp retrofit --model {args.model} --out runs/my-retrofit --minutes 30 "
        "--tokens 200000   # more time and data, more acceptance"
    )
    print("  docs/guides/retrofit.md: your own model, the options, what to expect")


def main(argv: list[str] | None = None) -> None:
    """``python -m cpd_mtp.apps.demo ...`` is ``cpd-mtp demo ...``."""
    parser = argparse.ArgumentParser(prog="cpd-mtp demo")
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
