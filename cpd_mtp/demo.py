"""The main job, as ``make demo`` runs it.

1. Train a small Llama-shaped trunk with a CP head (n=4, r=4) on the embedded corpus, the
   Python standard library, through DeepSpeed on this machine (``configs/demo.yaml``).
2. Report validation joint NLL, next-token NLL of the marginal, per-head NLL, expert usage.
3. Complete held-out prompts with greedy self-speculative decoding and compare its
   wall-clock time with autoregressive decoding (HF ``generate``) of the same model.

    python -m cpd_mtp.demo                       # the default, a few minutes on 2 cores
    python -m cpd_mtp.demo run.steps=50          # any training override
    python -m cpd_mtp.demo --skip-train          # decode with runs/demo/final as it is
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cpd_mtp.train_config import load_train_config


def report_training(metrics: dict[str, float], n_future: int, rank: int) -> None:
    print("\n== validation (held-out stdlib files) ==")
    print(f"joint NLL per position     {metrics['val/joint_nll']:.3f} nats "
          f"({n_future} future tokens)")  # fmt: skip
    print(f"joint NLL per target       {metrics['val/joint_nll_per_target']:.3f} nats")
    print(f"next-token NLL (marginal)  {metrics['val/next_token_nll']:.3f} nats")
    heads = "  ".join(f"{metrics[f'val/head{s}_nll']:.3f}" for s in range(1, n_future + 1))
    print(f"per-head NLL (s=1..{n_future})     {heads}")
    usage = "  ".join(f"{metrics[f'val/expert{a}_weight']:.2f}" for a in range(rank))
    print(f"expert usage (mean w)      {usage}   gate entropy {metrics['val/gate_entropy']:.3f}")


def decode_and_compare(model_dir: Path, prompts: list[str], max_new_tokens: int) -> None:
    from transformers import AutoTokenizer

    from cpd_mtp.generation import generate
    from cpd_mtp.modeling import CPDMTPForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = CPDMTPForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    spec_time = ar_time = 0.0
    new_tokens = forwards = 0
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        start = time.perf_counter()
        out = generate(model, ids, max_new_tokens)
        spec_time += time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            reference = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        ar_time += time.perf_counter() - start
        same = torch.equal(out.sequences[0, : reference.shape[1]], reference[0])
        new_tokens += out.new_tokens
        forwards += out.forwards
        if i == 0:
            print("\n== completion of a held-out prompt (greedy, speculative) ==")
            print(
                prompt + "\033[1m" + tokenizer.decode(out.sequences[0, ids.shape[1] :]) + "\033[0m"
            )
        if not same:
            print(f"WARNING: prompt {i}: speculative output differs from autoregressive greedy")
    print("\n== self-speculative decoding vs autoregressive (same model, same run) ==")
    print(f"prompts {len(prompts)}, new tokens {new_tokens}, trunk forwards {forwards}")
    print(f"tokens per forward         {new_tokens / max(forwards, 1):.2f}")
    print(f"wall clock: speculative {spec_time:.2f} s, autoregressive {ar_time:.2f} s, "
          f"speedup {ar_time / spec_time:.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="cpd_mtp's main job on the embedded corpus.")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--skip-train", action="store_true", help="decode the existing export")
    parser.add_argument("--prompts", type=int, default=6, help="held-out prompts to decode")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="training overrides, e.g. run.steps=50")
    args = parser.parse_args(argv)
    cfg = load_train_config(args.preset, args.overrides)
    if not args.skip_train:
        from cpd_mtp.train import Trainer

        trainer = Trainer(cfg)
        report_training(trainer.train(), cfg.head.n_future, cfg.head.rank)
        corpus = trainer.corpus
    else:
        from cpd_mtp.data import DataConfig, build_corpus

        d = cfg.data
        corpus = build_corpus(DataConfig(source=d.source, vocab_size=d.vocab_size,
                                         tokenizer=d.tokenizer, max_files=d.max_files,
                                         block_size=d.block_size, val_fraction=d.val_fraction))  # fmt: skip
    prompts = corpus.held_out_prompts(args.prompts, prompt_tokens=48)
    decode_and_compare(Path(cfg.run.out_dir) / "final", prompts, args.max_new_tokens)


if __name__ == "__main__":
    main()
