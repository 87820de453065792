"""The ``cpd-mtp`` command: one argparse subparser per subcommand.

    cpd-mtp train --preset demo run.steps=500     # DeepSpeed training (cpd_mtp.training.trainer)
    cpd-mtp train --preset tiny --print-config    # the merged config; `train --help`: every key
    cpd-mtp generate --model runs/demo/final --prompt "def parse(" [--sample ...]
    cpd-mtp retrofit --model M --out DIR          # a drafting head for a pretrained model
    cpd-mtp demo                                  # the main job, as `make demo` runs it
    cpd-mtp demo-scratch                          # pretraining with the CP loss, from scratch
    cpd-mtp bench ranks [--size default]          # the rank study (cpd_mtp.apps.rank_study)
    cpd-mtp bench retrofit                        # the retrofit study on SmolLM2

The parsers hold only argument definitions, so ``cpd-mtp --help`` imports no heavy dependency
(``import cpd_mtp`` registers the Auto classes through transformers' config code when it is
installed, nothing more); each command imports what it needs when it runs. A bad argument is argparse's
usage line and one ``error:`` line (exit 2), the same in every subcommand.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cpd_mtp.apps.results import non_negative_int, positive_int


# ---------------------------------------------------------------------- train
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="a packaged preset or a YAML path")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the run already in run.out_dir"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the merged config (YAML) and exit"
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. run.steps=100 (keys below)"
    )


def train_epilog() -> str:
    """Every config key, its default and what it does; built only when help is asked for."""
    from cpd_mtp.training.config import config_help

    return config_help()


def run_train(args: argparse.Namespace) -> None:
    from cpd_mtp.training.trainer import run_command

    overrides = list(args.overrides)
    overrides += ["run.resume=true"] if args.resume else []
    overrides += ["run.overwrite=true"] if args.overwrite else []
    run_command(args.preset, overrides, print_config=args.print_config, parser=args.parser)


# ---------------------------------------------------------------------- generate
def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="a saved CPDMTPForCausalLM")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--max-new-tokens", type=non_negative_int, default=128)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--draft-tree",
        type=_draft_tree,
        default="auto",
        help="'auto' (sized by the measured forward cost), 'chain', or the most draft nodes",
    )
    parser.add_argument(
        "--no-context-drafts", action="store_true", help="no prompt-lookup branches"
    )


def _draft_tree(text: str) -> str | int:
    if text in ("auto", "chain"):
        return text
    try:
        return non_negative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be 'auto', 'chain' or an int >= 0, got {text!r}"
        ) from None


def run_generate(args: argparse.Namespace) -> None:
    """Stream a completion (one prompt) or print every completion (a batch), then statistics."""
    if any(not prompt for prompt in args.prompt):
        args.parser.error("--prompt must not be empty")
    if not (args.model / "config.json").is_file():
        sys.exit(f"error: --model {args.model} is not a saved model directory (no config.json)")

    import torch
    from transformers import TextStreamer

    from cpd_mtp.decoding import generate
    from cpd_mtp.decoding.inputs import special_token_ids
    from cpd_mtp.decoding.sampling import check_warping

    if args.sample:
        try:
            check_warping(args.temperature, args.top_k, args.top_p)
        except ValueError as error:
            args.parser.error(str(error))
    try:
        model, tokenizer = _load_export(args.model)
    except ValueError as error:
        sys.exit(f"error: {error}")
    # Stop where HF `model.generate` and `cpd_mtp.generate` stop: the model's generation
    # config; the tokenizer's ids only where the model has none.
    eos_token_id, pad_token_id = special_token_ids(model, None, None)
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id
    batch = tokenizer(args.prompt, return_tensors="pt", padding=len(args.prompt) > 1)
    generator = torch.Generator().manual_seed(args.seed)
    streaming = len(args.prompt) == 1
    # TextStreamer decodes everything generated so far and prints only the settled text, so a
    # character whose bytes span several tokens (or forwards) prints whole, never as "\ufffd".
    streamer = TextStreamer(tokenizer, skip_prompt=True) if streaming else None
    if streaming:
        print(args.prompt[0], end="", flush=True)
    out = generate(
        model,
        batch.input_ids,
        args.max_new_tokens,
        attention_mask=batch.attention_mask,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        generator=generator,
        streamer=streamer,
        draft_tree=args.draft_tree,
        context_drafts=False if args.no_context_drafts else None,
    )
    if not streaming:
        for row in tokenizer.batch_decode(out.sequences, skip_special_tokens=True):
            print(row, end="\n---\n")
    from cpd_mtp.decoding.output import format_rates

    rates = format_rates(out.acceptance_rate)
    summary = (
        f"{out.new_tokens} tokens, {out.forwards} forwards, "
        f"{out.tokens_per_forward:.2f} tokens/forward, acceptance per draft depth: {rates}, "
        f"draft nodes per forward: {_sizes(out.tree_sizes)}, "
        f"{out.wall_time_s:.2f} s"
    )
    print(f"\n\n[{summary}]", file=sys.stderr)


def _sizes(tree_sizes: dict[int, int]) -> str:
    """'4 x12, 15 x3': draft nodes fed per forward, and how many forwards fed that many."""
    return ", ".join(f"{size} x{count}" for size, count in tree_sizes.items()) or "-"


def _load_export(path: Path) -> tuple[Any, Any]:
    """The saved model and its tokenizer; a ``ValueError`` in one line for a folder that is not
    a complete cpd_mtp model (another model type, no weights, no tokenizer, corrupt files)."""
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    from cpd_mtp.hf.loading import check_model_folder, transformers_progress
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    check_model_folder(path)
    try:  # a ValueError (another model type, say) already names the folder in one line
        with transformers_progress(False):
            model = CPDMTPForCausalLM.from_pretrained(path, local_files_only=True).eval()
    except (OSError, RuntimeError, KeyError, SafetensorError) as error:  # e.g. a truncated file
        raise ValueError(
            f"{path}: cannot load the model ({type(error).__name__}: {error})"
        ) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot load the tokenizer ({error})") from error
    tokenizer.padding_side = "left"
    return model, tokenizer


# ---------------------------------------------------------------------- retrofit
def _optional_positive_int(text: str) -> int | None:
    return None if text.lower() == "none" else positive_int(text)


def add_retrofit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a local HF model folder or a .gguf file")
    parser.add_argument("--out", required=True, help="the run folder; the export goes to OUT/final")
    parser.add_argument("--n-future", type=positive_int, default=4, help="tokens drafted jointly")
    parser.add_argument("--rank", type=positive_int, default=4, help="experts of the CP head")
    parser.add_argument(
        "--tokens", type=positive_int, default=200_000, help="the training token budget"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--draft-vocab", type=positive_int, default=None, help="K most frequent training ids"
    )
    parser.add_argument("--distill", choices=["kl", "generated", "none"], default="kl")
    parser.add_argument("--beta", type=float, default=0.9, help="kl: weight of the KL")
    parser.add_argument("--gamma", type=float, default=0.8, help="kl: decay over offsets")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="generated: 0 greedy, > 0 samples"
    )
    parser.add_argument("--prompt-tokens", type=positive_int, default=None)
    parser.add_argument("--generate-batch-size", type=positive_int, default=16)
    parser.add_argument(
        "--data", action="append", default=None, help="corpus path/glob (repeat); default stdlib"
    )
    parser.add_argument("--max-files", type=positive_int, default=None)
    parser.add_argument("--block-size", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--grad-accum", type=positive_int, default=1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--steps", type=_optional_positive_int, default=None)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--warmup-steps", type=non_negative_int, default=None, help="default: 5%% of the steps"
    )
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0)
    parser.add_argument(
        "--expert-type", choices=["linear", "resblock", "lowrank"], default="linear"
    )
    parser.add_argument(
        "--balance-coef", type=float, default=0.01, help="weight of the gate's balancing loss"
    )
    parser.add_argument("--eval-every", type=positive_int, default=100)
    parser.add_argument("--eval-blocks", type=positive_int, default=32)
    parser.add_argument("--save-every", type=positive_int, default=100)
    parser.add_argument("--dtype", default=None, help="the base model's dtype (default: its own)")
    parser.add_argument("--store-dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    parser.add_argument("--no-export", action="store_true", help="skip writing OUT/final")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def run_retrofit(args: argparse.Namespace) -> None:
    from cpd_mtp.training.retrofit import RetrofitConfig, run_command

    data = "stdlib" if not args.data else args.data[0] if len(args.data) == 1 else args.data
    # Flags are named like the config's fields; the four that are not are mapped here.
    fields = {f.name for f in dataclasses.fields(RetrofitConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values.update(
        out_dir=args.out, data=data, export=not args.no_export, progress=not args.no_progress
    )
    cfg = RetrofitConfig(**values)
    run_command(cfg)


# ---------------------------------------------------------------------- demo
def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from cpd_mtp.apps.demo import add_arguments  # argument definitions only

    add_arguments(parser)


def run_demo(args: argparse.Namespace) -> None:
    from cpd_mtp.apps.demo import run

    run(args)


def add_scratch_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="a packaged preset or a YAML path")
    parser.add_argument("--skip-train", action="store_true", help="decode the existing export")
    parser.add_argument("--prompts", type=positive_int, default=6, help="held-out prompts")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("overrides", nargs="*", help="training overrides, e.g. run.steps=50")


def run_scratch_demo(args: argparse.Namespace) -> None:
    from cpd_mtp.apps.scratch_demo import run

    run(args.preset, args.overrides, args.skip_train, args.prompts, args.max_new_tokens)


# ---------------------------------------------------------------------- bench retrofit
def add_retrofit_study_arguments(parser: argparse.ArgumentParser) -> None:
    from cpd_mtp.apps.retrofit_study import add_arguments  # argument definitions only

    add_arguments(parser)


def run_retrofit_study(args: argparse.Namespace) -> None:
    from cpd_mtp.apps.retrofit_study import check_args, run_study

    run_study(check_args(args, args.parser))


# ---------------------------------------------------------------------- bench ranks
def add_rank_study_arguments(parser: argparse.ArgumentParser) -> None:
    from cpd_mtp.apps.rank_study import PLAN, SIZES  # tables only: it imports torch lazily

    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        help="seeds per configuration (at least 1; default: the size's)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[spec.name for spec in PLAN],
        help="a subset of configurations (ntp always runs: the others compare to it)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("docs/rank_study"), help="results: JSON, table, plots"
    )
    parser.add_argument(
        "--runs",
        type=Path,
        default=Path("runs/rank_study"),
        help="the trained runs: checkpoints, exports, metrics",
    )


def run_rank_study(args: argparse.Namespace) -> None:
    from cpd_mtp.apps.rank_study import run_study

    payload = run_study(args.size, args.out, args.runs, args.seeds, args.only)
    print((args.out / "table.md").read_text())
    print(f"wrote {args.out} in {payload['wall_time_s'] / 60:.1f} min")


# ---------------------------------------------------------------------- the parser
class _HelpWithEpilog(argparse.Action):
    """``-h``/``--help`` that builds the epilog first: it may import what ``--help`` of the
    other commands must not (``train``'s list of config keys)."""

    def __init__(
        self, option_strings: list[str], dest: str, epilog: Callable[[], str], **kwargs: Any
    ) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.epilog = epilog

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.epilog = self.epilog()
        parser.print_help()
        parser.exit()


def _command(
    commands: argparse._SubParsersAction,
    name: str,
    summary: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], None],
    prog: str,
    epilog: Callable[[], str] | None = None,
) -> None:
    extra: dict[str, Any] = {}
    if epilog is not None:  # help built on demand, its line breaks kept
        extra = {"add_help": False, "formatter_class": argparse.RawDescriptionHelpFormatter}
    parser = commands.add_parser(name, help=summary, description=summary, prog=prog, **extra)
    if epilog is not None:
        parser.add_argument(
            "-h", "--help", action=_HelpWithEpilog, epilog=epilog, help="show this help and exit"
        )
    add_arguments(parser)
    parser.set_defaults(run=run, parser=parser)


def build_parser() -> argparse.ArgumentParser:
    """``cpd-mtp`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="cpd-mtp",
        description="Rank-r CP multi-token prediction: train, generate, demo, benchmarks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(
        commands,
        "train",
        "Train a CP-MTP model with DeepSpeed.",
        add_train_arguments,
        run_train,
        "cpd-mtp train",
        epilog=train_epilog,
    )
    _command(
        commands,
        "generate",
        "Stream a completion with self-speculative decoding.",
        add_generate_arguments,
        run_generate,
        "cpd-mtp generate",
    )
    _command(
        commands,
        "retrofit",
        "Train a drafting head for a pretrained model (its outputs stay the same).",
        add_retrofit_arguments,
        run_retrofit,
        "cpd-mtp retrofit",
    )
    _command(
        commands,
        "demo",
        "The main job: retrofit SmolLM2-135M with a drafting head and measure the speedup.",
        add_demo_arguments,
        run_demo,
        "cpd-mtp demo",
    )
    _command(
        commands,
        "demo-scratch",
        "Pretrain a small model with the CP loss on the embedded corpus, evaluate, decode.",
        add_scratch_demo_arguments,
        run_scratch_demo,
        "cpd-mtp demo-scratch",
    )
    bench = commands.add_parser("bench", help="studies", description="Studies.")
    studies = bench.add_subparsers(dest="study", required=True, metavar="STUDY")
    _command(
        studies,
        "ranks",
        "The rank study: does rank r beat rank 1, end to end on the embedded corpus.",
        add_rank_study_arguments,
        run_rank_study,
        "cpd-mtp bench ranks",
    )
    _command(
        studies,
        "retrofit",
        "The retrofit study: rank x distillation x seed on a real pretrained model.",
        add_retrofit_study_arguments,
        run_retrofit_study,
        "cpd-mtp bench retrofit",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting a positional list at the first option, so dotted overrides
    # may also follow options (`train --resume run.steps=10`); anything else is an error of
    # the subcommand that was called, reported by its own parser.
    overrides = [a for a in extra if not a.startswith("-") and "=" in a]
    unknown = [a for a in extra if a not in overrides]
    if overrides and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
    elif overrides:
        unknown = extra
    if unknown:
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    args.run(args)


if __name__ == "__main__":
    main()
