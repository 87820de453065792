"""Training configuration: typed dataclasses, YAML presets and dotted overrides.

``load_train_config("demo", ["run.steps=100", "head.rank=8"])`` merges, in order, the
dataclass defaults, the preset ``cpd_mtp/training/presets/demo.yaml`` (or any YAML path) and
the dotted overrides, through OmegaConf, which rejects unknown keys and wrong types.

The ``head`` and ``data`` sections are not copies: ``HeadSettings`` is generated from the
fields of ``CPDMTPConfig``, and ``DataSettings`` maps onto ``DataConfig`` field by field
(:func:`data_config`), so neither can drift from the library.

:func:`check_config` checks every section before any work, with one-line errors that name the
key; :func:`config_help` lists every key with its default (``cpd-mtp train --help``) and
:func:`config_to_yaml` prints a merged config (``--print-config``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cpd_mtp.config import CPDMTPConfig

if TYPE_CHECKING:
    from cpd_mtp.training.data import DataConfig

# The presets ship inside the package (package data), so an installed wheel finds them.
CONFIG_DIR = Path(__file__).resolve().parent / "presets"


@dataclass
class TrunkSettings:
    """The causal LM under the head: a Llama-shaped model built from config, or a local one."""

    init_from: str | None = None  # a local HF causal LM or cpd_mtp export; None builds one
    vocab_size: int | None = None  # None: the tokenizer's size
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    freeze_trunk: bool = False  # heads-only training (trunk and W_U frozen)


# The head's sizes come from the trunk (hidden_size) and the tokenizer (vocab_size).
MODEL_SIZED_FIELDS = ("hidden_size", "vocab_size")


def _head_settings_class(name: str = "HeadSettings", **defaults: Any) -> type:
    """A dataclass with every ``CPDMTPConfig`` field but the model-sized ones, with the
    library's defaults (or ``defaults``): a new head option reaches every config by itself."""
    hints = typing.get_type_hints(CPDMTPConfig)  # real types (Literal[...]) for OmegaConf
    fields = [
        (f.name, hints[f.name], field(default=defaults.get(f.name, f.default)))
        for f in dataclasses.fields(CPDMTPConfig)
        if f.name not in MODEL_SIZED_FIELDS
    ]
    settings = dataclasses.make_dataclass(name, fields)
    settings.__module__ = __name__  # for pickling and for OmegaConf's messages
    return settings


HeadSettings = _head_settings_class()
HeadSettings.__doc__ = "The CP-MTP head: every ``CPDMTPConfig`` field but hidden and vocab size."
# A retrofit's head drafts for the frozen model: its next token is the model's own.
# The recipe's defaults (the retrofit study v2, equal minutes on SmolLM2): a small draft
# vocabulary (the head's cost scales with it; the whole vocabulary when the model's is
# smaller), rank 2, and a head that reads the verifier's next token.
DEFAULT_DRAFT_VOCAB = 4096
RetrofitHeadSettings = _head_settings_class(
    "RetrofitHeadSettings",
    next_token="base",
    expert_type="linear",
    rank=2,
    draft_vocab_size=DEFAULT_DRAFT_VOCAB,
    token_conditioned=True,
    token_fusion="mlp",
)
RetrofitHeadSettings.__doc__ = "The retrofit's head: ``HeadSettings`` in ``next_token=base`` mode."


def head_config(settings: Any, hidden_size: int, vocab_size: int) -> CPDMTPConfig:
    """The head's ``CPDMTPConfig`` from the ``head`` section and the model's sizes."""
    return CPDMTPConfig(
        hidden_size=hidden_size, vocab_size=vocab_size, **dataclasses.asdict(settings)
    )


@dataclass
class DataSettings:
    """Where the text comes from: the fields of ``DataConfig`` (see :func:`data_config`)."""

    source: Any = "stdlib"  # "stdlib", a path, or a list of paths
    vocab_size: int = 4096
    tokenizer: str | None = None
    block_size: int = 256
    val_fraction: float = 0.03
    max_files: int | None = None
    text_field: str = "text"
    cache_dir: str | None = None


@dataclass
class OptimSettings:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0


@dataclass
class RunSettings:
    out_dir: str = "runs/demo"
    steps: int = 1000
    micro_batch_size: int = 16  # per process
    grad_accum: int = 1
    zero_stage: int = 2
    dtype: str = "bf16"  # fp32 | bf16 | fp16 (fp16: GPU only)
    # A DeepSpeed JSON to start from; None: presets/deepspeed/zero<stage>.json.
    deepspeed_config: str | None = None
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False  # replace the run already in out_dir (else that is an error)
    seed: int = 0
    wandb_project: str | None = "cpd_mtp"
    wandb_mode: str | None = None  # None: $WANDB_MODE, else offline without an API key
    progress: bool = True
    export: bool = True  # write an HF-format model to out_dir/final at the end
    # Warn at evaluation when the entropy of the experts' usage, over log r, is below this.
    collapse_entropy: float = 0.5


def data_config(settings: DataSettings, progress: bool = True) -> DataConfig:
    """The ``DataConfig`` of a ``data`` section: every field carried over by name."""
    from cpd_mtp.training.data import DataConfig  # data loading pulls in the tokenizers

    return DataConfig(**dataclasses.asdict(settings), progress=progress)


@dataclass
class TrainConfig:
    trunk: TrunkSettings = field(default_factory=TrunkSettings)
    head: HeadSettings = field(default_factory=HeadSettings)  # type: ignore[valid-type]
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)


# ---------------------------------------------------------------------- retrofit
DISTILL_MODES = ("kl", "generated", "generated_kl", "none")
# The modes that train on the model's own continuations, and those with the KL term.
GENERATED_MODES = ("generated", "generated_kl")
KL_MODES = ("kl", "generated_kl")


@dataclass
class BaseModelSettings:
    """The frozen pretrained model a retrofit drafts for."""

    path: str = MISSING  # a local HF folder or a .gguf file
    dtype: str | None = None  # float32, bfloat16, ...; null: the model's own


@dataclass
class RetrofitDataSettings:
    """The retrofit's training data: the model's own answers to chat and code prompts (or
    corpus blocks, for the ``kl`` and ``none`` modes), and the caches."""

    source: Any = "stdlib"  # the corpus: code prompts, held-out code, kl / none blocks
    text_field: str = "text"  # the text field of JSONL records, Parquet tables, HF datasets
    # Target tokens to make: the generated answers' tokens in generated modes (with
    # run.minutes: at most this many); the corpus blocks' otherwise.
    tokens: int = 200_000
    distill: Literal["kl", "generated", "generated_kl", "none"] = "generated"
    beta: float = 0.9
    gamma: float = 0.8
    temperature: float = 0.0
    # Generated modes: the share of prompts that are chat turns through the model's chat
    # template (0 without one); the rest are code cut from the corpus.
    chat_share: float = 0.75
    prompts: str | None = None  # a JSONL of your own prompts instead of ShareGPT's
    prompt_field: str = "prompt"  # the text field of that JSONL
    held_out: float = 0.03  # share of the chat prompts never trained on (measured on)
    new_tokens: int = 192  # most new tokens per generated answer
    prompt_tokens: int | None = None  # corpus tokens per code prompt (null: block_size // 4)
    generate_batch_size: int = 32
    max_positions: int = 512  # the longest training window of one answer
    max_files: int | None = None
    val_fraction: float = 0.03
    block_size: int = 128
    epochs: float = 3.0  # without run.minutes: sets the steps
    eval_blocks: int = 32
    store_dtype: Literal["float32", "float16"] = "float32"
    cache_dir: str | None = None
    state_batch_size: int = 8

    @property
    def prompt_length(self) -> int:
        """Corpus tokens of each ``generated`` prompt."""
        return self.prompt_tokens if self.prompt_tokens is not None else self.block_size // 4


@dataclass
class RetrofitOptimSettings(OptimSettings):
    lr: float = 2e-3
    warmup_steps: int | None = None  # null: 5 % of the steps
    weight_decay: float = 0.0


@dataclass
class RetrofitRunSettings(RunSettings):
    out_dir: str = MISSING
    steps: int | None = None  # null: data.epochs passes over the training blocks
    micro_batch_size: int = 8
    zero_stage: int = 0
    dtype: str = "fp32"
    wandb_project: str | None = None
    merged: bool = False  # export the whole model, not the drafter alone
    # At the end, decode this many held-out prompts of each kind (chat, code) with the export,
    # against the original model and the alternatives that need no training; 0: skip.
    measure_prompts: int = 2
    measure_tokens: int = 48
    # A wall-clock budget for the whole command: loading, data, training, the export and the
    # measurement. Data is made until data_share of it has passed; measure_share of it is kept
    # for the measurement; training gets the rest. null: data.tokens and data.epochs decide.
    minutes: float | None = None
    data_share: float = 0.45
    measure_share: float = 0.12


@dataclass
class RetrofitConfig:
    """``cpd-mtp retrofit``'s settings; ``head`` is every ``CPDMTPConfig`` field."""

    model: BaseModelSettings = field(default_factory=BaseModelSettings)
    head: RetrofitHeadSettings = field(default_factory=RetrofitHeadSettings)  # type: ignore[valid-type]
    data: RetrofitDataSettings = field(default_factory=RetrofitDataSettings)
    optim: RetrofitOptimSettings = field(default_factory=RetrofitOptimSettings)
    run: RetrofitRunSettings = field(default_factory=RetrofitRunSettings)


def load_retrofit_config(overrides: list[str] | dict[str, Any] | None = None) -> RetrofitConfig:
    """Defaults, then dotted ``key=value`` overrides (a list of strings or a dict); typed.

    Raises:
        ValueError: an unknown key or a value of the wrong type, in one line naming the key.
    """
    merged = OmegaConf.structured(RetrofitConfig)
    try:
        if isinstance(overrides, dict):
            for key, value in overrides.items():
                OmegaConf.update(merged, key, value, merge=False, force_add=False)
        elif overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"bad retrofit config: {_one_line(err)}") from None


def check_retrofit_config(cfg: RetrofitConfig) -> None:
    """Fail before any work on settings that cannot run or would learn nothing (one line each,
    naming the key). The head is checked by ``CPDMTPConfig`` itself; the model's sizes are
    checked again once it is loaded."""
    from cpd_mtp.training.sources import check_max_files

    data, head = cfg.data, cfg.head
    _check_run(cfg.run, on_gpu=False)
    _check_optim(cfg.optim)
    _at_least("run", cfg.run, ("measure_prompts",), 0)
    _at_least("run", cfg.run, ("measure_tokens",), 1)
    names = ("tokens", "generate_batch_size", "block_size", "eval_blocks", "state_batch_size")
    _at_least("data", data, (*names, "prompt_tokens", "new_tokens", "max_positions"), 1)
    if not 0.0 <= data.chat_share <= 1.0:
        raise ValueError(f"data.chat_share must lie in [0, 1], got {data.chat_share}")
    if not 0.0 < data.held_out < 1.0:
        raise ValueError(f"data.held_out must lie in (0, 1), got {data.held_out}")
    if data.prompts is not None and not Path(data.prompts).expanduser().is_file():
        raise FileNotFoundError(f"data.prompts (--prompts) {data.prompts} does not exist")
    if data.prompts is not None and data.distill not in GENERATED_MODES:
        raise ValueError("data.prompts (--prompts) applies to --distill generated or generated_kl")
    if data.distill not in DISTILL_MODES:
        raise ValueError(f"data.distill must be one of {DISTILL_MODES}, got {data.distill!r}")
    if not 0.0 <= data.beta <= 1.0:
        raise ValueError(f"data.beta must lie in [0, 1], got {data.beta}")
    if not 0.0 < data.gamma <= 1.0:
        raise ValueError(f"data.gamma must lie in (0, 1], got {data.gamma}")
    if not (data.temperature >= 0.0 and math.isfinite(data.temperature)):
        raise ValueError(f"data.temperature must be a finite number >= 0, got {data.temperature}")
    if data.temperature > 0 and data.distill not in GENERATED_MODES:
        raise ValueError(
            "data.temperature applies to --distill generated or generated_kl (data.distill) only"
        )
    if not (data.epochs > 0 and math.isfinite(data.epochs)):
        raise ValueError(f"data.epochs must be a finite number > 0, got {data.epochs}")
    if not 0.0 < data.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {data.val_fraction}")
    check_max_files(data.max_files)
    minutes = cfg.run.minutes
    if minutes is not None and not (minutes > 0 and math.isfinite(minutes)):
        raise ValueError(f"run.minutes (--minutes) must be a finite number > 0, got {minutes}")
    if minutes is not None and cfg.run.steps is not None:
        raise ValueError(
            "run.steps (--steps) and run.minutes (--minutes) both set the training's length; "
            "give one"
        )
    if not 0.0 < cfg.run.data_share < 1.0:
        raise ValueError(f"run.data_share must lie in (0, 1), got {cfg.run.data_share}")
    if not 0.0 <= cfg.run.measure_share < 1.0 - cfg.run.data_share:
        raise ValueError(
            f"run.measure_share must lie in [0, 1 - run.data_share), got {cfg.run.measure_share}"
        )
    if data.block_size < 2:
        raise ValueError(
            f"data.block_size must be >= 2 (offset 1 needs a target), got {data.block_size}"
        )
    if head.next_token != "base":
        raise ValueError(
            f"head.next_token must be 'base' for a retrofit (the model's own next token), "
            f"got {head.next_token!r}"
        )
    if head.n_future < 2:
        raise ValueError(
            f"head.n_future={head.n_future} can never draft in base mode (offset 1 is the "
            "model's own next token); use head.n_future >= 2"
        )
    # The model's sizes are not known before it is loaded: any that fit the head's settings.
    vocab = max(2, (head.draft_vocab_size or 0) + 1)
    try:
        head_config(head, hidden_size=max(1024, head.expert_inner_size), vocab_size=vocab)
    except ValueError as err:
        raise ValueError(str(err).replace("CPDMTPConfig.", "head.")) from None
    if head.draft_vocab_size is not None and head.draft_vocab_size < 2:
        raise ValueError(
            f"head.draft_vocab_size={head.draft_vocab_size} leaves nothing to choose (the loss "
            "is 0 whatever the head does); use >= 2 or null for the whole vocabulary"
        )
    if head.n_future >= data.block_size:
        raise ValueError(
            f"head.n_future={head.n_future} must be < data.block_size={data.block_size}: "
            "offsets >= the block size never have a target"
        )
    if data.distill in GENERATED_MODES and not 1 <= data.prompt_length < data.block_size - 1:
        raise ValueError(
            f"data.prompt_tokens={data.prompt_length} must lie in [1, data.block_size - 2 = "
            f"{data.block_size - 2}] so that each block has room for a continuation"
        )
    if cfg.model.path is None or not Path(cfg.model.path).expanduser().exists():
        raise FileNotFoundError(f"--model {cfg.model.path} does not exist")


def preset_path(preset: str) -> Path:
    """``presets/<preset>.yaml`` of the package, or ``preset`` itself when it is a YAML file."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = CONFIG_DIR / f"{preset}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"unknown preset {preset!r}: not a YAML file and not one of {known}")
    return candidate


def _one_line(err: OmegaConfBaseException) -> str:
    """OmegaConf's message is several lines (key, types); the key and its first line suffice."""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{key}: {first}" if key else first


def load_train_config(preset: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the preset, then ``key=value`` overrides; validated and typed.

    Raises:
        ValueError: an unknown preset, key or a value of the wrong type, in one line that
            names the key.
    """
    merged = OmegaConf.structured(TrainConfig)
    try:
        if preset is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(preset_path(preset)))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"bad training config: {_one_line(err)}") from None


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def config_to_yaml(config: TrainConfig) -> str:
    """The whole config as YAML, every section and key (what ``--print-config`` shows)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"run": {"steps": 8}}`` -> ``{"run.steps": 8}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# ---------------------------------------------------------------------- the keys, described
# One line per key for `cpd-mtp train --help`; the head's come from CPDMTPConfig's docstring.
KEY_HELP = {
    "trunk.init_from": "a local HF causal LM or cpd_mtp export to start from; null builds one",
    "trunk.vocab_size": "null: the tokenizer's size",
    "trunk.hidden_size": "the trunk's hidden size d",
    "trunk.num_layers": "decoder layers",
    "trunk.num_heads": "attention heads (divides hidden_size)",
    "trunk.num_kv_heads": "key/value heads for GQA (divides num_heads); null: num_heads",
    "trunk.intermediate_size": "MLP width; null: 4 d rounded up to a multiple of 8",
    "trunk.max_position_embeddings": "longest sequence (>= data.block_size)",
    "trunk.tie_word_embeddings": "share W_U with the input embedding",
    "trunk.freeze_trunk": "train the head only (trunk and W_U frozen)",
    "data.source": "'stdlib', a path, glob or directory, or a list of them",
    "data.vocab_size": "size of the BPE trained on the corpus (ignored with data.tokenizer)",
    "data.tokenizer": "a local HF tokenizer folder instead of training one",
    "data.block_size": "tokens per training example",
    "data.val_fraction": "fraction of documents held out for validation, in (0, 1)",
    "data.max_files": "keep only the first N documents (quick runs); null: all",
    "data.text_field": "the text field of JSONL records, Parquet tables and HF datasets",
    "data.cache_dir": "cache root; null: $CPD_MTP_CACHE or ~/.cache/cpd_mtp",
    "optim.lr": "peak learning rate (AdamW)",
    "optim.min_lr_ratio": "the cosine ends at lr * min_lr_ratio, in [0, 1]",
    "optim.warmup_steps": "linear warmup steps",
    "optim.weight_decay": "AdamW weight decay of matrices (not biases or norms)",
    "optim.betas": "AdamW betas, two values in [0, 1)",
    "optim.grad_clip": "gradient-norm clipping; 0: none",
    "run.out_dir": "checkpoints, metrics.jsonl and the export (final/) go here",
    "run.steps": "optimizer steps; the cosine schedule ends here",
    "run.micro_batch_size": "sequences per process per micro-step",
    "run.grad_accum": "micro-steps per optimizer step",
    "run.zero_stage": "DeepSpeed ZeRO stage, 0-3",
    "run.dtype": "fp32, bf16 or fp16 (fp16: GPU only)",
    "run.deepspeed_config": "a DeepSpeed JSON to start from; null: presets/deepspeed/zero<stage>",
    "run.eval_every": "validate every N steps (and at the last)",
    "run.eval_batches": "validation micro-batches per process",
    "run.save_every": "checkpoint every N steps (and at the last)",
    "run.keep_checkpoints": "checkpoints kept on disk",
    "run.resume": "continue from the latest checkpoint (--resume)",
    "run.overwrite": "replace the run already in out_dir (--overwrite)",
    "run.seed": "seed of the initialisation and of the data order",
    "run.wandb_project": "wandb project; null: no wandb",
    "run.wandb_mode": "online, offline or disabled; null: $WANDB_MODE, else offline",
    "run.progress": "progress bar on a terminal, a line every 5 % in a log",
    "run.export": "write an HF-format model to out_dir/final at the end",
    "run.collapse_entropy": "warn when the experts' usage entropy / log r falls below this",
}


def _head_help() -> dict[str, str]:
    """A short line per ``Args:`` entry of ``CPDMTPConfig``'s docstring, by field name."""
    found: dict[str, str] = {}
    name = None
    for line in (CPDMTPConfig.__doc__ or "").splitlines():
        match = re.match(r"\s{8}(\w+): (.*)", line)
        if match:
            name, text = match.groups()
            found[name] = text
        elif name and re.match(r"\s{12}\S", line):
            found[name] += " " + line.strip()
        else:
            name = None
    # The first sentence, up to a colon that starts the details, without RST markup.
    short = {
        k: v.split(". ")[0].split(": ")[0].rstrip(".").replace("``", "") for k, v in found.items()
    }
    return {f"head.{k}": v for k, v in short.items()}


def config_help() -> str:
    """Every config key with its built-in default and what it does (``train --help``)."""
    defaults = flatten(dataclasses.asdict(TrainConfig()))
    described = {**KEY_HELP, **_head_help()}
    width = max(len(f"{k}={_yaml_value(v)}") for k, v in defaults.items())
    lines = [
        "config keys (built-in defaults; the preset overrides some, --print-config shows the "
        "merged config):"
    ]
    section = None
    for key, value in defaults.items():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines.append(f"  {section}:")
        setting = f"{key}={_yaml_value(value)}"
        lines.append(f"    {setting:<{width}}  {described.get(key, '')}".rstrip())
    return "\n".join(lines)


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------------- validation
DTYPES = ("fp32", "bf16", "fp16")
WANDB_MODES = ("online", "offline", "disabled")


def check_config(cfg: TrainConfig, on_gpu: bool) -> None:
    """Every section, before any work: one-line errors that name the key.

    Raises:
        ValueError: a setting that cannot run, or would silently learn or measure nothing.
        FileNotFoundError: a path in the config (data, tokenizer, model, DeepSpeed JSON) is
            missing.
    """
    _check_run(cfg.run, on_gpu)
    _check_optim(cfg.optim)
    _check_trunk(cfg.trunk, cfg.data.block_size)
    _check_data(cfg.data)
    _check_head(cfg)
    _check_deepspeed_file(cfg.run)


def _at_least(section: str, settings: Any, names: tuple[str, ...], low: int) -> None:
    for name in names:
        value = getattr(settings, name)
        if value is not None and value < low:
            raise ValueError(f"{section}.{name} must be >= {low}, got {value}")


def _check_run(run: RunSettings, on_gpu: bool) -> None:
    if run.dtype not in DTYPES:
        raise ValueError(f"run.dtype must be one of {DTYPES}, got {run.dtype!r}")
    if run.dtype == "fp16" and not on_gpu:
        raise ValueError(
            "run.dtype=fp16 is not supported by DeepSpeed on CPU; use run.dtype=bf16 or fp32"
        )
    if run.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"run.zero_stage must be 0, 1, 2 or 3, got {run.zero_stage}")
    names = ("steps", "micro_batch_size", "grad_accum", "eval_every", "eval_batches", "save_every")
    _at_least("run", run, (*names, "keep_checkpoints"), 1)
    _at_least("run", run, ("seed",), 0)
    if run.resume and run.overwrite:
        raise ValueError("run.resume and run.overwrite exclude each other; pick one")
    if run.wandb_mode is not None and run.wandb_mode not in WANDB_MODES:
        raise ValueError(
            f"run.wandb_mode must be one of {WANDB_MODES} or null, got {run.wandb_mode!r}"
        )
    if not 0.0 <= run.collapse_entropy <= 1.0:
        raise ValueError(f"run.collapse_entropy must be in [0, 1], got {run.collapse_entropy}")
    if not run.out_dir:
        raise ValueError("run.out_dir must name a folder")


def _check_optim(opt: OptimSettings) -> None:
    if not (math.isfinite(opt.lr) and opt.lr > 0):
        raise ValueError(f"optim.lr must be a finite number > 0, got {opt.lr}")
    if not 0.0 <= opt.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {opt.min_lr_ratio}")
    _at_least("optim", opt, ("warmup_steps",), 0)
    for name in ("weight_decay", "grad_clip"):
        value = getattr(opt, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"optim.{name} must be a finite number >= 0, got {value}")
    betas = list(opt.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"optim.betas must be two numbers in [0, 1), got {betas}")


def _check_trunk(trunk: TrunkSettings, block_size: int) -> None:
    if trunk.init_from:
        if not Path(trunk.init_from).is_dir():
            raise FileNotFoundError(f"trunk.init_from={trunk.init_from!r} is not a directory")
        if not (Path(trunk.init_from) / "config.json").is_file():
            raise FileNotFoundError(
                f"trunk.init_from={trunk.init_from!r} holds no config.json (not an HF model)"
            )
        return  # the shape is the model's own
    names = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
    _at_least("trunk", trunk, (*names, "vocab_size", "max_position_embeddings"), 1)
    if trunk.hidden_size % trunk.num_heads:
        raise ValueError(
            f"trunk.hidden_size={trunk.hidden_size} must be divisible by "
            f"trunk.num_heads={trunk.num_heads}"
        )
    if trunk.num_kv_heads is not None and trunk.num_heads % trunk.num_kv_heads:
        raise ValueError(
            f"trunk.num_heads={trunk.num_heads} must be divisible by "
            f"trunk.num_kv_heads={trunk.num_kv_heads}"
        )
    if block_size > trunk.max_position_embeddings:
        raise ValueError(
            f"data.block_size={block_size} exceeds "
            f"trunk.max_position_embeddings={trunk.max_position_embeddings}"
        )


def _check_data(data: DataSettings) -> None:
    # Labels are aligned with input_ids, the model shifts (see the label convention in the
    # docs): offset s has a target only at t < block_size - s, so block_size must exceed n.
    if data.block_size < 2:
        raise ValueError(
            f"data.block_size must be >= 2 (offset 1 needs a target), got {data.block_size}"
        )
    if not 0.0 < data.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {data.val_fraction}")
    _at_least("data", data, ("max_files",), 1)
    if data.tokenizer is not None:
        if not Path(data.tokenizer).is_dir():
            raise FileNotFoundError(f"data.tokenizer={data.tokenizer!r} is not a directory")
    else:
        from cpd_mtp.training.tokenizer import SPECIAL_TOKENS

        least = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens
        if data.vocab_size < least:
            raise ValueError(f"data.vocab_size must be >= {least}, got {data.vocab_size}")
    source = data.source
    if source != "stdlib":
        for entry in [source] if isinstance(source, str) else list(source):
            matches = list(Path().glob(entry)) if any(c in entry for c in "*?[") else []
            if not matches and not Path(entry).exists():
                raise FileNotFoundError(f"data.source entry {entry!r} does not exist")


def _model_sizes(cfg: TrainConfig) -> tuple[int, int]:
    """(hidden size, vocabulary) the head will see, read without building anything."""
    hidden, vocab = cfg.trunk.hidden_size, cfg.trunk.vocab_size or cfg.data.vocab_size
    if cfg.trunk.init_from:
        model = json.loads((Path(cfg.trunk.init_from) / "config.json").read_text())
        model = model.get("text_config", model)  # a cpd_mtp export keeps the trunk's config
        hidden, vocab = model.get("hidden_size", hidden), model.get("vocab_size", vocab)
    return int(hidden), int(vocab)


def _check_head(cfg: TrainConfig) -> None:
    """The library's own checks (rank, expert type, draft vocabulary, ...), keys named."""
    hidden, vocab = _model_sizes(cfg)
    try:
        head_config(cfg.head, hidden, vocab)
    except ValueError as err:
        raise ValueError(str(err).replace("CPDMTPConfig.", "head.")) from None
    block, n_future = cfg.data.block_size, cfg.head.n_future
    if n_future >= block:
        raise ValueError(
            f"head.n_future={n_future} must be < data.block_size={block}: offsets >= the block "
            "size never have a target"
        )


def _check_deepspeed_file(run: RunSettings) -> None:
    path = deepspeed_config_path(run)
    if not path.is_file():
        raise FileNotFoundError(f"run.deepspeed_config: {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"run.deepspeed_config: {path} is not valid JSON ({err})") from None
    if not isinstance(ds, dict):
        raise ValueError(f"run.deepspeed_config: {path} must hold a JSON object")


def deepspeed_config_path(run: RunSettings) -> Path:
    """The DeepSpeed JSON a run starts from: ``run.deepspeed_config`` or the stage's preset."""
    return Path(run.deepspeed_config or CONFIG_DIR / "deepspeed" / f"zero{run.zero_stage}.json")
