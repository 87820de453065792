"""The CP-MTP mixture loss, one contract with several implementations.

``mixture_nll(u, weight, log_w, targets)`` returns -l_t per token, where

    l_t = logsumexp_a( log w_{t,a} + sum_{s in S_t} log softmax(W_U u_{t,s,a})[x_{t+s}] )

and S_t holds the offsets whose target is not ``ignore_index``. Every implementation computes
the (N, n, r) row log-probabilities log softmax(W_U u_{t,s,a})[x_{t+s}]; the mixture step on
those N·n·r numbers is plain torch (``mixture_logsumexp``). Implementations of the rows:

- ``reference``: materialises the (N, n, r, V) logits; the oracle for tests.
- ``chunked``: an ``autograd.Function`` that keeps O(chunk·V) logits alive; any device.
- ``triton``: fused Triton kernels in ``cpd_mtp.kernels``; CUDA (or ``TRITON_INTERPRET=1``).
- ``auto``: ``triton`` on CUDA tensors, ``chunked`` elsewhere.

The public functions validate their arguments once (see ``cpd_mtp.ops.checks`` for what a
bad label does on CUDA) and apply the autocast cast; the implementations trust their inputs.
"""

from __future__ import annotations

import torch

from cpd_mtp.ops.checks import autocast_operands, check_mixture_args, check_targets
from cpd_mtp.ops.dispatch import IMPLS, resolve_impl, row_logprobs_unchecked
from cpd_mtp.ops.mixture import mixture_logsumexp

__all__ = [
    "IMPLS",
    "check_targets",
    "mixture_logsumexp",
    "mixture_nll",
    "resolve_impl",
    "row_logprobs",
]


def row_logprobs(
    u: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_bytes: int = 64 * 2**20,
    grad_filter: bool | None = None,
) -> torch.Tensor:
    """log p_{s,a}(x_{t+s}) per expert row, differentiable in ``u`` and ``weight``.

    Args:
        u: expert states, (N, n, r, d).
        weight: shared unembedding W_U, (V, d).
        targets: (N, n) token ids or ``ignore_index``.
        ignore_index: the id of a missing target.
        impl: ``auto``, ``reference``, ``chunked`` or ``triton``.
        chunk_bytes: memory budget of one chunk for ``chunked``.
        grad_filter: opt in to gradient filtering in the ``triton`` backward (see
            ``docs/kernels.md``); None reads ``CPD_MTP_GRAD_FILTER`` (default off).

    Under an enabled autocast for u's device, u and W_U are first cast to the autocast dtype,
    as ``F.linear`` would be (float64 is left alone).

    Returns:
        (N, n, r) float32; 0 where the target is ignored (the factor is marginalised out).
    """
    return _checked_row_logprobs(
        u, weight, None, targets, ignore_index, impl, chunk_bytes, grad_filter
    )


def _checked_row_logprobs(
    u: torch.Tensor,
    weight: torch.Tensor,
    log_w: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    impl: str,
    chunk_bytes: int,
    grad_filter: bool | None,
) -> torch.Tensor:
    """The public entries' one validation (and autocast cast), then the rows."""
    if grad_filter is not None and not isinstance(grad_filter, bool):
        raise ValueError(f"grad_filter must be True, False or None, got {grad_filter!r}")
    u, weight = autocast_operands(u, weight)
    check_mixture_args(u, weight, log_w, targets, ignore_index)
    targets = targets.to(torch.int64)  # narrow label dtypes would wrap ignore_index
    return row_logprobs_unchecked(
        u,
        weight,
        targets,
        ignore_index=ignore_index,
        impl=impl,
        chunk_bytes=chunk_bytes,
        grad_filter=grad_filter,
    )


def mixture_nll(
    u: torch.Tensor,
    weight: torch.Tensor,
    log_w: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_bytes: int = 64 * 2**20,
    grad_filter: bool | None = None,
) -> torch.Tensor:
    """Per-token negative log-likelihood -l_t of the observed future tokens.

    Args:
        u: expert states u_{t,s,a}, (N, n, r, d).
        weight: shared unembedding W_U, (V, d), same dtype (after the autocast cast) and
            device as ``u``.
        log_w: log mixture weights, (N, r); normalised over r.
        targets: (N, n) ids of x_{t+1..t+n}; ``ignore_index`` marks a missing target.
        ignore_index: the id of a missing target.
        impl: ``auto``, ``reference``, ``chunked`` or ``triton``.
        chunk_bytes: memory budget of one chunk for ``chunked``.
        grad_filter: opt in to gradient filtering in the ``triton`` backward (see
            ``docs/kernels.md``); None reads ``CPD_MTP_GRAD_FILTER`` (default off).

    Returns:
        (N,) float32. A token with no target gets 0. Gradients flow to ``u``, ``weight``
        and ``log_w``. Under an enabled autocast for u's device, u and W_U are first cast to
        the autocast dtype, as ``F.linear`` would be; gradients come back in their own dtype.
    """
    lp = _checked_row_logprobs(
        u, weight, log_w, targets, ignore_index, impl, chunk_bytes, grad_filter
    )
    nll, _ = mixture_logsumexp(lp, log_w)
    return nll
