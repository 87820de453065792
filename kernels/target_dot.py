"""The indexed target dot: the target logit <u_m, W_U[x_m]> of every kept expert row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cpd_mtp.kernels.config import configs_for


@triton.jit
def _target_dot_kernel(
    u_ptr,
    w_ptr,
    rows_ptr,
    tgt_ptr,
    out_ptr,
    K,
    D,
    stride_um,
    stride_ud,
    stride_wv,
    stride_wd,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_M kept rows; out[k] = sum_d u[rows[k], d] * W[tgt[k], d] in fp32.
    offs_k = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    rows = tl.load(rows_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_k[:, None] & (offs_d < D)[None, :]
        a = tl.load(
            u_ptr + rows[:, None] * stride_um + offs_d[None, :] * stride_ud, mask=mask, other=0.0
        )
        b = tl.load(
            w_ptr + tgt[:, None] * stride_wv + offs_d[None, :] * stride_wd, mask=mask, other=0.0
        )
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(out_ptr + offs_k, acc, mask=mask_k)


def target_logits(
    u_rows: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Target logits of the kept rows.

    Args:
        u_rows: (M, d) expert states, any strides.
        weight: (V, d) unembedding, any strides.
        rows: (K,) int64 indices into the M rows, the rows whose target is kept.
        targets: (K,) int64 target ids of those rows, in [0, V).

    Returns:
        (K,) float32 logits <u_rows[rows[k]], weight[targets[k]]>.
    """
    n_kept = rows.shape[0]
    out = torch.empty(n_kept, dtype=torch.float32, device=u_rows.device)
    if n_kept == 0:
        return out
    block = configs_for(u_rows.dtype).target_dot
    grid = (triton.cdiv(n_kept, block.block_m),)
    _target_dot_kernel[grid](
        u_rows,
        weight,
        rows,
        targets,
        out,
        n_kept,
        u_rows.shape[1],
        u_rows.stride(0),
        u_rows.stride(1),
        weight.stride(0),
        weight.stride(1),
        BLOCK_M=block.block_m,
        BLOCK_D=block.block_d,
        num_warps=block.num_warps,
        num_stages=block.num_stages,
    )
    return out
