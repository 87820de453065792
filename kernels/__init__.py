"""Triton kernels for the fused CP-MTP loss, installed as ``cpd_mtp.kernels``.

See docs/kernels.md for the algorithm, memory model, dtypes and gradient filtering.
"""

from cpd_mtp.kernels.ops import row_logprobs_triton

__all__ = ["row_logprobs_triton"]
