"""The process and the DeepSpeed engine a training run needs: one place for both trainers.

``init_distributed`` starts ``torch.distributed`` (NCCL on GPUs, gloo on CPUs; a world of one
for a plain ``python -m``), ``deepspeed_config`` fills a ZeRO preset with a run's settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from cpd_mtp.training.config import deepspeed_config_path

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


def deepspeed_config(cfg: Any, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for a run: the stage's file with every ``auto`` filled in.

    ``cfg`` has ``run`` and ``optim`` sections (a ``TrainConfig`` or a ``RetrofitConfig``).
    """
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
