"""The one training loop: ``cpd-mtp train`` and ``cpd-mtp retrofit`` differ only in their batches.

A run hands :func:`train_loop` a DeepSpeed engine, its :class:`RunDirectory` and a loss
function ``loss_fn(step, micro) -> (loss, head output, labels)``: micro-batch ``micro`` of
optimizer step ``step``, a pure function of the two (so a resumed run sees the same batches).
The loop steps the engine, records ``loss``, ``lr``, throughput and the head's named metrics
(:class:`cpd_mtp.metrics.HeadMetrics`) in ``metrics.jsonl``, validates every ``eval_every``
steps (``val/`` + the same names), checkpoints every ``save_every`` steps, and shows progress.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cpd_mtp.head import CPDMTPHead, CPDMTPHeadOutput
from cpd_mtp.metrics import HeadMetrics, expert_usage, usage_collapse
from cpd_mtp.training.run_dir import RunDirectory, note
from cpd_mtp.utils.progress import progress

LossFn = Callable[[int, int], tuple[torch.Tensor, CPDMTPHeadOutput, torch.Tensor]]
# (batch index) -> (head output, labels, weight): weight 0 for a padding batch (see evaluate).
EvalFn = Callable[[int], tuple[CPDMTPHeadOutput, torch.Tensor, float]]


@dataclass
class LoopSettings:
    """How long to train and how often to validate and checkpoint."""

    steps: int
    grad_accum: int
    eval_every: int
    save_every: int
    keep_checkpoints: int
    tokens_per_step: int  # over every process
    collapse_entropy: float = 0.5
    progress: bool = True
    desc: str = "train"
    # A ``time.monotonic()`` value: the step that ends after it is the last (validated,
    # checkpointed); None: ``steps`` alone decides.
    deadline: float | None = None

    @classmethod
    def from_run(cls, run: Any, world: int, block_size: int, desc: str) -> LoopSettings:
        """From a config's ``run`` section (``RunSettings``, resolved steps) and the world."""
        return cls(
            steps=run.steps,
            grad_accum=run.grad_accum,
            eval_every=run.eval_every,
            save_every=run.save_every,
            keep_checkpoints=run.keep_checkpoints,
            tokens_per_step=run.micro_batch_size * run.grad_accum * world * block_size,
            collapse_entropy=run.collapse_entropy,
            progress=run.progress,
            desc=desc,
        )


@dataclass
class LoopResult:
    step: int
    last_eval: dict[str, float | None]
    tokens: int
    train_seconds: float

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else None


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum over processes (a collective call); the values themselves in a world of one."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def evaluate(
    engine: Any, head: CPDMTPHead, batches: int, forward: EvalFn, device: torch.device
) -> dict[str, float | None]:
    """``val/`` + the head's named metrics over ``batches`` forwards of every process.

    Every process runs the same number of forwards (ZeRO-3 gathers are collective); a process
    with no data left runs a batch of its own with weight 0.
    """
    metrics = HeadMetrics.for_head(head)
    engine.eval()
    try:
        for index in range(batches):
            out, labels, weight = forward(index)
            metrics.add(head, out, labels, weight)
    finally:
        engine.train()
    return {f"val/{key}": value for key, value in metrics.pop(device).items()}


def check_usage(
    metrics: dict[str, float | None], threshold: float, step: int, rank: int
) -> str | None:
    """Warn (one line, rank 0) when the validation usage has collapsed onto few experts."""
    usage = expert_usage(metrics, "val/")
    if rank != 0 or not usage:
        return None
    message = usage_collapse(usage, threshold)
    if message is not None:
        note(f"warning: step {step}: {message}")
    return message


def _nats(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def train_loop(
    engine: Any,
    head: CPDMTPHead,
    run_dir: RunDirectory,
    settings: LoopSettings,
    step: int,
    loss_fn: LossFn,
    evaluate_fn: Callable[[], dict[str, float | None]],
    checkpoint_info: Callable[[], dict[str, Any]],
    device: torch.device,
    stop_after: int | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    replan: Callable[[int, float], int | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> LoopResult:
    """Train from ``step`` to ``settings.steps`` (or ``stop_after`` steps, to simulate a kill).

    ``checkpoint_info()`` is stored in every checkpoint's sealed record (the run's config and
    LR schedule, compared on resume); ``on_record`` sees every metrics record (wandb).
    ``replan(step, mean_step_seconds)`` is asked after every step and may return a new total
    (a time budget sizing the run from its real steps); with ``settings.deadline`` the step
    that ends past it becomes the last (``clock`` tells the time: a test gives its own).
    """
    rank = run_dir.rank
    bar = progress(
        total=settings.steps,
        initial=step,
        desc=settings.desc,
        unit="step",
        disable=rank != 0 or not settings.progress,
    )
    tokens, train_seconds, done = 0, 0.0, 0
    last_eval: dict[str, float | None] = {}
    metrics = HeadMetrics.for_head(head)
    while step < settings.steps and (stop_after is None or done < stop_after):
        step_start = time.perf_counter()
        loss_sum = 0.0
        for micro in range(settings.grad_accum):
            loss, out, labels = loss_fn(step, micro)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
            metrics.add(head, out, labels)
        step += 1
        done += 1
        tokens += settings.tokens_per_step
        step_seconds = time.perf_counter() - step_start
        train_seconds += step_seconds
        if replan is not None:
            total = replan(step, train_seconds / done)
            if total is not None and total != settings.steps:
                settings.steps = max(step, total)
                bar.total = settings.steps
        if settings.deadline is not None and clock() > settings.deadline:
            settings.steps = step  # the time is up: this step is the last
            bar.total = step
        loss_total, calls = all_reduce_sum([loss_sum, settings.grad_accum], device)
        record: dict[str, Any] = {
            "step": step,
            "loss": loss_total / calls,
            **metrics.pop(device),
            "lr": engine.get_lr()[0],
            "tokens_per_s": tokens / train_seconds,
            "step_time_s": step_seconds,
        }
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens / train_seconds:,.0f}")
        bar.update(1)
        if step % settings.eval_every == 0 or step == settings.steps:
            last_eval = evaluate_fn()
            record.update(last_eval)
            if rank == 0:
                joint = last_eval.get("val/joint_nll_per_target")
                nxt = last_eval.get("val/next_token_nll")
                shown = f"step {step}: val joint NLL {_nats(joint)} nats per target"
                shown += "" if nxt is None else f", next-token {_nats(nxt)}"
                usage = expert_usage(last_eval, "val/")
                if len(usage) > 1:  # every run says how its experts are used
                    shown += f", expert usage {'/'.join(f'{u:.2f}' for u in usage)}"
                bar.write(shown)
            check_usage(last_eval, settings.collapse_entropy, step, rank)
        run_dir.log(record)
        if on_record is not None:
            on_record(record)
        if step % settings.save_every == 0 or step == settings.steps:
            client = {"step": step, "torch_rng": torch.get_rng_state()}
            run_dir.save(engine, step, client, checkpoint_info(), settings.keep_checkpoints)
    bar.close()
    return LoopResult(step, last_eval, tokens, train_seconds)


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


@functools.lru_cache(maxsize=4)  # an epoch's permutation serves the whole epoch
def _permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    from cpd_mtp.training.data import epoch_permutation

    return epoch_permutation(num_blocks, seed, epoch)
