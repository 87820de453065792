"""The chunked loss: logits live one row-chunk at a time. O(chunk·V) extra memory.

Forward computes, per chunk of expert rows, the logits, their log-softmax at the target,
then frees the logits. Backward recomputes each chunk's logits and turns them into
``g · (onehot - softmax)`` with the per-row upstream gradient ``g`` (which the mixture step
makes ``-gamma``), accumulating dU and dW_U. Rows whose target is ignored are skipped in both.
"""

from __future__ import annotations

import torch

from cpd_mtp.ops.checks import accumulation_dtype

# Live fp32 buffers per row of a chunk: logits, (log-)softmax, the cast for the matmul.
_BUFFERS_PER_ROW = 3


def chunk_rows_for_budget(vocab_size: int, chunk_bytes: int) -> int:
    """Rows per chunk so that a chunk's fp32 work buffers fit in ``chunk_bytes``."""
    return max(1, chunk_bytes // (vocab_size * 4 * _BUFFERS_PER_ROW))


class _ChunkedRowLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, weight, targets, ignore_index, chunk_rows):
        n_tokens, n_future, rank, dim = u.shape
        u_rows = u.reshape(-1, dim)  # (M, d), M = N·n·r
        row_targets = targets[:, :, None].expand(-1, -1, rank).reshape(-1)  # (M,)
        rows = torch.nonzero(row_targets != ignore_index).squeeze(1)  # (K,) rows with a target
        picked_targets = row_targets[rows]
        acc = accumulation_dtype(u.dtype)
        out = torch.zeros(u_rows.shape[0], dtype=acc, device=u.device)
        for start in range(0, rows.shape[0], chunk_rows):
            idx = rows[start : start + chunk_rows]
            tgt = picked_targets[start : start + chunk_rows]
            logits = (u_rows.index_select(0, idx) @ weight.T).to(acc)  # (chunk, V)
            # log_softmax is one fused pass; torch.logsumexp takes several and is slower.
            out[idx] = torch.log_softmax(logits, dim=-1).gather(1, tgt[:, None]).squeeze(1)
            del logits
        ctx.save_for_backward(u, weight, rows, picked_targets)
        ctx.chunk_rows = chunk_rows
        return out.view(n_tokens, n_future, rank)

    @staticmethod
    def backward(ctx, grad_out):
        u, weight, rows, picked_targets = ctx.saved_tensors
        chunk_rows = ctx.chunk_rows
        dim = u.shape[-1]
        u_rows = u.reshape(-1, dim)
        acc = accumulation_dtype(u.dtype)
        row_grad = grad_out.reshape(-1).to(acc)[rows]  # (K,)
        need_u, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_u = torch.zeros_like(u_rows) if need_u else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, rows.shape[0], chunk_rows):
            idx = rows[start : start + chunk_rows]
            tgt = picked_targets[start : start + chunk_rows]
            x = u_rows.index_select(0, idx)  # (chunk, d)
            logits = (x @ weight.T).to(acc)  # (chunk, V)
            # d lp / d logits = onehot - softmax, so d logits = -g · softmax + g · onehot.
            g = row_grad[start : start + chunk_rows]
            grad_logits = torch.softmax(logits, dim=-1).mul_(-g[:, None])
            del logits
            grad_logits[torch.arange(idx.shape[0], device=idx.device), tgt] += g
            grad_logits = grad_logits.to(weight.dtype)
            if need_u:
                grad_u[idx] = grad_logits @ weight
            if need_w and grad_w.dtype == x.dtype:
                grad_w.addmm_(grad_logits.T, x)
            elif need_w:
                grad_w += (grad_logits.T @ x).to(acc)
            del grad_logits
        grad_u = grad_u.view_as(u) if need_u else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_u, grad_w, None, None, None


def row_logprobs_chunked(
    u: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_bytes: int = 64 * 2**20,
) -> torch.Tensor:
    """log p_{s,a}(x_{t+s}) for every row without materialising all logits.

    Args:
        u: expert states, (N, n, r, d).
        weight: shared unembedding W_U, (V, d), same dtype as ``u``.
        targets: (N, n) token ids or ``ignore_index``.
        chunk_bytes: budget of one chunk's fp32 logit buffers; rows per chunk follow from it.

    Returns:
        (N, n, r) float32 (float64 for float64 input) log-probabilities, 0 where the target is ignored.
    """
    chunk_rows = chunk_rows_for_budget(weight.shape[0], chunk_bytes)
    return _ChunkedRowLogprobs.apply(u, weight, targets, ignore_index, chunk_rows)
