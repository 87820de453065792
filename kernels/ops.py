"""Autograd functions over the Triton kernels: the public API of ``cpd_mtp.kernels``.

- ``row_logprobs_triton``: (N, n, r) row log-probabilities log p_{s,a}(x_{t+s}).
- ``mixture_logsumexp_triton``: row log-probabilities and log w to (nll, gamma).
- ``mixture_nll_triton``: the two composed, the fused CP-MTP loss −l_t per token.

Inputs may be bf16, fp16 or fp32 (fp32 accumulation throughout) with any strides. Under an
enabled autocast for the tensors' device, u and W_U are cast to the autocast dtype first,
as ``F.linear`` would be; the mixture step always runs in fp32.
"""

from __future__ import annotations

import torch
from torch.amp import custom_bwd, custom_fwd

from cpd_mtp.kernels.backward import row_lse_backward
from cpd_mtp.kernels.config import SUPPORTED_DTYPES, grad_filter_setting
from cpd_mtp.kernels.lse_forward import row_lse_forward
from cpd_mtp.kernels.mixture import mixture_backward, mixture_forward
from cpd_mtp.kernels.target_dot import target_logits
from cpd_mtp.ops.checks import autocast_operands, check_mixture_args


class _RowLogprobs(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, u, weight, targets, ignore_index, grad_filter, filter_eps):
        n_tokens, n_future, rank, dim = u.shape
        u_rows = u.reshape(-1, dim)  # (M, d); a view when u's layout allows it
        row_targets = targets[:, :, None].expand(-1, -1, rank).reshape(-1)  # (M,)
        rows = torch.nonzero(row_targets != ignore_index).squeeze(1)  # (K,) int64 kept rows
        picked = row_targets[rows].to(torch.int64).contiguous()  # (K,)
        out = torch.zeros(u_rows.shape[0], dtype=torch.float32, device=u.device)
        tgt_logits = target_logits(u_rows, weight, rows, picked)
        lse = row_lse_forward(u_rows, weight, rows, tgt_logits, out)
        ctx.save_for_backward(u_rows, weight, rows, picked, lse)
        ctx.u_shape = u.shape
        ctx.filter = (grad_filter, filter_eps)
        return out.view(n_tokens, n_future, rank)

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        u_rows, weight, rows, picked, lse = ctx.saved_tensors
        need_du, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        coef = (-grad_out.reshape(-1).to(torch.float32))[rows].contiguous()  # (K,)
        grad_filter, filter_eps = ctx.filter
        grad_u, grad_w = row_lse_backward(
            u_rows,
            weight,
            rows,
            picked,
            lse,
            coef,
            need_du=need_du,
            need_dw=need_dw,
            grad_filter=grad_filter,
            filter_eps=filter_eps,
        )
        if grad_u is not None:
            grad_u = grad_u.view(ctx.u_shape)
        return grad_u, grad_w, None, None, None, None


class _MixtureLogsumexp(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, row_lp, log_w):
        nll, gamma = mixture_forward(row_lp, log_w)
        ctx.save_for_backward(gamma)
        ctx.n_future = row_lp.shape[1]
        ctx.dtypes = (row_lp.dtype, log_w.dtype)
        ctx.mark_non_differentiable(gamma)
        return nll, gamma

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_nll, grad_gamma):
        (gamma,) = ctx.saved_tensors
        d_lp, d_logw = mixture_backward(gamma, grad_nll, ctx.n_future)
        lp_dtype, logw_dtype = ctx.dtypes
        return d_lp.to(lp_dtype), d_logw.to(logw_dtype)


def _check_dtype(u: torch.Tensor) -> None:
    if u.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"the triton kernels take bfloat16, float16 or float32 u and weight, got {u.dtype}; "
            "use impl='chunked' or impl='reference' for float64"
        )


def row_logprobs_triton(
    u: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    grad_filter: bool | None = None,
    filter_eps: float | None = None,
) -> torch.Tensor:
    """log p_{s,a}(x_{t+s}) for every expert row, never materialising the logits.

    Args:
        u: expert states, (N, n, r, d), bf16 / fp16 / fp32, any strides.
        weight: shared unembedding W_U, (V, d), same dtype and device.
        targets: (N, n) integer token ids or ``ignore_index``.
        ignore_index: the id of a missing target.
        grad_filter: skip backward vocabulary tiles whose every |softmax − onehot| is below
            ``filter_eps``; None reads ``CPD_MTP_GRAD_FILTER`` (default on).
        filter_eps: the threshold; None reads ``CPD_MTP_GRAD_FILTER_EPS`` or the dtype
            default (2^-12 for 16-bit inputs, 2^-24 for fp32).

    Returns:
        (N, n, r) float32, 0 where the target is ignored. Differentiable in u and weight.
    """
    # The autocast cast comes first, so a bf16 u with an fp32 W_U is accepted under autocast.
    u, weight = autocast_operands(u, weight)
    check_mixture_args(u, weight, None, targets, ignore_index)
    targets = targets.to(torch.int64)  # narrow label dtypes would wrap ignore_index
    _check_dtype(u)
    enabled, eps = grad_filter_setting(u.dtype, grad_filter, filter_eps)
    return _RowLogprobs.apply(u, weight, targets, ignore_index, enabled, eps)


def mixture_logsumexp_triton(
    row_lp: torch.Tensor, log_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixture step in one kernel: per-token loss and responsibilities.

    Args:
        row_lp: (N, n, r) row log-probabilities, 0 for a missing target.
        log_w: (N, r) log mixture weights.

    Returns:
        nll: (N,) float32 −logsumexp_a(log w_a + sum_s row_lp[:, s, a]), differentiable in
            row_lp and log_w.
        gamma: (N, r) float32 responsibilities, not differentiable.
    """
    if (
        row_lp.dim() != 3
        or log_w.dim() != 2
        or tuple(log_w.shape)
        != (
            row_lp.shape[0],
            row_lp.shape[2],
        )
    ):
        raise ValueError(
            f"row_lp must be [N, n, r] and log_w [N, r], got {tuple(row_lp.shape)} "
            f"and {tuple(log_w.shape)}"
        )
    return _MixtureLogsumexp.apply(row_lp, log_w)


def mixture_nll_triton(
    u: torch.Tensor,
    weight: torch.Tensor,
    log_w: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    grad_filter: bool | None = None,
    filter_eps: float | None = None,
) -> torch.Tensor:
    """The fused CP-MTP loss: −l_t per token, O(N·n·r) memory beyond the inputs.

    Args:
        u: expert states, (N, n, r, d), bf16 / fp16 / fp32, any strides.
        weight: shared unembedding W_U, (V, d), same dtype and device.
        log_w: (N, r) log mixture weights.
        targets: (N, n) integer token ids or ``ignore_index``.
        ignore_index: the id of a missing target.
        grad_filter: gradient filtering on or off, as in ``row_logprobs_triton``.
        filter_eps: the filtering threshold, as in ``row_logprobs_triton``.

    Returns:
        (N,) float32 −l_t; differentiable in u, weight and log_w. The vocabulary gradient of
        row (t, s, a) is gamma_{t,a} · g_t · (softmax − onehot).
    """
    u, weight = autocast_operands(u, weight)
    check_mixture_args(u, weight, log_w, targets, ignore_index)
    row_lp = row_logprobs_triton(
        u, weight, targets, ignore_index, grad_filter=grad_filter, filter_eps=filter_eps
    )
    nll, _ = mixture_logsumexp_triton(row_lp, log_w)
    return nll
