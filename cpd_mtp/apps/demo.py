"""The main job, as ``make demo`` runs it: make SmolLM2-135M-Instruct faster without changing it.

1. Load the real model (the GGUF ``make smollm2`` fetched) and retrofit a CP-MTP drafting head
   onto it with ``cpd-mtp retrofit``'s defaults (the recipe) within ``--minutes``, the whole
   run included: the model answers chat prompts (through its chat template) and code prompts,
   and the head learns from its answers (``cpd_mtp.training.retrofit``).
2. Answer a held-out chat prompt and continue held-out code with the result, streaming.
3. The retrofit's own end-of-run measurement (held-out chat and code prompts, every decoder
   interleaved, tokens identical to the original model's) is printed and written to
   ``<out>/measurement.json``; the demo adds ``<out>/demo.json`` with the settings, the
   environment and the wall clock.

    python -m cpd_mtp.apps.demo                       # about 9 minutes on 2 cores
    python -m cpd_mtp.apps.demo --minutes 20          # a longer retrofit, more acceptance
    python -m cpd_mtp.apps.demo --skip-train          # measure runs/demo-smollm2/final again

``python -m cpd_mtp.apps.demo`` is ``cpd-mtp demo``; the from-scratch pretraining demo is
``cpd-mtp demo-scratch`` (``cpd_mtp.apps.scratch_demo``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cpd_mtp.utils.args import positive_int

OUT_DIR = Path("runs") / "demo-smollm2"
# The retrofit's budget, its measurement included; loading and the two completions add about
# half a minute (make demo: under 10 minutes with the environment installed).
DEMO_MINUTES = 8.0


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
    parser.add_argument(
        "--prompts", type=positive_int, default=3, help="held-out prompts measured per kind"
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
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
            "run.measure_prompts": args.prompts,
            "run.measure_tokens": args.max_new_tokens,
            "run.measure_share": 0.2,
        }
    )


def _complete(model: Any, tokenizer: Any, ids: Any, title: str, max_new_tokens: int) -> None:
    from transformers import TextStreamer

    print(f"\n== {title} ==", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=False)
    model.generate(ids[None], max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
    stats = model.last_generation_stats
    print(f"({stats.tokens_per_forward:.2f} tokens per forward)", flush=True)


def run(args: argparse.Namespace) -> None:
    from cpd_mtp.decoding.measure import format_report
    from cpd_mtp.hf.loading import load_causal_lm
    from cpd_mtp.hf.saved import open_export
    from cpd_mtp.training.retrofit import RetrofitTrainer, held_out_prompts

    start = time.perf_counter()
    if not args.model.exists():
        sys.exit(f"error: no model at {args.model} (run `make smollm2`)")
    final = args.out / "final"
    if args.skip_train and not final.is_dir():
        sys.exit(f"error: --skip-train needs an export at {final}; run the demo without it first")
    cfg = _config(args)
    base = load_causal_lm(args.model, progress=False)
    base[0].eval()
    if args.skip_train:
        model, _ = open_export(final, base_model=base[0])
        measurement = json.loads((args.out / "measurement.json").read_text())
    else:
        head = cfg.head
        print(
            f"== retrofit: n={head.n_future}, r={head.rank}, draft vocabulary "
            f"{head.draft_vocab_size}, the model's own answers to chat and code prompts, heads "
            f"only, within {cfg.run.minutes:g} minutes (measurement included) ==",
            flush=True,
        )
        trainer = RetrofitTrainer(cfg, base=base)
        try:
            trainer.train()
        finally:
            trainer.close()
        model, measurement = trainer.model, trainer.measurement
    try:
        prompts = held_out_prompts(cfg, base[1], 1)
    except (ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    for kind, title in (
        ("chat", "a held-out chat prompt, answered"),
        ("code", "held-out code, continued"),
    ):
        if kind in prompts:
            _complete(model, base[1], prompts[kind][0], title, args.max_new_tokens)
    if measurement is not None and args.skip_train:
        print(format_report(measurement, args.max_new_tokens))
    record = {
        "settings": vars(args) | {"model": str(args.model), "out": str(args.out)},
        "wall_s": time.perf_counter() - start,
        "measurement": str(args.out / "measurement.json"),
    }
    from cpd_mtp.apps.results import environment, write_json

    write_json(args.out / "demo.json", {"environment": environment("cpu"), **record})
    print(
        f"\nThe drafter is in {final} (CPDMTPForCausalLM.from_pretrained attaches it to the model)."
    )
    print(
        f"Demo: {record['wall_s'] / 60:.1f} minutes; {args.out / 'measurement.json'} holds the numbers."
    )
    print("Next:")
    print(f"  cpd-mtp generate --model {final} --chat --prompt 'Explain recursion briefly.'")
    print(f"  cpd-mtp measure --model {final}   # more prompts, every decoder, with spreads")
    print(
        f"  cpd-mtp retrofit --model {args.model} --out runs/my-retrofit --minutes 30   "
        "# more time, more acceptance"
    )
    print("  docs/guides/retrofit.md: your own model and prompts, the options, what to expect")


def main(argv: list[str] | None = None) -> None:
    """``python -m cpd_mtp.apps.demo ...`` is ``cpd-mtp demo ...``."""
    parser = argparse.ArgumentParser(prog="cpd-mtp demo")
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
