"""Forward: blockwise vocabulary log-sum-exp of every kept expert row, never storing logits.

For the K kept rows (target not ignored) of u viewed as (M, d), M = N·n·r, one program
owns BLOCK_M rows and sweeps the vocabulary in BLOCK_V tiles. Each tile of logits is
computed in fp32 registers (looping over d in BLOCK_D steps) and folded into a running
max and sum of exponentials (the online log-sum-exp), so memory beyond the inputs is O(K).
The program then writes the row log-probability ``target_logit - lse`` into the (M,) output
at the row's own index, and ``lse`` for the backward pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cpd_mtp.kernels.config import configs_for, interpreter_active
from cpd_mtp.kernels.launch import launch_tiled
from cpd_mtp.kernels.tiles import logit_tile


@triton.jit
def _lse_forward_kernel(
    u_ptr,
    w_ptr,
    rows_ptr,
    tgt_logit_ptr,
    lse_ptr,
    out_ptr,
    K,
    V,
    D,
    stride_um,
    stride_ud,
    stride_wv,
    stride_wd,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    rows = tl.load(rows_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < V
        logits = logit_tile(
            u_ptr,
            w_ptr,
            rows,
            mask_k,
            offs_v,
            mask_v,
            D,
            stride_um,
            stride_ud,
            stride_wv,
            stride_wd,
            BLOCK_M,
            BLOCK_V,
            BLOCK_D,
            DOT_FP32,
            PRECISION,
        )
        logits = tl.where(mask_v[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(s_i)
    tl.store(lse_ptr + offs_k, lse, mask=mask_k)
    tgt_logit = tl.load(tgt_logit_ptr + offs_k, mask=mask_k, other=0.0)
    tl.store(out_ptr + rows, tgt_logit - lse, mask=mask_k)


def dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, PRECISION) for input ``dtype``: fp32 inputs use exact fp32 ("ieee") dots,
    16-bit inputs use tensor-core dots on GPU, and the interpreter always casts to fp32."""
    if dtype == torch.float32 or interpreter_active():
        return True, "ieee"
    return False, "tf32"


def row_lse_forward(
    u_rows: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    tgt_logits: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Log-sum-exp over the vocabulary of the kept rows; writes their log-probabilities.

    Args:
        u_rows: (M, d) expert states, any strides, bf16 / fp16 / fp32.
        weight: (V, d) unembedding, any strides, same dtype.
        rows: (K,) int64 indices of the kept rows into the M rows.
        tgt_logits: (K,) float32 target logits of those rows (``target_logits``).
        out: (M,) float32, written in place at ``rows`` with ``tgt_logits - lse``.

    Returns:
        (K,) float32 log-sum-exp of each kept row's logits.
    """
    n_kept = rows.shape[0]
    lse = torch.empty(n_kept, dtype=torch.float32, device=u_rows.device)
    if n_kept == 0:
        return lse
    dot_fp32, precision = dot_settings(u_rows.dtype)
    kwargs = dict(
        u_ptr=u_rows,
        w_ptr=weight,
        rows_ptr=rows,
        tgt_logit_ptr=tgt_logits,
        lse_ptr=lse,
        out_ptr=out,
        K=n_kept,
        V=weight.shape[0],
        D=weight.shape[1],
        stride_um=u_rows.stride(0),
        stride_ud=u_rows.stride(1),
        stride_wv=weight.stride(0),
        stride_wd=weight.stride(1),
        DOT_FP32=dot_fp32,
        PRECISION=precision,
    )
    launch_tiled(
        _lse_forward_kernel,
        lambda meta: (triton.cdiv(n_kept, meta["BLOCK_M"]),),
        kwargs,
        configs_for(u_rows.dtype).forward,
        u_rows.dtype,
    )
    return lse
