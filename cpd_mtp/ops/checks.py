"""Argument checks shared by every implementation of the mixture loss.

Bad input raises ``ValueError`` naming the argument, never a silent wrong answer.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int, name: str) -> None:
    """Raise unless every entry of ``targets`` is in [0, vocab_size) or equals ``ignore_index``."""
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {targets.dtype}")
    if targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"{name} holds {value}, outside [0, {vocab_size}) and not ignore_index={ignore_index}"
        )


def check_mixture_args(
    u: torch.Tensor,
    weight: torch.Tensor,
    log_w: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
) -> None:
    """Shapes, dtypes and label range of ``mixture_nll``'s arguments."""
    if not u.dtype.is_floating_point:
        raise ValueError(f"u must be a floating tensor, got dtype {u.dtype}")
    if u.dim() != 4:
        raise ValueError(f"u must have shape [N, n, r, d], got {tuple(u.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, d], got {tuple(weight.shape)}")
    if weight.shape[1] != u.shape[3]:
        raise ValueError(
            f"weight has d={weight.shape[1]} but u has d={u.shape[3]} "
            f"(u {tuple(u.shape)}, weight {tuple(weight.shape)})"
        )
    if weight.dtype != u.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from u dtype {u.dtype}")
    if weight.device != u.device:
        raise ValueError(f"weight is on {weight.device} but u is on {u.device}")
    n_tokens, n_future, rank, _ = u.shape
    if tuple(targets.shape) != (n_tokens, n_future):
        raise ValueError(
            f"targets must have shape [N, n] = {(n_tokens, n_future)}, got {tuple(targets.shape)}"
        )
    if log_w is not None:
        if not log_w.dtype.is_floating_point:
            raise ValueError(f"log_w must be a floating tensor, got dtype {log_w.dtype}")
        if tuple(log_w.shape) != (n_tokens, rank):
            raise ValueError(
                f"log_w must have shape [N, r] = {(n_tokens, rank)}, got {tuple(log_w.shape)}"
            )
    check_targets(targets, weight.shape[0], ignore_index, "targets")
