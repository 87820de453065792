"""Choosing an implementation and calling it, on inputs that were already validated.

``row_logprobs_unchecked`` is the internal entry: ``cpd_mtp.ops.row_logprobs`` and
``mixture_nll`` call it after their checks, and the head calls it after its own single
label check, so a training step validates its labels once.
"""

from __future__ import annotations

import os

import torch

from cpd_mtp.ops.chunked import row_logprobs_chunked
from cpd_mtp.ops.reference import row_logprobs_reference

IMPLS = ("auto", "reference", "chunked", "triton")
"""The values ``impl`` accepts: ``auto``, ``reference``, ``chunked`` and ``triton``."""


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` stands for on ``device``; raises for an impossible pair."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "chunked"
    if impl == "triton":
        if not _triton_available():
            raise ValueError("impl='triton' needs the triton package, which is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"impl='triton' needs CUDA tensors, got {device.type}; on CPU set "
                "TRITON_INTERPRET=1 before importing triton, or use impl='chunked'"
            )
    return impl


def row_logprobs_unchecked(
    u: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int,
    impl: str,
    chunk_bytes: int,
    grad_filter: bool | None = None,
) -> torch.Tensor:
    """``row_logprobs`` without the argument checks: the caller has made them.

    Args:
        u: (N, n, r, d) expert states, already in the autocast dtype where one applies.
        weight: (V, d) W_U, same dtype and device as ``u``.
        targets: (N, n) int64 ids in [0, V) or ``ignore_index``.
        ignore_index: the id of a missing target.
        impl: one of ``IMPLS``.
        chunk_bytes: memory budget of one chunk for ``chunked``.
        grad_filter: gradient filtering in the ``triton`` backward; None reads
            ``CPD_MTP_GRAD_FILTER`` (default off). Ignored by the other implementations.

    Returns:
        (N, n, r) float32 (float64 for float64 input); 0 where the target is ignored.
    """
    impl = resolve_impl(impl, u.device)
    if impl == "reference":
        return row_logprobs_reference(u, weight, targets, ignore_index)
    if impl == "chunked":
        return row_logprobs_chunked(u, weight, targets, ignore_index, chunk_bytes)
    from cpd_mtp.kernels.config import SUPPORTED_DTYPES
    from cpd_mtp.kernels.ops import row_logprobs_triton

    if u.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"impl='triton' takes bfloat16, float16 or float32 u and weight, got {u.dtype}; "
            "use impl='chunked' or impl='reference' for float64"
        )
    return row_logprobs_triton(u, weight, targets, ignore_index, grad_filter=grad_filter)
