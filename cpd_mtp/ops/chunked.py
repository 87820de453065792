"""The chunked loss: logits live one row-chunk at a time. O(chunk·V) extra memory.

Forward computes, per chunk of expert rows, the logits and their log-softmax at the target,
then frees the logits. Backward recomputes each chunk's logits and turns them into
``g · (onehot - softmax)`` with the per-row upstream gradient ``g`` (which the mixture step
makes ``-gamma``), accumulating dU and dW_U. Rows whose target is ignored are skipped in both.

Inputs whose dtype is the accumulation dtype (float32, float64) take a fast path: one
preallocated logit buffer per chunk (so a chunk has three times the rows of the budget's
three-buffer count), row slices instead of ``index_select`` copies when every target is kept,
the row logsumexp kept from forward so that backward's softmax is one ``addmm`` (logits
minus logsumexp) and one in-place ``exp_``, the one-hot subtracted in place, and ``g`` applied
to the (chunk, d) operands instead of the (chunk, V) buffer. Lower-precision inputs (bf16,
fp16) keep the casting path that computes the logits in their dtype and accumulates in fp32.

A frozen W_U (heads-only training: only u needs a gradient) takes one pass over V, not two:
d lp / d u = W_U[x] - E_p[W_U], and forward, which has the softmax p at hand, computes
E_p[W_U] = p W_U for each kept row. Backward is then g · (W_U[x] - E_p[W_U]): no logits are
recomputed, and two (chunk, V) x (V, d) products per row become one.
"""

from __future__ import annotations

import torch

from cpd_mtp.ops.checks import accumulation_dtype

# Live fp32 buffers per row of a chunk on the casting path: logits, (log-)softmax, the cast
# for the matmul. The fast path holds one buffer per row (see ``fast_chunk_rows``).
_BUFFERS_PER_ROW = 3
# Rows per log-softmax call in the fast forward: its output buffer stays this small (bytes).
_LOGSOFTMAX_BLOCK_BYTES = 2 * 2**20


def chunk_rows_for_budget(vocab_size: int, chunk_bytes: int) -> int:
    """Rows per chunk so that a chunk's fp32 work buffers fit in ``chunk_bytes``."""
    return max(1, chunk_bytes // (vocab_size * 4 * _BUFFERS_PER_ROW))


def fast_chunk_rows(vocab_size: int, chunk_bytes: int, itemsize: int = 4) -> int:
    """Rows per chunk on the fast path, whose only (chunk, V) buffer is the logits'.

    Large chunks matter on a CPU: each chunk's matmuls re-read all of W_U, so a chunk of a
    few hundred rows runs them at close to the speed of one whole-batch matmul, while the
    elementwise passes over the chunk stay cheap next to them.
    """
    return max(1, chunk_bytes // (vocab_size * itemsize))


def _row_source(u_rows, rows, start, stop):
    """The chunk's (chunk, d) rows: a view when every row is kept, else a gathered copy."""
    if rows is None:
        return u_rows[start:stop]
    return u_rows.index_select(0, rows[start:stop])


class _FastRowLogprobs(torch.autograd.Function):
    """Fast path for inputs already in the accumulation dtype; same contract as below."""

    @staticmethod
    def forward(ctx, u, weight, targets, ignore_index, chunk_rows):
        n_tokens, n_future, rank, dim = u.shape
        vocab = weight.shape[0]
        u_rows = u.reshape(-1, dim)  # (M, d), M = N·n·r
        row_targets = targets[:, :, None].expand(-1, -1, rank).reshape(-1)  # (M,)
        kept = row_targets != ignore_index
        if bool(kept.all()):
            rows, picked_targets = None, row_targets.contiguous()
        else:
            rows = torch.nonzero(kept).squeeze(1)  # (K,) rows with a target
            picked_targets = row_targets[rows]
        n_rows = picked_targets.shape[0]
        out = torch.zeros(u_rows.shape[0], dtype=u.dtype, device=u.device)
        lp = out if rows is None else torch.empty(n_rows, dtype=u.dtype, device=u.device)
        lse = torch.empty(n_rows, dtype=u.dtype, device=u.device)
        logits_buf = u.new_empty(min(chunk_rows, n_rows), vocab)
        block = max(1, _LOGSOFTMAX_BLOCK_BYTES // (vocab * u.element_size()))
        lsm_buf = u.new_empty(min(block, chunk_rows, n_rows), vocab)
        weight_t = weight.T
        # A frozen W_U (heads-only training) needs only dU = g (W[x] - E_p[W]) per row: E_p[W]
        # is computed here from the softmax at hand, and backward needs no second pass over V.
        frozen = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        expected = u.new_empty(n_rows, dim) if frozen else None  # (K, d): E_p[W]
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            logits = torch.mm(
                _row_source(u_rows, rows, start, stop), weight_t, out=logits_buf[: stop - start]
            )
            tgt = picked_targets[start:stop, None]
            # log_softmax in row blocks that stay in cache: one fused pass per block.
            for b in range(0, stop - start, block):
                e = min(b + block, stop - start)
                lsm = torch.ops.aten._log_softmax.out(logits[b:e], 1, False, out=lsm_buf[: e - b])
                torch.gather(lsm, 1, tgt[b:e], out=lp[start + b : start + e, None])
                if frozen:
                    torch.mm(lsm.exp_(), weight, out=expected[start + b : start + e])
            # logsumexp = logit at the target - log-probability at the target
            torch.sub(logits.gather(1, tgt).squeeze(1), lp[start:stop], out=lse[start:stop])
        if rows is not None:
            out.index_copy_(0, rows, lp)
        if frozen:  # d lp / d u = -(E_p[W] - W[x]), kept instead of u, W and the logsumexp
            expected.sub_(weight[picked_targets])
            ctx.save_for_backward(rows, expected)
        else:
            ctx.save_for_backward(u, weight, rows, picked_targets, lse)
        ctx.frozen, ctx.u_shape = frozen, u.shape
        ctx.chunk_rows = chunk_rows
        return out.view(n_tokens, n_future, rank)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.frozen:
            rows, expected = ctx.saved_tensors
            row_grad = grad_out.reshape(-1).to(expected.dtype)
            neg_g = -(row_grad if rows is None else row_grad[rows])  # (K,)
            scaled = expected * neg_g[:, None]  # (K, d)
            if rows is None:
                return scaled.view(ctx.u_shape), None, None, None, None
            grad_u = scaled.new_zeros(ctx.u_shape.numel() // ctx.u_shape[-1], ctx.u_shape[-1])
            return grad_u.index_copy_(0, rows, scaled).view(ctx.u_shape), None, None, None, None
        u, weight, rows, picked_targets, lse = ctx.saved_tensors
        chunk_rows = ctx.chunk_rows
        vocab, dim = weight.shape
        u_rows = u.reshape(-1, dim)
        need_u, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        row_grad = grad_out.reshape(-1).to(u.dtype)
        neg_g = -(row_grad if rows is None else row_grad[rows])  # (K,)
        n_rows = picked_targets.shape[0]
        grad_u = (
            (torch.empty_like(u_rows) if rows is None else torch.zeros_like(u_rows))
            if need_u
            else None
        )
        grad_w = torch.zeros_like(weight) if need_w else None
        buf = u.new_empty(min(chunk_rows, n_rows), vocab)
        neg_lse = -lse
        weight_t = weight.T
        offsets = torch.arange(min(chunk_rows, n_rows), device=u.device) * vocab
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            x = _row_source(u_rows, rows, start, stop)  # (chunk, d)
            # softmax = exp(logits - logsumexp): the subtraction rides on the matmul.
            a = torch.addmm(neg_lse[start:stop, None], x, weight_t, out=buf[: stop - start])
            a.exp_()
            # a = softmax - onehot = -(d lp / d logits); d logits = g · (onehot - softmax).
            flat = offsets[: stop - start] + picked_targets[start:stop]
            a.view(-1).index_add_(0, flat, torch.full_like(flat, -1, dtype=a.dtype))
            g = neg_g[start:stop, None]  # d logits = (-g) · a, scaled on the (chunk, d) side
            if need_u:
                if rows is None:
                    torch.mm(a, weight, out=grad_u[start:stop]).mul_(g)
                else:
                    grad_u.index_copy_(0, rows[start:stop], torch.mm(a, weight).mul_(g))
            if need_w:
                grad_w.addmm_(a.T, x * g)
        grad_u = grad_u.view_as(u) if need_u else None
        return grad_u, grad_w, None, None, None


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
        chunk_bytes: budget of one chunk's (chunk, V) work buffers; rows per chunk follow from it.

    Returns:
        (N, n, r) float32 (float64 for float64 input) log-probabilities, 0 where the target is ignored.
    """
    vocab = weight.shape[0]
    if u.dtype == weight.dtype == accumulation_dtype(u.dtype):
        chunk_rows = fast_chunk_rows(vocab, chunk_bytes, u.element_size())
        return _FastRowLogprobs.apply(u, weight, targets, ignore_index, chunk_rows)
    chunk_rows = chunk_rows_for_budget(vocab, chunk_bytes)
    return _ChunkedRowLogprobs.apply(u, weight, targets, ignore_index, chunk_rows)
