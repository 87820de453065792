"""A ``transformers`` callback that logs what the CP-MTP loss is made of.

The Hugging Face ``Trainer`` logs ``loss`` / ``eval_loss``, which for ``CPDMTPForCausalLM`` is
the joint NLL of the next n tokens plus the balancing terms: not a next-token loss, so its
exponential is not a perplexity. ``CPDMTPMetricsCallback`` adds, to every training log record
and to every evaluation record the one metrics record of ``cpd_mtp.metrics.HeadMetrics``, whose names ``cpd-mtp train`` and
``cpd-mtp retrofit`` log too: ``next_token_nll``, ``head_nll/{s}``, ``joint_nll``,
``joint_nll_per_target``, ``aux_loss``, ``expert_usage/{a}``, ``expert_responsibility/{a}``,
``gate_entropy``, ``usage_entropy`` and, with a draft vocabulary, ``draft_coverage``.

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

from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from cpd_mtp.head import CPDMTPHead, CPDMTPHeadOutput
from cpd_mtp.metrics import HeadMetrics

__all__ = ["CPDMTPMetricsCallback", "add_metrics_callback"]

PREFIX = "cpd/"


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
        self._train: HeadMetrics | None = None
        self._eval: HeadMetrics | None = None
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
        self._train = HeadMetrics.for_head(heads[0])
        self._eval = HeadMetrics.for_head(heads[0])
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
        (self._train if head.training else self._eval).add(head, output, labels)

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
