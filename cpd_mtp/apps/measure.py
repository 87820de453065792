"""``cpd-mtp measure``: how much faster an export decodes than its original model.

    cpd-mtp measure --model runs/smollm2/final               # 8 held-out prompts x 64 tokens
    cpd-mtp measure --model runs/smollm2/final --repeats 3 --out measure.json

The export is a retrofit's (drafter-only or ``--merged``). Its original model is the base a
drafter-only export records (``--base`` names another copy), or, for a merged export, the
export's own trunk and W_U as a plain causal LM. The prompts are held-out documents of the
corpus (``--data``, default the embedded standard library), prompt by prompt, interleaved
with the original model's own Hugging Face ``generate``: ``cpd_mtp.decoding.measure``.
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
    parser.add_argument("--prompts", type=positive_int, default=8, help="held-out prompts")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=2, help="interleaved passes")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="also sample at this temperature (tokens per forward); 0: greedy only",
    )
    parser.add_argument(
        "--data", action="append", default=None, help="corpus path/glob (repeat); default stdlib"
    )
    parser.add_argument("--max-files", type=positive_int, default=None)
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
    from cpd_mtp.decoding.measure import format_report, measure_retrofit, slower_warning
    from cpd_mtp.training.config import load_retrofit_config
    from cpd_mtp.training.retrofit import held_out_prompt_ids

    if not (args.model / "config.json").is_file():
        sys.exit(f"error: {args.model} is not an export folder (no config.json)")
    try:
        model, original, tokenizer = load_pair(args.model, args.base)
        data: dict[str, Any] = {"model.path": str(args.model), "run.out_dir": "unused"}
        if args.data:
            data["data.source"] = args.data[0] if len(args.data) == 1 else args.data
        if args.max_files:
            data["data.max_files"] = args.max_files
        prompts = held_out_prompt_ids(load_retrofit_config(data), tokenizer, args.prompts, 48)
    except (ValueError, FileNotFoundError, OSError) as err:
        sys.exit(f"error: {' '.join(str(err).split())}")
    measured = measure_retrofit(
        model,
        original,
        prompts,
        args.max_new_tokens,
        repeats=args.repeats,
        temperature=args.temperature or None,
    )
    print(format_report(measured, len(prompts), args.max_new_tokens, args.repeats))
    warning = slower_warning(measured)
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
