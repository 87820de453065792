"""``cpd-mtp measure``: what an export's head adds, on held-out chat and code prompts.

    cpd-mtp measure --model runs/smollm2/final               # 4 chat + 4 code prompts x 64 tokens
    cpd-mtp measure --model runs/smollm2/final --repeats 3 --out measure.json

The export is a retrofit's (drafter-only or ``--merged``). Its original model is the base a
drafter-only export records (``--base`` names another copy), or, for a merged export, the
export's own trunk and W_U as a plain causal LM. The prompts are the ones a retrofit never
trains on: held-out chat turns through the model's chat template (when it has one) and code
from the corpus's validation documents. Every prompt is decoded, interleaved, by the original
model's Hugging Face ``generate``, the alternatives that need no training (HF greedy and HF
prompt lookup in the packed layout, this decoder with context drafts only) and the default
decoder (``cpd_mtp.decoding.measure``), with one line of progress per prompt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cpd_mtp.utils.args import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="a retrofit's export folder")
    parser.add_argument(
        "--base", default=None, help="the original model (default: the one the export records)"
    )
    parser.add_argument(
        "--prompts", type=positive_int, default=4, help="held-out prompts of each kind"
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=2, help="interleaved passes")
    parser.add_argument(
        "--head-only",
        action="store_true",
        help="also time this decoder with the head's drafts only",
    )
    parser.add_argument(
        "--data", action="append", default=None, help="corpus path/glob (repeat); default stdlib"
    )
    parser.add_argument("--max-files", type=positive_int, default=None)
    parser.add_argument(
        "--chat-prompts",
        default=None,
        help="a JSONL of chat prompts (default: ShareGPT's held-out)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no line per prompt")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")


def load_pair(export: Path, base: str | None) -> tuple[Any, Any, Any]:
    """(retrofitted model, original model, tokenizer) of an export, sharing the base's weights."""
    from cpd_mtp.hf.export import drafter_base
    from cpd_mtp.hf.loading import load_causal_lm
    from cpd_mtp.hf.saved import export_kind, open_export
    from cpd_mtp.training.trainer import base_from_export

    if export_kind(export) == "drafter":
        original, _ = load_causal_lm(base or drafter_base(export), tokenizer=False, progress=False)
        model, tokenizer = open_export(export, base_model=original)
    else:
        model, tokenizer = open_export(export)
        original = (
            load_causal_lm(base, tokenizer=False, progress=False)[0]
            if base
            else base_from_export(export)
        )
    return model, original.eval(), tokenizer


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cpd_mtp.decoding.measure import format_report, head_adds_nothing, measure_decoders
    from cpd_mtp.training.config import load_retrofit_config
    from cpd_mtp.training.retrofit import held_out_prompts

    if not (args.model / "config.json").is_file():
        sys.exit(f"error: {args.model} is not an export folder (no config.json)")
    try:
        model, original, tokenizer = load_pair(args.model, args.base)
        data: dict[str, Any] = {"model.path": str(args.model), "run.out_dir": "unused"}
        if args.data:
            data["data.source"] = args.data[0] if len(args.data) == 1 else args.data
        if args.max_files:
            data["data.max_files"] = args.max_files
        if args.chat_prompts:
            data["data.prompts"] = args.chat_prompts
        prompts = held_out_prompts(load_retrofit_config(data), tokenizer, args.prompts)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        sys.exit(f"error: {' '.join(str(err).split())}")
    decoders = ["hf", "hf_packed", "hf_lookup", "context", *(["cp"] if args.head_only else []),
                "default"]  # fmt: skip
    print(
        f"measuring {', '.join(f'{len(v)} {k}' for k, v in prompts.items())} held-out prompts x "
        f"{args.max_new_tokens} tokens, {args.repeats} interleaved passes, {len(decoders)} "
        "decoders each",
        file=sys.stderr,
        flush=True,
    )
    measured = measure_decoders(
        model,
        original,
        prompts,
        args.max_new_tokens,
        decoders=decoders,
        repeats=args.repeats,
        progress=None
        if args.no_progress
        else (lambda line: print(line, file=sys.stderr, flush=True)),
    )
    print(format_report(measured, args.max_new_tokens))
    warning = head_adds_nothing(measured)
    if warning is not None:
        print(warning, file=sys.stderr)
    if args.out is not None:
        from cpd_mtp.apps.results import environment, write_json

        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        config = {k: v for k, v in config.items() if k not in ("run", "parser")}
        write_json(args.out, {"environment": environment("cpu"), "config": config, **measured})
        print(f"wrote {args.out}")
    return measured


def main(argv: list[str] | None = None) -> None:
    """``python -m cpd_mtp.apps.measure ...`` is ``cpd-mtp measure ...``."""
    parser = argparse.ArgumentParser(prog="cpd-mtp measure")
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
