"""A ``transformers`` callback that logs what the CP-MTP loss is made of.

The Hugging Face ``Trainer`` logs ``loss`` / ``eval_loss``, which for ``CPDMTPForCausalLM`` is
the joint NLL of the next n tokens plus the balancing terms: not a next-token loss, so its
exponential is not a perplexity. ``CPDMTPMetricsCallback`` adds, to every training log record
and to every evaluation record:

==================================  ===========================================================
``cpd/next_token_nll``              NLL of the model's next-token scores, nats per target
``cpd/head_nll/{s}``                NLL of the CP marginal at offset s = 1..n
``cpd/joint_nll``                   joint NLL of the next n tokens, per position
``cpd/aux_loss``                    balancing + router z-loss, already weighted
``cpd/expert_usage/{a}``            mean gate weight of expert a = 0..r-1 (sums to 1)
``cpd/expert_responsibility/{a}``   mean posterior responsibility of expert a (sums to 1)
``cpd/gate_entropy``                mean entropy of the gate, nats, in [0, log r]
==================================  ===========================================================

The next-token scores are the CP marginal (then ``cpd/head_nll/1`` is the same number) or, for
a head built with ``next_token="base"``, the wrapped model's own logits. Training values are
averaged over every micro-batch since the previous log record (NLLs per
target, usage and entropy per position, ``aux_loss`` per micro-batch); evaluation values over
the whole evaluation set, under the evaluation's prefix (``eval_cpd/next_token_nll``, which
wandb shows as ``eval/cpd/next_token_nll``).

How: a forward hook on every ``CPDMTPHead`` of the model reads the statistics the head returns
with labels (its ``CPDMTPHeadOutput``), so no model code changes and any wrapper (PEFT,
DeepSpeed, DDP) is fine. The sums stay on the device until a log record is written; across
processes they are summed before averaging.

The Trainer runs callbacks in order and calls the reporting integrations (wandb, TensorBoard,
...) before callbacks passed to it, so install this one with ``add_metrics_callback(trainer)``,
which puts it first: every logger then sees its keys.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from cpd_mtp.head import CPDMTPHead, CPDMTPHeadOutput, shift_targets

__all__ = ["CPDMTPMetricsCallback", "add_metrics_callback"]

PREFIX = "cpd/"


class _Sums:
    """Weighted sums of one phase's statistics, kept on the device (no sync per step).

    Layout of ``values`` (float64): per-head NLL sums (n), per-head target counts (n), joint NLL
    sum, positions, aux-loss sum, micro-batches, usage sums (r), responsibility sums (r),
    entropy sum, statistic rows, next-token NLL sum, next-token targets.
    """

    def __init__(self, n_future: int, rank: int) -> None:
        self.n, self.r = n_future, rank
        self.size = 2 * n_future + 4 + 2 * rank + 4
        self.values: torch.Tensor | None = None

    def add(
        self,
        out: CPDMTPHeadOutput,
        head_counts: torch.Tensor,
        rows: torch.Tensor,
        next_token: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Add one head output.

        Args:
            out: the head's output for one micro-batch.
            head_counts: (n,) observed targets per offset.
            rows: scalar, the positions the expert statistics were averaged over.
            next_token: scalars, the summed next-token NLL of the model's next-token scores and
                the number of targets it is summed over.
        """
        dtype = torch.float64
        device = out.per_head_nll.device
        positions = out.num_positions.to(device, dtype)
        counts = head_counts.to(device, dtype)
        stat_rows = rows.to(device, dtype)
        row = torch.cat(
            [
                out.per_head_nll.detach().to(dtype) * counts,
                counts,
                (out.joint_nll.detach().to(dtype) * positions).reshape(1),
                positions.reshape(1),
                out.aux_loss.detach().to(device, dtype).reshape(1),
                torch.ones(1, dtype=dtype, device=device),
                out.expert_weight.detach().to(dtype) * stat_rows,
                out.expert_responsibility.detach().to(dtype) * stat_rows,
                (out.gate_entropy.detach().to(dtype) * stat_rows).reshape(1),
                stat_rows.reshape(1),
                next_token[0].detach().to(device, dtype).reshape(1),
                next_token[1].to(device, dtype).reshape(1),
            ]
        )
        self.values = row if self.values is None else self.values + row.to(self.values.device)

    def pop(self, device: torch.device | str) -> dict[str, float]:
        """The means (key -> value, keys without prefix), summed over processes; then reset."""
        values = self.values
        self.values = None
        if values is None:
            values = torch.zeros(self.size, dtype=torch.float64, device=device)
        values = _sum_over_processes(values, device).cpu().tolist()
        n, r = self.n, self.r
        head_sum, head_count = values[:n], values[n : 2 * n]
        joint_sum, positions, aux_sum, calls = values[2 * n : 2 * n + 4]
        usage = values[2 * n + 4 : 2 * n + 4 + r]
        responsibility = values[2 * n + 4 + r : 2 * n + 4 + 2 * r]
        entropy_sum, rows, next_sum, next_count = values[-4:]
        means: dict[str, float] = {}
        if next_count > 0:
            means["next_token_nll"] = next_sum / next_count
        for s in range(n):
            if head_count[s] > 0:
                means[f"head_nll/{s + 1}"] = head_sum[s] / head_count[s]
        if positions > 0:
            means["joint_nll"] = joint_sum / positions
        if calls > 0:
            means["aux_loss"] = aux_sum / calls
        if rows > 0:
            for a in range(r):
                means[f"expert_usage/{a}"] = usage[a] / rows
                means[f"expert_responsibility/{a}"] = responsibility[a] / rows
            means["gate_entropy"] = entropy_sum / rows
        return means


def _sum_over_processes(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """All-reduce (sum) under ``torch.distributed``; the tensor itself otherwise."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    if torch.distributed.get_world_size() == 1:
        return values
    values = values.to(device)  # NCCL needs the process's own GPU
    torch.distributed.all_reduce(values)
    return values


def _targets_per_offset(head: CPDMTPHead, labels: torch.Tensor) -> torch.Tensor:
    """(n,) observed targets per offset, exactly as the head counts them for ``per_head_nll``."""
    cfg = head.config
    targets = shift_targets(labels.to(torch.int64), cfg.n_future, cfg.ignore_index)
    valid = targets != cfg.ignore_index  # (..., T, n)
    if head.draft_ids is not None:  # targets outside the draft vocabulary are ignored
        valid = valid & (head.draft_position(targets.clamp(min=0)) >= 0).to(valid.device)
    return valid.reshape(-1, cfg.n_future).sum(0)


def _next_token_nll(
    head: CPDMTPHead, out: CPDMTPHeadOutput, labels: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the model's next-token scores, and its number of targets.

    ``marginal`` mode: the scores are the CP marginal, whose NLL the head already gives
    (``per_head_nll[0]``). ``base`` mode: they are the wrapped model's own logits, which the
    head returns as ``out.logits`` when asked for them (the default); without them there is
    nothing to measure, and the count is 0.
    """
    if head.config.next_token != "base":
        return out.per_head_nll[0] * counts[0], counts[0]
    if out.logits is None:
        return counts.new_zeros(()), counts.new_zeros(())
    ignore = head.config.ignore_index
    logits, targets = out.logits[..., :-1, :], labels[..., 1:].to(torch.int64)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1).to(logits.device),
        ignore_index=ignore,
        reduction="sum",
    )
    return nll, (targets != ignore).sum()


class CPDMTPMetricsCallback(TrainerCallback):
    """Logs next-token NLL, per-head NLL, expert usage and gate entropy of a CP-MTP model.

    Works with any model holding a ``CPDMTPHead`` (``CPDMTPForCausalLM``, a PEFT model around
    one, ...). Keys are listed in the module docstring; training records get them under
    ``cpd/``, evaluation records under ``<prefix>_cpd/`` (``eval_cpd/...``). Install it with
    ``add_metrics_callback(trainer)`` so that the reporting integrations see the keys.
    """

    def __init__(self) -> None:
        self._heads: list[CPDMTPHead] = []
        self._hooks: list[Any] = []
        self._train: _Sums | None = None
        self._eval: _Sums | None = None
        self._first = False  # set by add_metrics_callback
        self._warned = False

    # ------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module) -> None:
        """Hook every ``CPDMTPHead`` of ``model`` (again if the model changed).

        Raises:
            ValueError: the model holds no ``CPDMTPHead``.
        """
        heads = [m for m in model.modules() if isinstance(m, CPDMTPHead)]
        if not heads:
            raise ValueError(
                f"CPDMTPMetricsCallback needs a model with a CPDMTPHead, got {type(model).__name__}"
            )
        if len(heads) == len(self._heads) and all(a is b for a, b in zip(heads, self._heads)):
            return
        self.detach()
        self._heads = heads
        cfg = heads[0].config
        self._train = _Sums(cfg.n_future, cfg.rank)
        self._eval = _Sums(cfg.n_future, cfg.rank)
        self._hooks = [h.register_forward_hook(self._record, with_kwargs=True) for h in heads]

    def detach(self) -> None:
        """Remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._heads = [], []

    def _record(self, head: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if not isinstance(output, CPDMTPHeadOutput):  # called without labels: no statistics
            return
        labels = kwargs.get("labels", args[1] if len(args) > 1 else None)
        if labels is None:
            return
        with torch.no_grad():
            counts = _targets_per_offset(head, labels)
            # The head takes its expert statistics over the positions with a target, or over
            # all positions when none has one. (Tensors: no device sync per micro-batch.)
            positions = output.num_positions
            rows = torch.where(positions > 0, positions, positions.new_tensor(labels.numel()))
            sums = self._train if head.training else self._eval
            sums.add(output, counts, rows, _next_token_nll(head, output, labels, counts))

    # ------------------------------------------------------------------ trainer events
    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if kwargs.get("model") is not None:
            self.attach(kwargs["model"])

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if kwargs.get("model") is not None:  # model_init may have built a new one
            self.attach(kwargs["model"])
        if self._train is not None:
            self._train.values = None
        report_to = [args.report_to] if isinstance(args.report_to, str) else args.report_to
        reporters = [r for r in (report_to or []) if r != "none"]
        if reporters and not self._first and not self._warned:
            self._warned = True
            warnings.warn(
                f"CPDMTPMetricsCallback runs after the reporting callbacks {reporters}, which "
                "then miss its keys; install it with cpd_mtp.hf.add_metrics_callback(trainer)",
                stacklevel=2,
            )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or self._train is None:
            return
        prefix = None
        if "loss" in logs:  # the Trainer's periodic training record
            prefix, sums = PREFIX, self._train
        else:  # an evaluation record: ``{prefix}_runtime`` comes with every one
            runtime = [k for k in logs if k.endswith("_runtime") and k != "train_runtime"]
            if runtime:
                prefix, sums = f"{runtime[0][: -len('_runtime')]}_{PREFIX}", self._eval
        if prefix is None:
            return
        added = {prefix + k: v for k, v in sums.pop(args.device).items() if math.isfinite(v)}
        logs.update(added)
        # The Trainer stored its copy of the record before calling the callbacks.
        history = state.log_history
        if added and history and history[-1].get("step") == state.global_step:
            history[-1].update(added)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._eval is not None:
            self._eval.values = None

    on_predict = on_evaluate

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._train is not None:
            self._train.values = None


def add_metrics_callback(
    trainer: Trainer, callback: CPDMTPMetricsCallback | None = None
) -> CPDMTPMetricsCallback:
    """Install a ``CPDMTPMetricsCallback`` first in ``trainer``'s callbacks and hook its model.

    First, so that the printer, progress bar and reporting integrations (wandb, ...) which
    the Trainer registered before any user callback see the keys it adds to each record.

    Args:
        trainer: a ``transformers.Trainer`` whose model holds a ``CPDMTPHead``.
        callback: the callback to install; a new one when None.

    Returns:
        The installed callback.
    """
    callback = callback if callback is not None else CPDMTPMetricsCallback()
    handler = trainer.callback_handler
    handler.callbacks = [cb for cb in handler.callbacks if cb is not callback]
    handler.callbacks.insert(0, callback)
    callback._first = True
    callback.attach(trainer.model)
    return callback
