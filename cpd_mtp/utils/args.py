"""argparse helpers every command shares: count types, and dotted overrides after options."""

from __future__ import annotations

import argparse


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a bad count is a usage error, exit 2)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_with_overrides(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> argparse.Namespace:
    """``parser.parse_args``, with dotted ``key=value`` overrides also after options.

    argparse stops collecting a positional list at the first option, so ``--resume
    run.steps=10`` would be an error; every ``key=value`` word joins ``args.overrides``.
    """
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if not a.startswith("-") and "=" in a]
    unknown = [a for a in extra if a not in overrides]
    if overrides and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
    elif overrides:
        unknown = extra
    if unknown:
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args
