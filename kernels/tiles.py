"""Device helpers shared by the vocabulary kernels: one logit tile, recomputed on demand."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def logit_tile(
    u_ptr,
    w_ptr,
    rows,
    mask_m,
    offs_v,
    mask_v,
    D,
    stride_um,
    stride_ud,
    stride_wv,
    stride_wd,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(BLOCK_M, BLOCK_V) fp32 tile of u[rows] @ W[offs_v].T, looping over D in BLOCK_D steps.

    Masked rows, columns and features load as 0. ``DOT_FP32`` casts the operands to fp32
    before ``tl.dot`` (fp32 inputs, and always under the interpreter, whose 16-bit dot is wrong).
    """
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        a = tl.load(
            u_ptr + rows[:, None] * stride_um + offs_d[None, :] * stride_ud,
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_D)
        b = tl.load(
            w_ptr + offs_v[None, :] * stride_wv + offs_d[:, None] * stride_wd,
            mask=mask_d[:, None] & mask_v[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_V)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc
