"""Training configuration: typed dataclasses, YAML presets and dotted overrides.

``load_train_config("demo", ["run.steps=100", "head.rank=8"])`` merges, in order, the
dataclass defaults, the preset ``cpd_mtp/training/presets/demo.yaml`` (or any YAML path) and
the dotted overrides, through OmegaConf, which rejects unknown keys and wrong types.

The ``head`` and ``data`` sections are not copies: ``HeadSettings`` is generated from the
fields of ``CPDMTPConfig``, and ``DataSettings`` maps onto ``DataConfig`` field by field
(:func:`data_config`), so neither can drift from the library.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
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


def _head_settings_class() -> type:
    """A dataclass with every ``CPDMTPConfig`` field but the model-sized ones, same defaults."""
    hints = typing.get_type_hints(CPDMTPConfig)  # real types (Literal[...]) for OmegaConf
    fields = [
        (f.name, hints[f.name], field(default=f.default))
        for f in dataclasses.fields(CPDMTPConfig)
        if f.name not in MODEL_SIZED_FIELDS
    ]
    settings = dataclasses.make_dataclass("HeadSettings", fields)
    settings.__module__ = __name__  # for pickling and for OmegaConf's messages
    return settings


HeadSettings = _head_settings_class()
HeadSettings.__doc__ = "The CP-MTP head: every ``CPDMTPConfig`` field but hidden and vocab size."


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


def load_train_config(preset: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the preset, then ``key=value`` overrides; validated and typed."""
    merged = OmegaConf.structured(TrainConfig)
    try:
        if preset is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(preset_path(preset)))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ValueError(f"bad training config: {err}") from err
    return OmegaConf.to_object(merged)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
