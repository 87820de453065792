"""The ``cpd-mtp`` command.

cpd-mtp train --preset demo run.steps=500      # DeepSpeed training (see cpd_mtp.training.trainer)
cpd-mtp generate --model runs/demo/final --prompt "def parse(" [--sample ...]
cpd-mtp bench ranks [--size default]           # the rank study (see cpd_mtp.apps.rank_study)
cpd-mtp demo                                   # the main job, as `make demo` runs it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def generate_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="cpd-mtp generate",
                                     description="Stream a completion with self-speculative decoding.")  # fmt: skip
    parser.add_argument("--model", required=True, type=Path, help="a saved CPDMTPForCausalLM")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        sys.exit(f"error: --model {args.model} is not a saved model directory (no config.json)")

    import torch
    from transformers import AutoTokenizer

    from cpd_mtp.decoding.sampling import check_warping
    from cpd_mtp.decoding.speculative import _special_token_ids, generate
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.sample:
        try:
            check_warping(args.temperature, args.top_k, args.top_p)
        except ValueError as error:
            parser.error(str(error))
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    tokenizer.padding_side = "left"
    model = CPDMTPForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    # Stop where HF `model.generate` and `cpd_mtp.generate` stop: the model's generation
    # config; the tokenizer's ids only where the model has none.
    eos_token_id, pad_token_id = _special_token_ids(model, None, None)
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id
    batch = tokenizer(args.prompt, return_tensors="pt", padding=len(args.prompt) > 1)
    generator = torch.Generator().manual_seed(args.seed)
    streaming = len(args.prompt) == 1

    def stream(new_ids: torch.Tensor) -> None:  # (B, k) tokens accepted this iteration
        print(tokenizer.decode(new_ids[0]), end="", flush=True)

    if streaming:
        print(args.prompt[0], end="", flush=True)
    out = generate(
        model, batch.input_ids, args.max_new_tokens, attention_mask=batch.attention_mask,
        do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        generator=generator, stream=stream if streaming else None,
    )  # fmt: skip
    if not streaming:
        for row in tokenizer.batch_decode(out.sequences, skip_special_tokens=True):
            print(row, end="\n---\n")
    rates = " ".join(f"{a:.2f}" for a in out.acceptance_rate)
    print(f"\n\n[{out.new_tokens} tokens, {out.forwards} forwards, "
          f"{out.tokens_per_forward:.2f} tokens/forward, acceptance per draft position: {rates}, "
          f"{out.wall_time_s:.2f} s]", file=sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("train", "generate", "bench", "demo")
    if not argv or argv[0] not in commands:
        print(__doc__)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    command, rest = argv[0], argv[1:]
    if command == "train":
        from cpd_mtp.training.trainer import main as train_main

        train_main(rest)
    elif command == "generate":
        generate_command(rest)
    elif command == "demo":
        from cpd_mtp.apps.demo import main as demo_main

        demo_main(rest)
    else:
        if rest[:1] != ["ranks"]:
            sys.exit("usage: cpd-mtp bench ranks [options]")
        from cpd_mtp.apps.rank_study import main as study_main

        study_main(rest[1:])


if __name__ == "__main__":
    main()
