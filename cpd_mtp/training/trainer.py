"""Train a CP-MTP model with DeepSpeed: one CPU, one GPU, or many GPUs across nodes.

    python -m cpd_mtp.training.trainer --preset demo run.steps=500 head.rank=8
    torchrun --nproc_per_node 2 -m cpd_mtp.training.trainer --preset tiny run.zero_stage=3  # CPU, gloo
    deepspeed --num_gpus 8 -m cpd_mtp.training.trainer --preset small                      # GPUs

Every run goes through a DeepSpeed engine (ZeRO stage 0-3 from the package's
``presets/deepspeed/``) with AdamW, warmup + cosine LR, gradient accumulation and clipping.
The data order is a pure function of (seed, step), so ``run.resume=true`` continues a killed
run exactly. Each checkpoint's record stores the run's config: a resume that would change the
model or its data is refused with the key named, one that re-shapes the LR schedule is warned
about, and one of a finished run says so and trains nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from cpd_mtp.head import shift_targets
from cpd_mtp.training import checkpoint
from cpd_mtp.training.config import (
    TrainConfig,
    check_config,
    config_to_dict,
    config_to_yaml,
    data_config,
    deepspeed_config_path,
    flatten,
    head_config,
    load_train_config,
)
from cpd_mtp.utils.files import atomic_write_text
from cpd_mtp.utils.progress import progress

# ---------------------------------------------------------------------- set-up
# Deprecations that dependencies raise on their own calls, not on ours: DeepSpeed's ZeRO-3
# calls torch.distributed's old collective names on every step (about 80 FutureWarnings in 20
# steps of a two-process run). (category, message regex, module regex) of each, silenced
# exactly; every other warning still shows.
DEPENDENCY_NOISE = (
    (
        FutureWarning,
        r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        r"torch\.distributed\.c10d_logger$",
    ),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated", r"torch\.jit\._script$"),
)


# DeepSpeed's own log lines that say nothing to a user: the scheduler's LR read once before
# the first step (by DeepSpeed's start-up, on every process).
DEEPSPEED_LOG_NOISE = ("Attempting to get learning rate from scheduler before it has started",)


class _DropLogNoise(logging.Filter):
    """Drops the log records whose message starts with one of :data:`DEEPSPEED_LOG_NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(DEEPSPEED_LOG_NOISE)


def silence_dependency_noise() -> None:
    """Ignore the warnings of :data:`DEPENDENCY_NOISE`, matched by category, message, module,
    and DeepSpeed's log lines of :data:`DEEPSPEED_LOG_NOISE`."""
    for category, message, module in DEPENDENCY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropLogNoise) for f in logger.filters):
        logger.addFilter(_DropLogNoise())


def quiet_library_bars() -> None:
    """No progress bars from transformers and datasets when stderr is not a terminal: their
    tqdm bars would write carriage returns into a log (this package's own bars print lines)."""
    if sys.stderr.isatty():
        return
    from datasets.utils.logging import disable_progress_bar as datasets_quiet
    from transformers.utils.logging import disable_progress_bar as transformers_quiet

    transformers_quiet()
    datasets_quiet()


def ops_dir() -> Path:
    """Where DeepSpeed's JIT-compiled ops go when ``TORCH_EXTENSIONS_DIR`` is not set.

    A folder of the running environment (``<sys.prefix>/torch_extensions``, e.g.
    ``.venv/torch_extensions``): ops built against one environment's torch never meet another
    environment's, as they would in the shared ``~/.cache/torch_extensions``. An environment
    that cannot be written to gets a folder of its own under ``~/.cache/cpd_mtp``.
    """
    prefix = Path(sys.prefix)
    if os.access(prefix, os.W_OK):
        return prefix / "torch_extensions"
    key = hashlib.blake2b(str(prefix.resolve()).encode(), digest_size=6).hexdigest()
    return Path.home() / ".cache" / "cpd_mtp" / "torch_extensions" / f"env-{key}"


def use_project_ops_dir() -> Path:
    """Point ``TORCH_EXTENSIONS_DIR`` at :func:`ops_dir` unless it is set; return the folder.

    While the folder holds no compiled op yet (a first run), local rank 0 prints one line
    naming it, so the minute or two DeepSpeed spends compiling is not a silent hang.
    """
    path = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ops_dir())))
    first = not path.is_dir() or not any(path.rglob("*.so"))
    if first and os.environ.get("LOCAL_RANK", "0") == "0":
        print(
            f"compiled ops: DeepSpeed builds the ops it needs into {path} "
            "(TORCH_EXTENSIONS_DIR); the first build takes a minute or two",
            file=sys.stderr,
            flush=True,
        )
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Start torch.distributed (NCCL on GPU, gloo on CPU), also for a lone process."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    silence_dependency_noise()
    use_project_ops_dir()  # before DeepSpeed compiles anything (its CPU comm op, at init)
    if "RANK" not in os.environ:  # a plain `python -m cpd_mtp.training.trainer`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    if not torch.distributed.is_initialized():
        # DeepSpeed prints "DeepSpeed ... built successfully" on stdout when it loads its CPU
        # comm op; keep what it printed only if the start fails.
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        except BaseException:
            sys.stdout.write(printed.getvalue())
            raise
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if on_gpu:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


# ---------------------------------------------------------------------- the run directory
LOCK_FILE = ".lock"
RUN_FILES = ("metrics.jsonl", "checkpoints", "final")  # what a run leaves in out_dir


class OutDirError(ValueError):
    """``run.out_dir`` holds another run, or a live run holds it."""


class ResumeMismatchError(ValueError):
    """The config changes what the checkpoint was trained on (the model or its data)."""


def lock_out_dir(out_dir: Path) -> IO[str]:
    """An exclusive ``flock`` on ``out_dir/.lock``, held while the returned handle is open.

    Fails at once when another process holds it. The kernel drops the lock when its process
    dies, so a killed run never leaves a stale lock behind.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise OutDirError(f"run.out_dir {str(out_dir)!r} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = (out_dir / LOCK_FILE).open("a")
    except OSError as err:  # a read-only filesystem, no permission, a full disk
        raise OutDirError(
            f"cannot write to run.out_dir {str(out_dir)!r}: {err.strerror or err}"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OutDirError(
            f"run.out_dir {str(out_dir)!r} is in use by another training run "
            f"(it holds {out_dir / LOCK_FILE})"
        ) from None
    return handle


def existing_run(out_dir: Path) -> list[str]:
    """The files of an earlier run in ``out_dir`` (metrics, checkpoints, export); [] if none."""
    found = []
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_line(record: dict[str, Any]) -> str:
    """One ``metrics.jsonl`` line. NaN and inf are not JSON: a non-finite value becomes null."""
    clean = {key: _finite_or_none(value) for key, value in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def deepspeed_config(cfg: TrainConfig, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: the stage's file with every ``auto`` filled in."""
    run, opt = cfg.run, cfg.optim
    path = deepspeed_config_path(run)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist")
    ds = json.loads(path.read_text())
    ds["train_micro_batch_size_per_gpu"] = run.micro_batch_size
    ds["gradient_accumulation_steps"] = run.grad_accum
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world
    ds["gradient_clipping"] = opt.grad_clip
    ds.setdefault("zero_optimization", {})["stage"] = run.zero_stage
    ds["bf16"] = {"enabled": run.dtype == "bf16"}
    ds["fp16"] = {"enabled": run.dtype == "fp16"}
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": opt.lr,
            "betas": list(opt.betas),
            "eps": 1e-8,
            "weight_decay": opt.weight_decay,
            # FusedAdam would spend minutes compiling on CPU; torch's AdamW is the same math.
            "torch_adam": True,
        },
    }
    warmup = max(1, min(opt.warmup_steps, run.steps))
    ds["scheduler"] = {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": run.steps,
            "warmup_min_ratio": 0.0,
            "warmup_num_steps": warmup,
            "cos_min_ratio": opt.min_lr_ratio,
            "warmup_type": "linear",
        },
    }
    ds.setdefault("steps_per_print", 10**9)
    return ds


def trunk_config(cfg: TrainConfig, vocab_size: int):
    """The ``LlamaConfig`` of the ``trunk`` section, for a vocabulary of ``vocab_size``."""
    from transformers import LlamaConfig

    t = cfg.trunk
    if t.hidden_size % t.num_heads:
        raise ValueError(
            f"trunk.hidden_size={t.hidden_size} must be divisible by trunk.num_heads={t.num_heads}"
        )
    # Default MLP width: 4 d, rounded up to a multiple of 8.
    intermediate = t.intermediate_size or -(-4 * t.hidden_size // 8) * 8
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads or t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=t.tie_word_embeddings,
    )


def build_model(cfg: TrainConfig, vocab_size: int):
    """A Llama-shaped trunk from the preset (or a local model) with a CP head on top."""
    from transformers import AutoModelForCausalLM

    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    t = cfg.trunk
    if t.init_from:
        base = load_causal_lm(t.init_from)
    else:
        if t.vocab_size is not None and t.vocab_size != vocab_size:
            raise ValueError(
                f"trunk.vocab_size={t.vocab_size} does not match the tokenizer's {vocab_size} "
                "tokens; drop trunk.vocab_size or use a matching tokenizer"
            )
        base = AutoModelForCausalLM.from_config(trunk_config(cfg, vocab_size))
    if base.config.vocab_size != vocab_size:
        raise ValueError(
            f"the model has vocab_size={base.config.vocab_size} but the tokenizer has "
            f"{vocab_size} tokens; they must match"
        )
    head = head_config(cfg.head, int(base.config.hidden_size), vocab_size).to_dict()
    for name in ("hidden_size", "vocab_size"):  # from_causal_lm takes them from the model
        head.pop(name)
    return CPDMTPForCausalLM.from_causal_lm(base, freeze_trunk=t.freeze_trunk, **head)


def load_causal_lm(path: str):
    """A local HF causal LM; from a cpd_mtp export, its trunk and W_U as a plain causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    if AutoConfig.from_pretrained(path, local_files_only=True).model_type != "cpd_mtp":
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    source = CPDMTPForCausalLM.from_pretrained(path, local_files_only=True)
    base = AutoModelForCausalLM.from_config(source.config.text_config)
    base.base_model.load_state_dict(source.trunk.state_dict())
    with torch.no_grad():
        base.get_output_embeddings().weight.copy_(source.head.weight)
    return base


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not biases or norm gains; frozen parameters are left out."""
    seen, decay, no_decay = set(), [], []
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# ---------------------------------------------------------------------- data order
def micro_batch_indices(
    step: int,
    micro: int,
    rank: int,
    world: int,
    micro_batch_size: int,
    accum: int,
    num_blocks: int,
    seed: int,
) -> np.ndarray:
    """Block ids of micro-batch ``micro`` of optimizer step ``step`` on ``rank``.

    Step k's global batch is positions [k·G, (k+1)·G), G = world·accum·micro_batch_size, of the
    endless sequence of per-epoch permutations. Any (world, accum, micro-batch) split with the
    same G sees the same global batch, and the order depends only on (seed, step).
    """
    offset = ((step * accum + micro) * world + rank) * micro_batch_size
    out = np.empty(micro_batch_size, dtype=np.int64)
    for i in range(micro_batch_size):
        epoch, within = divmod(offset + i, num_blocks)
        out[i] = _permutation(num_blocks, seed, epoch)[within]
    return out


@functools.lru_cache(maxsize=4)
def _permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    from cpd_mtp.training.data import epoch_permutation

    return epoch_permutation(num_blocks, seed, epoch)


# ---------------------------------------------------------------------- notes for people
def note(message: str) -> None:
    """One line on stderr for the person running the job (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)


def usage_entropy(usage: Sequence[float]) -> float | None:
    """Entropy of the experts' mean usage over log r: 1 is even use, 0 is one expert only.

    ``usage`` holds r mean gate weights (they need not sum to exactly 1); None for r < 2.
    """
    weights = np.clip(np.asarray(usage, dtype=np.float64), 0.0, None)
    if len(weights) < 2 or weights.sum() <= 0:
        return None
    p = weights / weights.sum()
    nonzero = p[p > 0]
    return float(-(nonzero * np.log(nonzero)).sum() / math.log(len(p)))


def usage_collapse(usage: Sequence[float], threshold: float) -> str | None:
    """The warning for a gate that has collapsed onto few experts, or None when it has not."""
    entropy = usage_entropy(usage)
    if entropy is None or entropy >= threshold:
        return None
    shown = "/".join(f"{u:.2f}" for u in usage)
    return (
        f"expert usage has collapsed: usage {shown}, entropy {entropy:.2f} of log r "
        f"< run.collapse_entropy={threshold} (most experts are unused; try a larger "
        "head.balance_coef, head.expert_init_noise or a lower optim.lr)"
    )


@dataclass
class ResumePoint:
    """The checkpoint a resume starts from: its tag, step and folder."""

    tag: str
    step: int
    path: Path


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, list, dict)) else str(value).lower()


def _changes(
    old: dict[str, Any], new: dict[str, Any], keys: Sequence[str], free: Sequence[str] = ()
) -> list[str]:
    """``key old -> new`` for each flattened key that differs, matches one of ``keys`` (a key,
    or a prefix ending in ``.``) and is not one of ``free``."""
    old, new = flatten(old), flatten(new)

    def watched(key: str) -> bool:
        hit = any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)
        return hit and key not in free

    missing = object()
    names = [k for k in dict.fromkeys([*old, *new]) if watched(k)]
    return [
        f"{k} {_shown(old.get(k))} -> {_shown(new.get(k))}"
        for k in names
        if old.get(k, missing) != new.get(k, missing)
    ]


# ---------------------------------------------------------------------- trainer
class Trainer:
    """One training run: corpus, model, DeepSpeed engine, loop, checkpoints, logging.

    A subclass with other settings (``RetrofitTrainer``) reuses the run-folder lock, the
    checkpoints and the resume logic by overriding :meth:`checkpoint_config` and
    :attr:`FIXED_KEYS`; see :meth:`_find_resume_point` and :meth:`_resume`.
    """

    # Keys of `checkpoint_config()` a resume must keep (a trailing "." is a whole section):
    # they change the model's shape or the data it sees, so the checkpoint would not fit.
    FIXED_KEYS: tuple[str, ...] = (
        "trunk.",
        "head.",
        "data.source",
        "data.vocab_size",
        "data.tokenizer",
        "data.block_size",
        "data.val_fraction",
        "data.max_files",
        "data.text_field",
    )
    # Keys under FIXED_KEYS that only pick how the same loss is computed: free to change.
    FREE_KEYS: tuple[str, ...] = ("head.loss_impl", "head.chunk_bytes")
    # What shapes the warmup + cosine LR schedule; a change is allowed, with a warning.
    SCHEDULE_KEYS: tuple[str, ...] = (
        "run.steps",
        "optim.lr",
        "optim.warmup_steps",
        "optim.min_lr_ratio",
    )

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        check_config(cfg, torch.cuda.is_available())
        self.rank, self.world, self.device = init_distributed()
        self.out_dir = Path(cfg.run.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self._lock: IO[str] | None = None
        self._claim_out_dir()
        try:
            self._start()
        except BaseException:
            self.close()  # a run that failed to start must not keep the directory locked
            raise

    def _claim_out_dir(self) -> None:
        """Rank 0 locks out_dir for the life of the Trainer and refuses to mix with a run there."""
        run, error = self.cfg.run, None
        if self.rank == 0:
            try:
                self._lock = lock_out_dir(self.out_dir)
                found = existing_run(self.out_dir)
                if found and not run.resume and not run.overwrite:
                    raise OutDirError(
                        f"run.out_dir {str(self.out_dir)!r} already holds a run "
                        f"({', '.join(found)}); pass --resume (run.resume=true) to continue it "
                        "or --overwrite (run.overwrite=true) to replace it"
                    )
            except OutDirError as err:
                self.close()
                error = str(err)
        if self.world > 1:  # every rank stops, not only rank 0
            box = [error]
            torch.distributed.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise OutDirError(error)

    def close(self) -> None:
        """Release the lock on out_dir (also released when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _start(self) -> None:
        from cpd_mtp.training.data import build_corpus

        cfg, on_gpu = self.cfg, torch.cuda.is_available()
        self.step = 0
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.wandb = None
        # The checkpoint is checked against the config before anything is built.
        self.resume_point = self._find_resume_point() if cfg.run.resume else None
        self.complete = self._run_complete()
        if self.complete:
            return
        data = data_config(cfg.data, progress=cfg.run.progress and self.rank == 0)
        # Rank 0 builds the caches first; the others then read them.
        if self.rank != 0:
            torch.distributed.barrier()
        self.corpus = build_corpus(data)
        if self.rank == 0:
            torch.distributed.barrier()
        if len(self.corpus.train) == 0:
            raise ValueError("the training split has no full block; lower data.block_size")

        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg, self.corpus.vocab_size)
        import deepspeed

        self.ds_config = deepspeed_config(cfg, on_gpu)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.optim.weight_decay),
            config=self.ds_config,
        )
        if cfg.run.resume:
            self._resume()
        elif cfg.run.overwrite:
            # Only now, with the corpus, model and engine built, is the old run given up.
            if self.rank == 0:
                for name in existing_run(self.out_dir):
                    path = self.out_dir / name
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
            torch.distributed.barrier()
        self.wandb = self._init_wandb()

    # ------------------------------------------------------------------ pieces
    def _batch(self, step: int, micro: int, dataset) -> torch.Tensor:
        run = self.cfg.run
        idx = micro_batch_indices(
            step,
            micro,
            self.rank,
            self.world,
            run.micro_batch_size,
            run.grad_accum,
            len(dataset),
            run.seed,
        )
        return torch.stack([dataset[int(i)] for i in idx]).to(self.device)

    def _init_wandb(self):
        run = self.cfg.run
        if self.rank != 0 or run.wandb_project is None:
            return None
        mode = run.wandb_mode or os.environ.get("WANDB_MODE") or "offline"
        if mode == "disabled":
            return None
        import wandb

        return wandb.init(
            project=run.wandb_project,
            mode=mode,
            dir=str(self.out_dir),
            config=config_to_dict(self.cfg),
            resume="allow",
        )

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with self.metrics_path.open("a") as handle:
            handle.write(json_line(record))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def _all_reduce(self, values: list[float], op=torch.distributed.ReduceOp.SUM) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(tensor, op=op)
        return tensor.tolist()

    # ------------------------------------------------------------------ resume
    def checkpoint_config(self) -> dict[str, Any]:
        """The settings stored in every checkpoint and compared on resume (:attr:`FIXED_KEYS`)."""
        return config_to_dict(self.cfg)

    def schedule(self) -> dict[str, Any]:
        """The settings that shape the LR schedule (:attr:`SCHEDULE_KEYS`), as the run uses them."""
        flat = flatten(config_to_dict(self.cfg))
        return {key: flat[key] for key in self.SCHEDULE_KEYS}

    def _find_resume_point(self) -> ResumePoint:
        """The checkpoint to resume from, checked against the config; call before heavy work.

        Rank 0 picks the newest checkpoint that verifies, refuses one whose stored
        :meth:`checkpoint_config` differs on a :attr:`FIXED_KEYS` key (``ResumeMismatchError``
        naming the key and both values) and warns when a :meth:`schedule` key changed; every
        rank gets the same answer or the same error. Sets and returns ``self.resume_point``.
        """
        answer: ResumePoint | Exception | None = None
        if self.rank == 0:
            try:
                answer = self._check_resume_point()
            except (checkpoint.CheckpointError, ValueError, FileNotFoundError) as err:
                answer = err
        if self.world > 1:
            box = [answer]
            torch.distributed.broadcast_object_list(box, src=0)
            answer = box[0]
        if isinstance(answer, Exception):
            raise answer
        self.resume_point = answer
        return answer

    def _check_resume_point(self) -> ResumePoint:
        tag = checkpoint.resume_tag(self.ckpt_dir)  # falls back past a corrupt latest
        if tag is None:
            raise FileNotFoundError(f"run.resume=true but {self.ckpt_dir} holds no checkpoint")
        record = checkpoint.read_record(self.ckpt_dir, tag)
        point = ResumePoint(tag, int(record["step"]), self.ckpt_dir / tag)
        saved = record.get("config")
        if saved is None:
            note(
                f"warning: checkpoint {point.path} stores no config (an older version wrote "
                "it): the model and data settings cannot be checked against it"
            )
        else:
            changed = _changes(saved, self.checkpoint_config(), self.FIXED_KEYS, self.FREE_KEYS)
            if changed:
                raise ResumeMismatchError(
                    f"cannot resume from {point.path}: {'; '.join(changed)} (checkpoint -> "
                    "now) changes the model or its data; set the checkpoint's values back, or "
                    "start a new run (--overwrite or another run.out_dir)"
                )
        steps = self.cfg.run.steps
        reshaped = _changes(record.get("schedule") or {}, self.schedule(), self.SCHEDULE_KEYS)
        if record.get("schedule") and reshaped and point.step < steps:
            note(
                f"warning: the cosine schedule is re-shaped: {', '.join(reshaped)} (checkpoint "
                f"-> now); steps 1-{point.step} followed the old schedule, steps "
                f"{point.step + 1}-{steps} follow the new one"
            )
        return point

    def _run_complete(self) -> bool:
        """Whether the resume point already is the last step (then say so); False otherwise.

        A complete run whose export is missing (killed while exporting) is not complete: the
        run loads the checkpoint and writes the export without training.
        """
        point = getattr(self, "resume_point", None)
        steps = self.cfg.run.steps
        if point is None or point.step < steps:
            return False
        final = self.out_dir / "final"
        if self.cfg.run.export and not (final / "config.json").is_file():
            note(f"the run is at step {point.step} of {steps}; writing its missing export {final}")
            return False
        note(
            f"the run is already complete: step {point.step} of {steps} (checkpoint "
            f"{point.path}); nothing to train. Raise run.steps to train further."
        )
        return True

    def _resume(self) -> None:
        """Load the resume point into the engine (found first if :meth:`_find_resume_point`
        was not called), announce it and cut ``metrics.jsonl`` back to its step."""
        point = getattr(self, "resume_point", None) or self._find_resume_point()
        tag = point.tag
        try:
            path, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        except Exception as err:  # torch/DeepSpeed raise many types on a broken file
            raise checkpoint.CheckpointError(f"cannot load checkpoint {tag}: {err}") from err
        if path is None or client is None:
            raise checkpoint.CheckpointError(
                f"DeepSpeed found no checkpoint {tag} in {self.ckpt_dir}"
            )
        self.step = int(client["step"])
        torch.set_rng_state(client["torch_rng"])
        note(f"resumed from step {self.step} of {self.cfg.run.steps} (checkpoint {point.path})")
        if self.rank == 0 and self.metrics_path.exists():  # drop records past the checkpoint
            kept = []
            for number, line in enumerate(self.metrics_path.read_text().splitlines(), start=1):
                try:
                    step = json.loads(line)["step"]
                except (json.JSONDecodeError, TypeError, KeyError):
                    # A kill or a full disk mid-write leaves a torn last line: drop it, say so.
                    where = f"{self.metrics_path}:{number}"
                    warnings.warn(
                        f"{where}: dropping an unreadable record {line[:80]!r}", stacklevel=2
                    )
                    continue
                if step <= self.step:
                    kept.append(line)
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def save(self) -> None:
        tag = checkpoint.tag_for_step(self.step)
        client = {"step": self.step, "torch_rng": torch.get_rng_state()}
        with checkpoint.disk_full_is_an_error(self.ckpt_dir / tag):
            self.engine.save_checkpoint(
                str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False
            )
        torch.distributed.barrier()
        if self.rank == 0:
            info = {"config": self.checkpoint_config(), "schedule": self.schedule()}
            checkpoint.seal(self.ckpt_dir, tag, self.step, info)
            checkpoint.prune(self.ckpt_dir, self.cfg.run.keep_checkpoints)
        torch.distributed.barrier()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """Validation joint NLL, next-token NLL of the marginal, per-head NLL, expert usage.

        A metric with no data (no position or no target) is None, never NaN or 0.
        """
        run, n_future, ignore = self.cfg.run, self.cfg.head.n_future, self.cfg.head.ignore_index
        dataset = self.corpus.validation
        per_rank = run.micro_batch_size
        batches = min(run.eval_batches, max(1, len(dataset) // (per_rank * self.world)))
        sums = np.zeros(5 + 2 * n_future + self.cfg.head.rank)
        self.engine.eval()
        for b in range(batches):
            start = (b * self.world + self.rank) * per_rank
            idx = [i % len(dataset) for i in range(start, start + per_rank)]
            ids = torch.stack([dataset[i] for i in idx]).to(self.device)
            out = self.engine(input_ids=ids, labels=ids, return_logits=False).cp_output
            counts = (shift_targets(ids, n_future, ignore) != ignore).sum(dim=(0, 1)).cpu().numpy()
            pos, targets = float(out.num_positions), float(out.num_targets)
            sums[:5] += [
                float(out.joint_nll) * pos,
                pos,
                float(out.joint_nll_per_target) * targets,
                targets,
                float(out.gate_entropy) * pos,
            ]
            sums[5 : 5 + n_future] += out.per_head_nll.cpu().numpy() * counts
            sums[5 + n_future : 5 + 2 * n_future] += counts
            sums[5 + 2 * n_future :] += out.expert_weight.cpu().numpy() * pos
        self.engine.train()
        s = np.array(self._all_reduce(sums.tolist()))

        def ratio(num: float, den: float) -> float | None:
            return float(num / den) if den > 0 else None

        per_head = [ratio(s[5 + k], s[5 + n_future + k]) for k in range(n_future)]
        result = {
            "val/joint_nll": ratio(s[0], s[1]),
            "val/joint_nll_per_target": ratio(s[2], s[3]),
            "val/next_token_nll": per_head[0],
            "val/gate_entropy": ratio(s[4], s[1]),
        }
        result.update({f"val/head{k + 1}_nll": v for k, v in enumerate(per_head)})
        usage = s[5 + 2 * n_future :]
        result.update({f"val/expert{a}_weight": ratio(v, s[1]) for a, v in enumerate(usage)})
        weights = [ratio(v, s[1]) for v in usage]
        result["val/usage_entropy"] = None if None in weights else usage_entropy(weights)
        return result

    def _check_usage(self, metrics: dict[str, float | None]) -> str | None:
        """Warn (one line, rank 0) when the ``val/expert{a}_weight`` usage has collapsed."""
        usage = [v for k, v in metrics.items() if re.fullmatch(r"val/expert\d+_weight", k)]
        if self.rank != 0 or not usage or None in usage:
            return None
        message = usage_collapse(usage, self.cfg.run.collapse_entropy)
        if message is not None:
            note(f"warning: step {self.step}: {message}")
        return message

    # ------------------------------------------------------------------ the loop
    def train(self, stop_after: int | None = None) -> dict[str, float | None]:
        """Run to ``run.steps`` (or ``stop_after`` steps, to simulate preemption)."""
        run = self.cfg.run
        if getattr(self, "complete", False):
            return {}  # said so at start-up; nothing was built
        # A bar on a terminal; in a log, a plain line every 5 % (no carriage returns).
        bar = progress(
            total=run.steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=self.rank != 0 or not run.progress,
        )
        start, tokens = time.perf_counter(), 0
        tokens_per_step = (
            run.micro_batch_size * run.grad_accum * self.world * self.cfg.data.block_size
        )
        last_eval: dict[str, float | None] = {}
        steps_done = 0
        while self.step < run.steps and (stop_after is None or steps_done < stop_after):
            step_start = time.perf_counter()
            sums = np.zeros(4)
            for micro in range(run.grad_accum):
                ids = self._batch(self.step, micro, self.corpus.train)
                out = self.engine(input_ids=ids, labels=ids, return_logits=False)
                self.engine.backward(out.loss)
                self.engine.step()
                cp = out.cp_output
                sums += [
                    x.item() for x in (out.loss, cp.joint_nll, cp.per_head_nll[0], cp.aux_loss)
                ]
            self.step += 1
            steps_done += 1
            tokens += tokens_per_step
            loss, joint, next_nll, aux = np.array(self._all_reduce(sums.tolist())) / (
                run.grad_accum * self.world
            )
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / elapsed:,.0f}")
            bar.update(1)
            record = {
                "step": self.step,
                "loss": loss,
                "joint_nll": joint,
                "next_token_nll": next_nll,
                "aux_loss": aux,
                "lr": self.engine.get_lr()[0],
                "tokens_per_s": tokens / elapsed,
                "step_time_s": time.perf_counter() - step_start,
            }
            if self.step % run.eval_every == 0 or self.step == run.steps:
                last_eval = self.evaluate()
                record.update(last_eval)
                if self.rank == 0:
                    joint, nxt = (last_eval[k] for k in ("val/joint_nll", "val/next_token_nll"))
                    bar.write(
                        f"step {self.step}: val joint {_nats(joint)} next-token {_nats(nxt)} nats"
                    )
                self._check_usage(last_eval)
            self._log(record)
            if self.step % run.save_every == 0 or self.step == run.steps:
                self.save()
        bar.close()
        if self.step >= run.steps and run.export:
            self.export(self.out_dir / "final")
        if self.wandb is not None:
            self.wandb.finish()
        return last_eval

    def export(self, path: Path) -> None:
        """An HF-format model and tokenizer; gathers ZeRO-3 partitions first.

        Written by ``cpd_mtp.hf.export.save_export``: the tokenizer's bos/eos/pad ids go into the
        model and generation configs, the files into a temporary folder renamed over ``path``
        only when complete, with a SHA-256 record that ``from_pretrained`` checks.
        """
        import deepspeed

        from cpd_mtp.hf.export import save_export

        module = self.engine.module
        gather = (
            deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
            if self.cfg.run.zero_stage == 3
            else nullcontext()
        )
        with gather:
            if self.rank == 0:
                run_config = json.dumps(config_to_dict(self.cfg), indent=1)
                extra = {"train_config.json": run_config}
                save_export(module, self.corpus.tokenizer, path, extra_files=extra)
        torch.distributed.barrier()


def _nats(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict[str, float | None]:
    """Train per ``cfg``; returns the last validation metrics."""
    return Trainer(cfg).train(stop_after=stop_after)


def _one_line(err: BaseException) -> str:
    """An error's message on one line (a dependency's may span several)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def run_command(
    preset: str,
    overrides: list[str],
    print_config: bool = False,
    parser: argparse.ArgumentParser | None = None,
) -> None:
    """``cpd-mtp train``: every problem is one ``cpd-mtp train: error: ...`` line.

    The whole config is checked before anything heavy (DeepSpeed, the corpus, the model); a
    bad config, a taken out_dir or a checkpoint that does not fit the config exits 2, like
    argparse's own errors; a failure while running (a corrupt checkpoint, a full disk) exits 1.
    ``print_config`` prints the merged config as YAML and exits.
    """
    parser = parser or argparse.ArgumentParser(prog="cpd-mtp train")
    try:
        cfg = load_train_config(preset, overrides)
        check_config(cfg, torch.cuda.is_available())  # before any heavy work
    except (ValueError, FileNotFoundError) as err:
        parser.error(_one_line(err))
    if print_config:
        print(config_to_yaml(cfg), end="")
        return
    quiet_library_bars()
    try:
        metrics = train(cfg)
    except (ValueError, FileNotFoundError) as err:  # OutDirError, ResumeMismatchError, ...
        parser.error(_one_line(err))
    except checkpoint.CheckpointError as err:
        parser.exit(1, f"{parser.prog}: error: {_one_line(err)}\n")
    if int(os.environ.get("RANK", 0)) == 0 and metrics:
        print(json.dumps(metrics, indent=1))


def main(argv: list[str] | None = None) -> None:
    """``python -m cpd_mtp.training.trainer ...`` is ``cpd-mtp train ...`` (what launchers run)."""
    from cpd_mtp.cli import main as cli_main

    cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
