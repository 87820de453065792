"""The mixture step: per-row log-probabilities and log w to the per-token loss.

It works on (N, n, r) numbers only, so plain torch autograd gives the responsibilities
gamma as the gradient weights of every row.
"""

from __future__ import annotations

import torch

from cpd_mtp.ops.checks import accumulation_dtype


def mixture_logsumexp(
    row_logprobs: torch.Tensor, log_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the observed targets and the responsibilities.

    Args:
        row_logprobs: (N, n, r) log p_{s,a}(x_{t+s}); 0 where the target is missing, which
            marginalises it out because each p_{s,a} sums to one.
        log_w: (N, r) log mixture weights.

    Returns:
        nll: (N,) float32, -l_t = -logsumexp_a(log w_a + sum_s log p_{s,a}); 0 for a token
            with no target when log_w is normalised.
        gamma: (N, r) float32 posterior responsibilities softmax_a(...), detached.
    """
    acc = accumulation_dtype(row_logprobs.dtype)
    joint = log_w.to(acc) + row_logprobs.to(acc).sum(dim=1)  # (N, r)
    nll = -torch.logsumexp(joint, dim=-1)
    gamma = torch.softmax(joint.detach(), dim=-1)
    return nll, gamma
