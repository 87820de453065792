"""The arguments of ``cpd-mtp train`` and ``cpd-mtp retrofit``: argparse only, no heavy import.

Both commands take dotted ``key=value`` overrides of their structured config. ``retrofit``
also has flags for its common settings; each is one row of :data:`RETROFIT_FLAGS`, naming the
config key it sets, so a setting is defined once (in the config) and its type and its checks
come from there.
"""

from __future__ import annotations

import argparse
from typing import Any

# (flag, config key, help). A flag without a value sets a bool key: ``--no-x`` to false.
RETROFIT_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--model", "model.path", "a local HF model folder or a .gguf file (required)"),
    ("--out", "run.out_dir", "the run folder; the export goes to OUT/final (required)"),
    ("--n-future", "head.n_future", "tokens drafted jointly (offset 1 is the model's own)"),
    ("--rank", "head.rank", "experts of the CP head"),
    ("--expert-type", "head.expert_type", "linear, resblock or lowrank"),
    ("--balance-coef", "head.balance_coef", "weight of the gate's balancing loss"),
    ("--draft-vocab", "head.draft_vocab_size", "K most frequent training ids; null: all"),
    ("--minutes", "run.minutes", "wall-clock budget for data + training; sizes both"),
    (
        "--tokens",
        "data.tokens",
        "training tokens (generated ones in generated); a cap under run.minutes",
    ),
    ("--distill", "data.distill", "generated, generated_kl, kl or none"),
    ("--beta", "data.beta", "kl modes: weight of the KL against the NLL"),
    ("--gamma", "data.gamma", "kl modes: decay of the offsets' weights"),
    ("--temperature", "data.temperature", "generated modes: 0 greedy, > 0 samples"),
    ("--chat-share", "data.chat_share", "generated modes: share of chat prompts (the rest code)"),
    ("--prompts", "data.prompts", "generated modes: a JSONL of your own prompts or messages"),
    ("--prompt-field", "data.prompt_field", "the text field of the prompts JSONL"),
    ("--new-tokens", "data.new_tokens", "generated modes: most new tokens per answer"),
    ("--prompt-tokens", "data.prompt_tokens", "generated modes: corpus tokens per prompt"),
    ("--generate-batch-size", "data.generate_batch_size", "prompts per generate call"),
    ("--text-field", "data.text_field", "the text field of JSONL / Parquet / HF datasets"),
    ("--max-files", "data.max_files", "keep the first N documents (quick runs)"),
    ("--block-size", "data.block_size", "tokens per block"),
    ("--epochs", "data.epochs", "passes over the training blocks (sets the steps)"),
    ("--eval-blocks", "data.eval_blocks", "validation blocks"),
    ("--store-dtype", "data.store_dtype", "dtype of the cached states: float32 or float16"),
    ("--cache-dir", "data.cache_dir", "cache root; default $CPD_MTP_CACHE or ~/.cache/cpd_mtp"),
    ("--dtype", "model.dtype", "the model's dtype (default: its own)"),
    ("--seed", "run.seed", "the training blocks, the initialisation and the data order"),
    ("--batch-size", "run.micro_batch_size", "blocks per micro-batch per process"),
    ("--grad-accum", "run.grad_accum", "micro-batches per optimizer step"),
    ("--steps", "run.steps", "optimizer steps; default: data.epochs passes"),
    ("--eval-every", "run.eval_every", "validate every N steps (and at the end)"),
    ("--save-every", "run.save_every", "checkpoint every N steps (and at the end)"),
    ("--zero-stage", "run.zero_stage", "DeepSpeed ZeRO stage, 0-3"),
    ("--lr", "optim.lr", "peak learning rate (AdamW)"),
    ("--warmup-steps", "optim.warmup_steps", "linear warmup; default: 5%% of the steps"),
    ("--weight-decay", "optim.weight_decay", "AdamW weight decay"),
    (
        "--measure-prompts",
        "run.measure_prompts",
        "held-out prompts of each kind decoded at the end; 0: skip",
    ),
)
# (flag, config key, value it sets, help)
RETROFIT_SWITCHES: tuple[tuple[str, str, bool, str], ...] = (
    ("--resume", "run.resume", True, "continue from the latest checkpoint"),
    ("--overwrite", "run.overwrite", True, "replace the run in --out"),
    ("--no-export", "run.export", False, "skip writing OUT/final"),
    ("--merged", "run.merged", True, "export the whole model, not the drafter alone"),
    ("--no-progress", "run.progress", False, "no progress bars"),
)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``cpd-mtp train``: a preset and dotted overrides of its ``TrainConfig``."""
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


def train_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    overrides += ["run.resume=true"] if args.resume else []
    overrides += ["run.overwrite=true"] if args.overwrite else []
    return overrides


def add_retrofit_arguments(parser: argparse.ArgumentParser) -> None:
    """``cpd-mtp retrofit``: the flags of :data:`RETROFIT_FLAGS` and dotted overrides."""
    defaults = _retrofit_defaults()
    for flag, key, text in RETROFIT_FLAGS:
        shown = defaults.get(key)
        default = "" if shown in (None, "???") else f" (default: {shown})"
        parser.add_argument(
            flag, dest=key, default=None, metavar="VALUE", help=f"{key}: {text}{default}"
        )
    parser.add_argument(
        "--data",
        dest="data.source",
        action="append",
        default=None,
        metavar="PATH",
        help="data.source: a corpus path, glob or directory (repeat); default stdlib",
    )
    for flag, key, value, text in RETROFIT_SWITCHES:
        parser.add_argument(
            flag, dest=key, action="store_const", const=value, default=None, help=text
        )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides of any key, e.g. head.rank=2 optim.lr=1e-3"
    )


def _retrofit_defaults() -> dict[str, Any]:
    """Every retrofit key's default, by dotted name (for ``--help``: the config states them)."""
    import dataclasses

    from cpd_mtp.training.config import RetrofitConfig, flatten

    return flatten(dataclasses.asdict(RetrofitConfig()))


def _yaml_scalar(text: str) -> Any:
    """A flag's text as YAML reads it (``4`` an int, ``null`` None), as dotted overrides are."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# Keys whose value is a path: kept as text (YAML would read ``1e3`` or ``null`` otherwise).
_PATH_KEYS = ("model.path", "run.out_dir", "data.cache_dir", "data.prompts")


def retrofit_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the flags and ``key=value`` words set, in the order given (flags first)."""
    values: dict[str, Any] = {}
    flags = vars(args)
    for _, key, _ in RETROFIT_FLAGS:
        if flags.get(key) is not None:
            values[key] = flags[key] if key in _PATH_KEYS else _yaml_scalar(flags[key])
    source = flags.get("data.source")
    if source:
        values["data.source"] = source[0] if len(source) == 1 else list(source)
    for _, key, _, _ in RETROFIT_SWITCHES:
        if flags.get(key) is not None:
            values[key] = flags[key]
    for word in flags.get("overrides") or []:
        key, _, text = word.partition("=")
        values[key.strip()] = _yaml_scalar(text)
    return values
