"""Backward of the row log-probabilities: recompute logit tiles, accumulate dU and dW_U.

With the per-row upstream gradient g_k = d loss / d log p_k of kept row k, the gradient of
the loss with respect to that row's logits is

    d_k = c_k · (softmax(logits_k) − onehot(x_k)),    c_k = −g_k,

(for the mixture loss c_k = gamma_{t,a} · g_t, the responsibility times the token's upstream
gradient). One program owns a (BLOCK_M rows × BLOCK_V vocabulary) tile: it recomputes the
logits (fp32 accumulation), forms d from the saved log-sum-exp, then adds
d @ W[tile] into dU and dᵀ @ u[rows] into dW_U, both fp32 accumulators updated with atomics.

**Gradient filtering** (opt-in). When every |softmax − onehot| of a tile is below the
threshold tau (every probability in it is below tau and no row's target lies in it, the rule
of Cut Cross-Entropy) the tile's contribution is skipped (two of the three GEMMs of the tile are
saved). The test is on the unscaled difference, so it does not depend on the upstream
gradient's scale (a mean over many positions, gradient accumulation). The caller sets
tau = eps / V, so the entries a row skips hold less than eps of probability in all, and

    |ΔdU[k, j]| ≤ |c_k|·eps·max_v |W[v, j]|,    |ΔdW[v, j]| ≤ (eps / V)·Σ_k |c_k|·|u[rows[k], j]|.

(A threshold of eps per entry would bound a row's loss by eps·V instead: near the uniform
distribution, where every p ≈ 1/V < eps, it skips the whole softmax part of the gradient.)
In a peaked softmax most tiles hold only tiny probabilities, which is where the saving lies.
Filtering is off by default; ``grad_filter=True`` or ``CPD_MTP_GRAD_FILTER=1`` turns it on.

The fp32 dU scratch holds at most ``config.DU_SCRATCH_BYTES``; longer row lists are processed
in several launches, each cast back to the input dtype once done. dW_U stays fp32 (V, d)
until the end, then is cast back as well.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cpd_mtp.kernels import config
from cpd_mtp.kernels.config import configs_for
from cpd_mtp.kernels.launch import launch_tiled
from cpd_mtp.kernels.lse_forward import dot_settings
from cpd_mtp.kernels.tiles import logit_tile


@triton.jit
def _lse_backward_kernel(
    u_ptr,
    w_ptr,
    rows_ptr,
    tgt_ptr,
    lse_ptr,
    coef_ptr,
    du_ptr,
    dw_ptr,
    K,
    V,
    D,
    stride_um,
    stride_ud,
    stride_wv,
    stride_wd,
    filter_eps,
    FILTER: tl.constexpr,
    NEED_DU: tl.constexpr,
    NEED_DW: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    mask_k = offs_k < K
    mask_v = offs_v < V
    rows = tl.load(rows_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + offs_k, mask=mask_k, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + offs_k, mask=mask_k, other=0.0)
    coef = tl.load(coef_ptr + offs_k, mask=mask_k, other=0.0)
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
    probs = tl.exp(logits - lse[:, None])
    onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
    live = mask_k[:, None] & mask_v[None, :]
    diff = tl.where(live, probs - onehot, 0.0)  # (BLOCK_M, BLOCK_V) fp32 softmax − onehot
    grad = coef[:, None] * diff
    keep = True
    if FILTER:
        # Decide on the unscaled |p − onehot|: the upstream scale (1 / positions, 1 / accumulation
        # steps) would push every tile under eps. Rows with c_k = 0 add nothing either way.
        keep = tl.max(tl.max(tl.where(coef[:, None] != 0.0, tl.abs(diff), 0.0), axis=1), axis=0)
        keep = keep >= filter_eps
    if keep:
        grad_op = grad if DOT_FP32 else grad.to(u_ptr.dtype.element_ty)
        offs_k64 = offs_k.to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            if NEED_DU:
                w = tl.load(
                    w_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                    mask=mask_v[:, None] & mask_d[None, :],
                    other=0.0,
                )  # (BLOCK_V, BLOCK_D)
                if DOT_FP32:
                    w = w.to(tl.float32)
                du = tl.dot(grad_op, w, input_precision=PRECISION)  # (BLOCK_M, BLOCK_D)
                tl.atomic_add(
                    du_ptr + offs_k64[:, None] * D + offs_d[None, :],
                    du,
                    mask=mask_k[:, None] & mask_d[None, :],
                )
            if NEED_DW:
                x = tl.load(
                    u_ptr + rows[:, None] * stride_um + offs_d[None, :] * stride_ud,
                    mask=mask_k[:, None] & mask_d[None, :],
                    other=0.0,
                )  # (BLOCK_M, BLOCK_D)
                if DOT_FP32:
                    x = x.to(tl.float32)
                dw = tl.dot(tl.trans(grad_op), x, input_precision=PRECISION)  # (BLOCK_V, BLOCK_D)
                tl.atomic_add(
                    dw_ptr + offs_v[:, None] * D + offs_d[None, :],
                    dw,
                    mask=mask_v[:, None] & mask_d[None, :],
                )


def row_lse_backward(
    u_rows: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    *,
    need_du: bool,
    need_dw: bool,
    grad_filter: bool,
    filter_eps: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dU and dW_U of sum_k c_k · lse-CE of the kept rows (see the module docstring).

    Args:
        u_rows: (M, d) expert states, any strides.
        weight: (V, d) unembedding, any strides, same dtype.
        rows: (K,) int64 kept rows.
        targets: (K,) int64 their targets.
        lse: (K,) float32 log-sum-exp saved by the forward.
        coef: (K,) float32 c_k, the weight of each row's softmax − onehot.
        need_du / need_dw: which gradients to compute.
        grad_filter / filter_eps: skip tiles whose every |softmax − onehot| < filter_eps (the
            per-entry threshold tau; the caller passes its mass budget divided by V).

    Returns:
        dU (M, d) and dW_U (V, d) in the input dtype (rows not kept get 0), or None
        where not needed.
    """
    n_rows, dim = u_rows.shape
    vocab = weight.shape[0]
    dtype = u_rows.dtype
    device = u_rows.device
    grad_u = torch.zeros((n_rows, dim), dtype=dtype, device=device) if need_du else None
    grad_w32 = torch.zeros((vocab, dim), dtype=torch.float32, device=device) if need_dw else None
    n_kept = rows.shape[0]
    if n_kept == 0 or not (need_du or need_dw):
        return grad_u, (grad_w32.to(weight.dtype) if need_dw else None)
    dot_fp32, precision = dot_settings(dtype)
    block = configs_for(dtype).backward
    chunk = n_kept
    if need_du:
        chunk = max(1, min(n_kept, config.DU_SCRATCH_BYTES // (dim * 4)))
    dummy = torch.empty(1, dtype=torch.float32, device=device)
    for start in range(0, n_kept, chunk):
        stop = min(n_kept, start + chunk)
        du32 = (
            torch.zeros((stop - start, dim), dtype=torch.float32, device=device)
            if need_du
            else dummy
        )
        kwargs = dict(
            u_ptr=u_rows,
            w_ptr=weight,
            rows_ptr=rows[start:stop],
            tgt_ptr=targets[start:stop],
            lse_ptr=lse[start:stop],
            coef_ptr=coef[start:stop],
            du_ptr=du32,
            dw_ptr=grad_w32 if need_dw else dummy,
            K=stop - start,
            V=vocab,
            D=dim,
            stride_um=u_rows.stride(0),
            stride_ud=u_rows.stride(1),
            stride_wv=weight.stride(0),
            stride_wd=weight.stride(1),
            filter_eps=filter_eps,
            FILTER=grad_filter,
            NEED_DU=need_du,
            NEED_DW=need_dw,
            DOT_FP32=dot_fp32,
            PRECISION=precision,
        )
        n_chunk = stop - start
        launch_tiled(
            _lse_backward_kernel,
            lambda meta, n_chunk=n_chunk: (
                triton.cdiv(n_chunk, meta["BLOCK_M"]),
                triton.cdiv(vocab, meta["BLOCK_V"]),
            ),
            kwargs,
            block,
            dtype,
            reset_to_zero=("du_ptr", "dw_ptr"),
        )
        if need_du:
            grad_u.index_copy_(0, rows[start:stop], du32.to(dtype))
    return grad_u, (grad_w32.to(weight.dtype) if need_dw else None)
