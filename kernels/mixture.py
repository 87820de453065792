"""The mixture log-sum-exp: row log-probabilities and log w to the per-token loss and gamma.

For token t, with row log-probabilities lp[t, s, a] (0 where the target x_{t+s} is ignored
or past the sequence end, which marginalises that factor out),

    joint[t, a] = log w[t, a] + sum_s lp[t, s, a]
    nll[t]      = −logsumexp_a joint[t, a]
    gamma[t, a] = softmax_a joint[t, a]          (the posterior responsibility)

Backward, with the upstream gradient g_t of nll[t]:

    d log w[t, a]  = −g_t · gamma[t, a]
    d lp[t, s, a]  = −g_t · gamma[t, a]          for every s.

One program handles BLOCK_T tokens; r is padded to a power of two and masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cpd_mtp.kernels.config import configs_for


@triton.jit
def _mixture_forward_kernel(
    lp_ptr,
    logw_ptr,
    nll_ptr,
    gamma_ptr,
    N,
    S,
    R,
    stride_lt,
    stride_ls,
    stride_la,
    stride_wt,
    stride_wa,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_a = tl.arange(0, BLOCK_R)
    mask_t = offs_t < N
    mask = mask_t[:, None] & (offs_a < R)[None, :]
    offs_t64 = offs_t.to(tl.int64)
    joint = tl.load(
        logw_ptr + offs_t64[:, None] * stride_wt + offs_a[None, :] * stride_wa, mask=mask, other=0.0
    ).to(tl.float32)
    for s in range(0, S):
        joint += tl.load(
            lp_ptr + offs_t64[:, None] * stride_lt + s * stride_ls + offs_a[None, :] * stride_la,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
    joint = tl.where(mask, joint, float("-inf"))
    m = tl.max(joint, axis=1)
    m = tl.where(mask_t, m, 0.0)
    e = tl.exp(joint - m[:, None])
    total = tl.sum(e, axis=1)
    total = tl.where(mask_t, total, 1.0)
    lse = m + tl.log(total)
    tl.store(nll_ptr + offs_t, -lse, mask=mask_t)
    gamma = e / total[:, None]
    tl.store(gamma_ptr + offs_t64[:, None] * R + offs_a[None, :], gamma, mask=mask)


@triton.jit
def _mixture_backward_kernel(
    gamma_ptr,
    grad_ptr,
    dlp_ptr,
    dlogw_ptr,
    N,
    S,
    R,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_a = tl.arange(0, BLOCK_R)
    mask_t = offs_t < N
    mask = mask_t[:, None] & (offs_a < R)[None, :]
    offs_t64 = offs_t.to(tl.int64)
    gamma = tl.load(gamma_ptr + offs_t64[:, None] * R + offs_a[None, :], mask=mask, other=0.0)
    g = tl.load(grad_ptr + offs_t, mask=mask_t, other=0.0).to(tl.float32)
    d = -g[:, None] * gamma
    tl.store(dlogw_ptr + offs_t64[:, None] * R + offs_a[None, :], d, mask=mask)
    for s in range(0, S):
        tl.store(dlp_ptr + offs_t64[:, None] * (S * R) + s * R + offs_a[None, :], d, mask=mask)


def mixture_forward(row_lp: torch.Tensor, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and responsibilities.

    Args:
        row_lp: (N, n, r) row log-probabilities, any float dtype and strides.
        log_w: (N, r) log mixture weights, any float dtype and strides.

    Returns:
        nll: (N,) float32 −logsumexp_a(log w + sum_s lp).
        gamma: (N, r) float32 responsibilities.
    """
    n_tokens, n_future, rank = row_lp.shape
    nll = torch.empty(n_tokens, dtype=torch.float32, device=row_lp.device)
    gamma = torch.empty((n_tokens, rank), dtype=torch.float32, device=row_lp.device)
    if n_tokens == 0:
        return nll, gamma
    block_t = configs_for_any(row_lp.dtype)
    _mixture_forward_kernel[(triton.cdiv(n_tokens, block_t),)](
        row_lp,
        log_w,
        nll,
        gamma,
        n_tokens,
        n_future,
        rank,
        row_lp.stride(0),
        row_lp.stride(1),
        row_lp.stride(2),
        log_w.stride(0),
        log_w.stride(1),
        BLOCK_T=block_t,
        BLOCK_R=triton.next_power_of_2(rank),
    )
    return nll, gamma


def mixture_backward(
    gamma: torch.Tensor, grad_nll: torch.Tensor, n_future: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum_t g_t · nll[t].

    Args:
        gamma: (N, r) float32 responsibilities from ``mixture_forward``.
        grad_nll: (N,) upstream gradient g_t.
        n_future: n, the number of offsets.

    Returns:
        d_row_lp: (N, n, r) float32, and d_log_w: (N, r) float32.
    """
    n_tokens, rank = gamma.shape
    d_lp = torch.empty((n_tokens, n_future, rank), dtype=torch.float32, device=gamma.device)
    d_logw = torch.empty((n_tokens, rank), dtype=torch.float32, device=gamma.device)
    if n_tokens == 0:
        return d_lp, d_logw
    block_t = configs_for_any(gamma.dtype)
    _mixture_backward_kernel[(triton.cdiv(n_tokens, block_t),)](
        gamma.contiguous(),
        grad_nll.contiguous(),
        d_lp,
        d_logw,
        n_tokens,
        n_future,
        rank,
        BLOCK_T=block_t,
        BLOCK_R=triton.next_power_of_2(rank),
    )
    return d_lp, d_logw


def configs_for_any(dtype: torch.dtype) -> int:
    """BLOCK_T of the mixture kernels; they read any float dtype and compute in fp32."""
    return configs_for(
        dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
    ).mixture_block_t
