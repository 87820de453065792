"""One metrics record for a CP-MTP head: the names every trainer, log and callback uses.

``HeadMetrics`` sums what a head returns with labels (its ``CPDMTPHeadOutput``) over any
number of batches, on the device, and turns the sums into named means:

==================================  ===========================================================
``next_token_nll``                  NLL of the model's next-token scores, nats per target
``head_nll/{s}``                    NLL of the CP marginal at offset s = 1..n
``joint_nll``                       joint NLL of the next n tokens, per position
``joint_nll_per_target``            the same sum per observed target (nats per token)
``aux_loss``                        balancing + router z-loss, already weighted, per batch
``expert_usage/{a}``                mean gate weight of expert a = 0..r-1 (sums to 1)
``expert_responsibility/{a}``       mean posterior responsibility of expert a (sums to 1)
``gate_entropy``                    mean entropy of the gate, nats, in [0, log r]
``usage_entropy``                   entropy of the mean usage over log r (1 even, 0 collapsed)
``draft_coverage``                  with a draft vocabulary: the fraction of targets inside it
==================================  ===========================================================

The next-token scores are the CP marginal (``head_nll/1`` is then the same number) or, for a
head in ``next_token="base"`` mode, the wrapped model's own logits when the head returned
them; without them ``next_token_nll`` is left out. A mean with nothing to average is left out
too, never NaN. ``cpd-mtp train``, ``cpd-mtp retrofit`` and the Hugging Face callback
(``cpd_mtp.hf.callbacks``) all log these names: training records as they are, validation
records under ``val/``, the callback under ``cpd/``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from cpd_mtp.head import CPDMTPHead, CPDMTPHeadOutput, shift_targets

__all__ = ["HeadMetrics", "first_draft_hits", "usage_collapse", "usage_entropy"]


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


def targets_per_offset(head: CPDMTPHead, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) targets per offset the head scores, and (n,) observed targets per offset.

    The first counts exactly what the head averages ``per_head_nll`` over
    (``CPDMTPHead.loss_targets``): with a draft vocabulary, targets outside it are ignored; a
    token-conditioned head scores no offset-1 target. The second counts every observed target.
    """
    cfg = head.config
    targets = shift_targets(labels.to(torch.int64), cfg.n_future, cfg.ignore_index)
    present = targets != cfg.ignore_index  # (..., T, n)
    scored = head.loss_targets(labels).to(present.device) != cfg.ignore_index
    return scored.reshape(-1, cfg.n_future).sum(0), present.reshape(-1, cfg.n_future).sum(0)


def _next_token_nll(
    head: CPDMTPHead, out: CPDMTPHeadOutput, labels: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the model's next-token scores, and its number of targets (see module)."""
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


def _sum_over_processes(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """All-reduce (sum) under ``torch.distributed``; the tensor itself otherwise."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    if torch.distributed.get_world_size() == 1:
        return values
    values = values.to(device)  # NCCL needs the process's own GPU
    torch.distributed.all_reduce(values)
    return values


class HeadMetrics:
    """Weighted sums of a head's statistics over batches, kept on the device (no sync per add).

    Layout of the float64 sums: per-offset NLL sums (n), scored targets (n), observed targets
    (n), joint NLL sum, positions, joint NLL per-target sum, targets, aux-loss sum, batches,
    usage sums (r), responsibility sums (r), entropy sum, statistic rows, next-token NLL sum,
    next-token targets.
    """

    def __init__(self, n_future: int, rank: int, draft_vocab: bool = False) -> None:
        self.n, self.r, self.draft_vocab = n_future, rank, draft_vocab
        self.size = 3 * n_future + 6 + 2 * rank + 4
        self.values: torch.Tensor | None = None

    @classmethod
    def for_head(cls, head: CPDMTPHead) -> HeadMetrics:
        cfg = head.config
        return cls(cfg.n_future, cfg.rank, draft_vocab=cfg.draft_vocab_size is not None)

    def reset(self) -> None:
        self.values = None

    def add(
        self, head: CPDMTPHead, out: CPDMTPHeadOutput, labels: torch.Tensor, weight: float = 1.0
    ) -> None:
        """Add one head output (computed with ``labels``); ``weight`` 0 adds nothing but keeps
        the call collective-free (a padded batch on a process with no data of its own)."""
        with torch.no_grad():
            scored, present = targets_per_offset(head, labels)
            positions = out.num_positions
            # The head takes its expert statistics over the positions with a target, or over
            # all positions when none has one.
            rows = torch.where(positions > 0, positions, positions.new_tensor(labels.numel()))
            next_sum, next_count = _next_token_nll(head, out, labels, scored)
            dtype, device = torch.float64, out.per_head_nll.device

            def col(value: torch.Tensor) -> torch.Tensor:
                return value.detach().to(device, dtype).reshape(-1)

            targets = col(out.num_targets)
            row = torch.cat(
                [
                    col(out.per_head_nll) * col(scored),
                    col(scored),
                    col(present),
                    col(out.joint_nll) * col(positions),
                    col(positions),
                    col(out.joint_nll_per_target) * targets,
                    targets,
                    col(out.aux_loss),
                    torch.ones(1, dtype=dtype, device=device),
                    col(out.expert_weight) * col(rows),
                    col(out.expert_responsibility) * col(rows),
                    col(out.gate_entropy) * col(rows),
                    col(rows),
                    col(next_sum),
                    col(next_count),
                ]
            )
            row = row * weight
        self.values = row if self.values is None else self.values + row.to(self.values.device)

    def pop(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """The means by name, summed over processes (a collective call); then reset."""
        values = self.values
        self.values = None
        if values is None:
            values = torch.zeros(self.size, dtype=torch.float64, device=device)
        v = _sum_over_processes(values, device).cpu().tolist()
        n, r = self.n, self.r
        head_sum, scored, present = v[:n], v[n : 2 * n], v[2 * n : 3 * n]
        joint_sum, positions, per_target_sum, targets, aux_sum, batches = v[3 * n : 3 * n + 6]
        base = 3 * n + 6
        usage, responsibility = v[base : base + r], v[base + r : base + 2 * r]
        entropy_sum, rows, next_sum, next_count = v[base + 2 * r :]
        means: dict[str, float] = {}
        if next_count > 0:
            means["next_token_nll"] = next_sum / next_count
        for s in range(n):
            if scored[s] > 0:
                means[f"head_nll/{s + 1}"] = head_sum[s] / scored[s]
        if positions > 0:
            means["joint_nll"] = joint_sum / positions
        if targets > 0:
            means["joint_nll_per_target"] = per_target_sum / targets
        if batches > 0:
            means["aux_loss"] = aux_sum / batches
        if rows > 0:
            mean_usage = [u / rows for u in usage]
            for a in range(r):
                means[f"expert_usage/{a}"] = mean_usage[a]
                means[f"expert_responsibility/{a}"] = responsibility[a] / rows
            means["gate_entropy"] = entropy_sum / rows
            entropy = usage_entropy(mean_usage)
            if entropy is not None:
                means["usage_entropy"] = entropy
        if self.draft_vocab and sum(present) > 0:
            means["draft_coverage"] = sum(scored) / sum(present)
        return means


def expert_usage(metrics: dict[str, float | None], prefix: str = "") -> list[float]:
    """The ``expert_usage/{a}`` values of a record, in expert order (under ``prefix``)."""
    usage, a = [], 0
    while f"{prefix}expert_usage/{a}" in metrics:
        usage.append(metrics[f"{prefix}expert_usage/{a}"])
        a += 1
    return usage


@torch.no_grad()
def first_draft_hits(
    head: CPDMTPHead, hidden: torch.Tensor, ids: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> tuple[dict[int, int], int]:
    """How often x_{t+2} is among the head's top-k first drafts, given x_{t+1}.

    The first draft is what a decoder proposes after the verifier's token: the conditional
    q_2(v | x_{t+1}) = sum_a pi_a p_{2,a}(v), with pi the expert posterior given x_{t+1}
    (``CPDMTPHead.conditional``; a token-conditioned head reads x_{t+1} itself). With a draft
    vocabulary, a target outside it is a miss.

    Args:
        hidden: (N, T, d) trunk states of N blocks.
        ids: (N, T) the blocks' token ids (x_{t+1} = ids[:, t + 1]); negative ids are ignored.
        ks: the k of each top-k count.

    Returns:
        ({k: hits}, positions): hits per k over the positions t with x_{t+1} and x_{t+2} given.
    """
    if head.config.n_future < 2:
        raise ValueError("a head with n_future < 2 drafts nothing after x_{t+1}")
    h = hidden[:, :-2].reshape(-1, hidden.shape[-1])
    nxt, target = ids[:, 1:-1].reshape(-1), ids[:, 2:].reshape(-1)
    keep = (nxt >= 0) & (target >= 0)
    h, nxt, target = h[keep], nxt[keep].to(h.device), target[keep].to(h.device)
    hits = dict.fromkeys(ks, 0)
    if len(h) == 0:
        return hits, 0
    log_w, log_p = head.draft_state(h, next_token=nxt)
    position = head.draft_position(nxt)
    _, log_q = CPDMTPHead.conditional(log_w, log_p, position[:, None], (position >= 0)[:, None])
    ranked = log_q.topk(min(max(ks), log_q.shape[-1]), dim=-1).indices  # (M, k) positions
    if head.draft_ids is not None:
        ranked = head.draft_ids[ranked]
    for k in ks:
        hits[k] = int((ranked[:, :k] == target[:, None]).any(dim=-1).sum())
    return hits, len(h)
