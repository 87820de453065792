"""The ``cpd-mtp`` command: one argparse subparser per subcommand.

    cpd-mtp train --preset demo run.steps=500     # DeepSpeed training (cpd_mtp.training.trainer)
    cpd-mtp train --preset tiny --print-config    # the merged config; `train --help`: every key
    cpd-mtp generate --model runs/demo/final --prompt "def parse(" [--sample ...]
    cpd-mtp retrofit --model M --out DIR          # a drafting head for a pretrained model
    cpd-mtp measure --model DIR/final             # its speed against the original model
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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cpd_mtp.utils.args import non_negative_int, parse_with_overrides


# ---------------------------------------------------------------------- train
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from cpd_mtp.training.arguments import add_train_arguments as add  # argparse only

    add(parser)


def train_epilog() -> str:
    """Every config key, its default and what it does; built only when help is asked for."""
    from cpd_mtp.training.config import config_help

    return config_help()


def run_train(args: argparse.Namespace) -> None:
    from cpd_mtp.training.arguments import train_overrides
    from cpd_mtp.training.trainer import run_command

    run_command(
        args.preset, train_overrides(args), print_config=args.print_config, parser=args.parser
    )


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
    parser.add_argument(
        "--chat",
        action="store_true",
        help="each prompt is a user message, put through the tokenizer's chat template",
    )
    lossy = parser.add_argument_group(
        "lossy decoding (opt-in: the text may differ from the original model's)"
    )
    lossy.add_argument(
        "--acceptance",
        choices=("exact", "typical", "confident"),
        default=None,
        help="which drafts to accept (default exact: the original model's output)",
    )
    lossy.add_argument("--typical-epsilon", type=float, default=None, help="typical: epsilon")
    lossy.add_argument("--typical-delta", type=float, default=None, help="typical: delta")
    lossy.add_argument(
        "--confidence", type=float, default=None, help="confident: the head's threshold tau"
    )
    lossy.add_argument(
        "--no-accept-verified",
        dest="accept_verified",
        action="store_const",
        const=False,
        default=None,
        help="confident: accept only confident drafts, not the verifier's own choices",
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
    import torch
    from transformers import TextStreamer

    from cpd_mtp.decoding import generate
    from cpd_mtp.decoding.inputs import special_token_ids
    from cpd_mtp.decoding.options import DraftOptions
    from cpd_mtp.decoding.sampling import check_warping

    if args.sample:
        try:
            check_warping(args.temperature, args.top_k, args.top_p)
        except ValueError as error:
            args.parser.error(str(error))
    lossy = {
        "acceptance": args.acceptance,
        "typical_epsilon": args.typical_epsilon,
        "typical_delta": args.typical_delta,
        "confidence": args.confidence,
        "accept_verified": args.accept_verified,
    }
    try:  # before the model loads
        DraftOptions.parse(args.draft_tree, None, None, **lossy)
    except ValueError as error:
        args.parser.error(str(error))
    from cpd_mtp.hf.saved import open_export

    try:
        model, tokenizer = open_export(args.model)
    except ValueError as error:
        sys.exit(f"error: {error}")
    # Stop where HF `model.generate` and `cpd_mtp.generate` stop: the model's generation
    # config; the tokenizer's ids only where the model has none.
    eos_token_id, pad_token_id = special_token_ids(model, None, None)
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id
    prompts = list(args.prompt)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            sys.exit(f"error: --chat: the tokenizer of {args.model} has no chat template")
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    # A chat template already holds the special tokens; plain text gets the tokenizer's own.
    batch = tokenizer(
        prompts,
        return_tensors="pt",
        padding=len(prompts) > 1,
        add_special_tokens=not args.chat,
    )
    generator = torch.Generator().manual_seed(args.seed)
    streaming = len(args.prompt) == 1
    # TextStreamer decodes everything generated so far and prints only the settled text, so a
    # character whose bytes span several tokens (or forwards) prints whole, never as "\ufffd".
    streamer = TextStreamer(tokenizer, skip_prompt=True) if streaming else None
    if streaming:
        print(prompts[0], end="", flush=True)
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
        **lossy,
    )
    if not streaming:
        for row in tokenizer.batch_decode(out.sequences, skip_special_tokens=True):
            print(row, end="\n---\n")
    from cpd_mtp.decoding.output import format_rates

    rates = format_rates(out.acceptance_rate)
    lossy_note = ""
    if out.acceptance != "exact":
        lossy_note = (
            f"LOSSY {out.acceptance}: {out.unverified_tokens} tokens the original model would "
            "not have produced there, "
        )
    summary = (
        f"{lossy_note}{out.new_tokens} tokens, {out.forwards} forwards, "
        f"{out.tokens_per_forward:.2f} tokens/forward, acceptance per draft depth: {rates}, "
        f"draft nodes per forward: {_sizes(out.tree_sizes)}, "
        f"{out.wall_time_s:.2f} s"
    )
    print(f"\n\n[{summary}]", file=sys.stderr)


def _sizes(tree_sizes: dict[int, int]) -> str:
    """'4 x12, 15 x3': draft nodes fed per forward, and how many forwards fed that many."""
    return ", ".join(f"{size} x{count}" for size, count in tree_sizes.items()) or "-"


# ---------------------------------------------------------------------- retrofit
def add_retrofit_arguments(parser: argparse.ArgumentParser) -> None:
    from cpd_mtp.training.arguments import add_retrofit_arguments as add  # argparse only

    add(parser)


def run_retrofit(args: argparse.Namespace) -> None:
    from cpd_mtp.training.arguments import retrofit_overrides
    from cpd_mtp.training.retrofit import run_command

    run_command(retrofit_overrides(args))


# ---------------------------------------------------------------------- measure
def add_measure_arguments(parser: argparse.ArgumentParser) -> None:
    from cpd_mtp.apps.measure import add_arguments  # argument definitions only

    add_arguments(parser)


def run_measure(args: argparse.Namespace) -> None:
    from cpd_mtp.apps.measure import run

    run(args)


# ---------------------------------------------------------------------- demo
def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from cpd_mtp.apps.demo import add_arguments  # argument definitions only

    add_arguments(parser)


def run_demo(args: argparse.Namespace) -> None:
    from cpd_mtp.apps.demo import run

    run(args)


def add_scratch_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from cpd_mtp.apps.scratch_demo import add_arguments  # argument definitions only

    add_arguments(parser)


def run_scratch_demo(args: argparse.Namespace) -> None:
    from cpd_mtp.apps.scratch_demo import run_command

    run_command(args)


# ---------------------------------------------------------------------- bench retrofit
def add_retrofit_study_arguments(parser: argparse.ArgumentParser) -> None:
    from cpd_mtp.apps.retrofit_study import add_arguments  # argument definitions only

    add_arguments(parser)


def run_retrofit_study(args: argparse.Namespace) -> None:
    from cpd_mtp.apps.retrofit_study import check_args, run_study

    run_study(check_args(args, args.parser))


# ---------------------------------------------------------------------- bench ranks
def add_rank_study_arguments(parser: argparse.ArgumentParser) -> None:
    from cpd_mtp.apps.rank_study import add_arguments  # tables only: it imports torch lazily

    add_arguments(parser)


def run_rank_study(args: argparse.Namespace) -> None:
    from cpd_mtp.apps.rank_study import run_command

    run_command(args)


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
        "measure",
        "Measure how much faster an export decodes than its original model.",
        add_measure_arguments,
        run_measure,
        "cpd-mtp measure",
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
    args = parse_with_overrides(build_parser(), argv)
    _quiet_accelerator_probe()
    args.run(args)


def _quiet_accelerator_probe() -> None:
    """DeepSpeed warns "Setting accelerator to CPU" whenever something imports it without
    ``DS_ACCELERATOR`` on a machine without a GPU: say so up front, as the trainers do (a GPU
    machine keeps DeepSpeed's own choice)."""
    import os

    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


if __name__ == "__main__":
    main()
