"""Triton kernels for the fused CP-MTP loss, installed as ``cpd_mtp.kernels``.

See docs/kernels.md for the algorithm, memory model, dtypes and gradient filtering.
"""

from cpd_mtp.kernels.ops import (
    mixture_logsumexp_triton,
    mixture_nll_triton,
    row_logprobs_triton,
)

__all__ = ["mixture_logsumexp_triton", "mixture_nll_triton", "row_logprobs_triton"]
