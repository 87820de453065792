"""Load balancing of the mixture and the expert statistics that make collapse visible.

With P_a = mean_t w_{t,a} and f_a = mean_t stopgrad(gamma_{t,a}):

- ``switch``: r · sum_a f_a P_a, 1 at a uniform split, larger when usage concentrates;
- ``importance``: r · sum_a P_a², which is 1 + CV(P)²;
- ``none``: 0.

The router z-loss is mean_t (logsumexp_a z_{t,a})², for the gate logits z.
"""

from __future__ import annotations

import torch

from cpd_mtp.ops.checks import accumulation_dtype


def balance_loss(log_w: torch.Tensor, responsibilities: torch.Tensor, kind: str) -> torch.Tensor:
    """Load-balancing loss over the tokens given.

    Args:
        log_w: (N, r) log gate weights.
        responsibilities: (N, r) posterior gamma; gradients do not flow through it.
        kind: ``switch``, ``importance`` or ``none``.

    Returns:
        A scalar; 0 for ``none`` or when N = 0.
    """
    rank = log_w.shape[-1]
    if kind == "none" or log_w.shape[0] == 0:
        return log_w.new_zeros((), dtype=accumulation_dtype(log_w.dtype))
    acc = accumulation_dtype(log_w.dtype)
    mean_weight = log_w.to(acc).exp().mean(dim=0)  # P: (r,)
    if kind == "switch":
        mean_resp = responsibilities.detach().to(acc).mean(dim=0)  # f: (r,)
        return rank * (mean_resp * mean_weight).sum()
    if kind == "importance":
        return rank * mean_weight.square().sum()
    raise ValueError(f"balance must be 'switch', 'importance' or 'none', got {kind!r}")


def router_z_loss(gate_logits: torch.Tensor) -> torch.Tensor:
    """mean_t (logsumexp_a z_{t,a})² for gate logits (N, r); 0 when N = 0."""
    if gate_logits.shape[0] == 0:
        return gate_logits.new_zeros((), dtype=accumulation_dtype(gate_logits.dtype))
    return (
        torch.logsumexp(gate_logits.to(accumulation_dtype(gate_logits.dtype)), -1).square().mean()
    )


@torch.no_grad()
def expert_statistics(
    log_w: torch.Tensor, responsibilities: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Mean gate weight and mean responsibility per expert, and the mean gate entropy.

    Args:
        log_w: (N, r) log gate weights.
        responsibilities: (N, r) posterior gamma.

    Returns:
        ``expert_weight`` (r,), ``expert_responsibility`` (r,) and ``gate_entropy`` (scalar,
        nats), averaged over the N rows; all 0 when N = 0 (an empty mean is not NaN).
    """
    w = log_w.to(accumulation_dtype(log_w.dtype)).exp()
    rows = max(w.shape[0], 1)
    return {
        "expert_weight": w.sum(dim=0) / rows,
        "expert_responsibility": responsibilities.to(w.dtype).sum(dim=0) / rows,
        "gate_entropy": torch.special.entr(w).sum() / rows,
    }
