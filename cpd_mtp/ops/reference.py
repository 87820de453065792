"""The reference loss: materialise every logit. O(N·n·r·V) memory; the test oracle."""

from __future__ import annotations

import torch

from cpd_mtp.ops.checks import accumulation_dtype


def row_logprobs_reference(
    u: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """log p_{s,a}(x_{t+s}) for every row, 0 where the target is ignored.

    Args:
        u: expert states, (N, n, r, d).
        weight: shared unembedding W_U, (V, d).
        targets: (N, n) token ids or ``ignore_index``.

    Returns:
        (N, n, r) float32 (float64 for float64 input) log-probabilities.
    """
    logits = torch.einsum("tsad,vd->tsav", u, weight).to(
        accumulation_dtype(u.dtype)
    )  # (N, n, r, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index  # (N, n)
    index = torch.where(valid, targets, 0)[:, :, None, None].expand(-1, -1, u.shape[2], 1)
    picked = log_probs.gather(-1, index).squeeze(-1)  # (N, n, r)
    return picked * valid[:, :, None]
