"""The autograd function over the Triton kernels: the public API of ``cpd_mtp.kernels``.

``row_logprobs_triton`` gives the (N, n, r) row log-probabilities log p_{s,a}(x_{t+s})
without materialising a logit. The mixture step on those N·n·r numbers is plain torch
(``cpd_mtp.ops.mixture_logsumexp``); ``cpd_mtp.ops.mixture_nll(..., impl="triton")`` composes
the two.

The kernels trust their inputs: ``cpd_mtp.ops`` validates shapes, dtypes and label values
and applies the autocast cast before calling them. Inputs may be bf16, fp16 or fp32 (fp32
accumulation throughout) with any strides.
"""

from __future__ import annotations

import torch
from torch.amp import custom_bwd, custom_fwd

from cpd_mtp.kernels.backward import row_lse_backward
from cpd_mtp.kernels.config import grad_filter_setting
from cpd_mtp.kernels.lse_forward import row_lse_forward
from cpd_mtp.kernels.target_dot import target_logits


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
        # A tile is skipped when every entry is below eps / V: a row's V entries then skip
        # less than eps of probability mass in all (the bound in docs/kernels.md).
        ctx.filter = (grad_filter, filter_eps / weight.shape[0])
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

    Unchecked: use ``cpd_mtp.ops.row_logprobs(..., impl="triton")`` for validated input.

    Args:
        u: expert states, (N, n, r, d), bf16 / fp16 / fp32, any strides.
        weight: shared unembedding W_U, (V, d), same dtype and device.
        targets: (N, n) integer token ids in [0, V) or ``ignore_index``.
        ignore_index: the id of a missing target.
        grad_filter: skip backward vocabulary tiles whose every |softmax − onehot| is below
            ``filter_eps / V``; None reads ``CPD_MTP_GRAD_FILTER`` (default off).
        filter_eps: the mass budget of a row: its skipped entries hold less probability than
            this in all. None reads ``CPD_MTP_GRAD_FILTER_EPS`` or the dtype default (2^-12
            for 16-bit inputs, 2^-24 for fp32).

    Returns:
        (N, n, r) float32, 0 where the target is ignored. Differentiable in u and weight; the
        vocabulary gradient of row (t, s, a) is c · (softmax − onehot) with c = −dL/d out.
    """
    enabled, eps = grad_filter_setting(u.dtype, grad_filter, filter_eps)
    return _RowLogprobs.apply(u, weight, targets, ignore_index, enabled, eps)
