"""The from-scratch demo (``make demo-scratch``): pretraining a small model with the CP loss.

1. Train a small Llama-shaped trunk with a CP head (n=4, r=4) on the embedded corpus, the
   Python standard library, through DeepSpeed on this machine (the ``demo`` preset).
2. Report validation joint NLL, next-token NLL of the marginal, per-head NLL, expert usage.
3. Complete held-out prompts with greedy self-speculative decoding and compare its
   wall-clock time with autoregressive decoding (HF ``generate``) of the same model.

    python -m cpd_mtp.apps.scratch_demo                # the default, a few minutes on 2 cores
    python -m cpd_mtp.apps.scratch_demo run.steps=50   # any training override
    python -m cpd_mtp.apps.scratch_demo --skip-train   # decode with runs/demo/final as it is

``python -m cpd_mtp.apps.scratch_demo`` is ``cpd-mtp demo-scratch`` (arguments in
``cpd_mtp.cli``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from cpd_mtp.training.config import data_config, load_train_config
from cpd_mtp.utils.args import positive_int


def report_training(metrics: dict[str, float], n_future: int, rank: int) -> None:
    print("\n== validation (held-out stdlib files) ==")
    joint = metrics["val/joint_nll"]
    print(f"joint NLL per position     {joint:.3f} nats ({n_future} future tokens)")
    print(f"joint NLL per target       {metrics['val/joint_nll_per_target']:.3f} nats")
    print(f"next-token NLL (marginal)  {metrics['val/next_token_nll']:.3f} nats")
    heads = "  ".join(f"{metrics[f'val/head_nll/{s}']:.3f}" for s in range(1, n_future + 1))
    print(f"per-head NLL (s=1..{n_future})     {heads}")
    usage = "  ".join(f"{metrics[f'val/expert_usage/{a}']:.2f}" for a in range(rank))
    print(f"expert usage (mean w)      {usage}   gate entropy {metrics['val/gate_entropy']:.3f}")


def decode_and_compare(model_dir: Path, prompts: list[str], max_new_tokens: int) -> None:
    from transformers import AutoTokenizer

    from cpd_mtp.apps.compare import compare_decoding
    from cpd_mtp.decoding import generate
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = CPDMTPForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    ids = [tokenizer(p, return_tensors="pt").input_ids[0] for p in prompts]
    out = generate(model, ids[0][None], max_new_tokens)
    print("\n== completion of a held-out prompt (greedy self-speculative decoding) ==")
    print(prompts[0] + "\033[1m" + tokenizer.decode(out.sequences[0, len(ids[0]) :]) + "\033[0m")
    with torch.no_grad():
        stats = compare_decoding(
            model, ids, max_new_tokens, repeats=3, pad_token_id=tokenizer.pad_token_id
        )
    from cpd_mtp.decoding.output import format_rates

    rates = format_rates(stats["acceptance_rate"], sep=", ")
    spec = sorted(stats["spec_time_s"])[1]
    ar = sorted(stats["ar_time_s"])[1]
    print("\n== self-speculative vs autoregressive decoding (same model, same run) ==")
    print(f"{len(prompts)} held-out prompts x {max_new_tokens} new tokens, greedy, batch 1")
    print(f"tokens per forward          {statistics.median(stats['tokens_per_forward']):.2f}")
    print(f"acceptance per draft pos.   {rates}")
    print(f"identical to HF generate    {stats['identical']}")
    print(
        f"wall clock (median of 3)    speculative {spec:.2f} s, "
        f"autoregressive (HF generate) {ar:.2f} s: speedup {stats['speedup']:.2f}x"
    )


def run(
    preset: str,
    overrides: list[str],
    skip_train: bool = False,
    prompts: int = 6,
    max_new_tokens: int = 64,
) -> None:
    """Train (unless ``skip_train``), report, then decode ``prompts`` held-out prompts."""
    # `make demo` re-trains into the same folder on every call: replace its own earlier run.
    if not skip_train:
        overrides = ["run.overwrite=true", *overrides]
    cfg = load_train_config(preset, overrides)
    if not skip_train:
        from cpd_mtp.training.trainer import Trainer

        trainer = Trainer(cfg)
        report_training(trainer.train(), cfg.head.n_future, cfg.head.rank)
        corpus = trainer.corpus
    else:
        from cpd_mtp.training.data import build_corpus

        corpus = build_corpus(data_config(cfg.data, progress=cfg.run.progress))
    texts = corpus.held_out_prompts(prompts, prompt_tokens=48)
    decode_and_compare(Path(cfg.run.out_dir) / "final", texts, max_new_tokens)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="a packaged preset or a YAML path")
    parser.add_argument("--skip-train", action="store_true", help="decode the existing export")
    parser.add_argument("--prompts", type=positive_int, default=6, help="held-out prompts")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("overrides", nargs="*", help="training overrides, e.g. run.steps=50")


def run_command(args: argparse.Namespace) -> None:
    run(args.preset, args.overrides, args.skip_train, args.prompts, args.max_new_tokens)


def main(argv: list[str] | None = None) -> None:
    """``python -m cpd_mtp.apps.scratch_demo ...`` is ``cpd-mtp demo-scratch ...``."""
    from cpd_mtp.utils.args import parse_with_overrides

    parser = argparse.ArgumentParser(prog="cpd-mtp demo-scratch")
    add_arguments(parser)
    run_command(parse_with_overrides(parser, argv))


if __name__ == "__main__":
    main()
