"""The self-distillation loss: KL from the base model's next-token distribution to a CP conditional.

For one drafted offset of one position (a *row*), the student is the CP conditional

    log q(v) = logsumexp_a( log pi_a + log_softmax(W_U u_a)(v) )

(r experts with states u_a and posterior weights pi over the experts, given the tokens already
in the window), and the teacher is the frozen model's own next-token distribution at the same
target, p = softmax(W_U h) for its hidden state h. The loss of a row is

    KL(p || q) = sum_v p(v) (log p(v) - log q(v)),

differentiable in the expert states u, in log pi (so in the gate and, through pi, in the
earlier offsets' expert probabilities) and in W_U; the teacher is a constant. Over a draft
vocabulary D, pass ``weight[D]``: both distributions are then restricted to D and
renormalised.

Gradients, with rho_{a,v} = pi_a p_a(v) / q(v) the posterior of expert a given token v and
c_a = sum_v p(v) rho_{a,v}:

    d KL / d log pi_a  = -c_a
    d KL / d z_a(v)    = -p(v) rho_{a,v} + p_a(v) c_a        (z_a = W_U u_a, the logits)

Two implementations, one contract (like the mixture NLL):

- ``reference``: materialises the (M, r, V) logits; the oracle for tests.
- ``chunked``: an ``autograd.Function`` that keeps one chunk of rows' logits alive and
  recomputes them in backward; O(chunk·r·V) memory.
"""

from __future__ import annotations

import torch

from cpd_mtp.ops.checks import accumulation_dtype

DISTILL_IMPLS = ("reference", "chunked")


def _check(u: torch.Tensor, weight: torch.Tensor, log_pi: torch.Tensor, teacher: torch.Tensor):
    if u.dim() != 3:
        raise ValueError(f"u must have shape [M, r, d], got {tuple(u.shape)}")
    rows, rank, dim = u.shape
    if weight.dim() != 2 or weight.shape[1] != dim:
        raise ValueError(f"weight must have shape [V, d={dim}], got {tuple(weight.shape)}")
    if tuple(log_pi.shape) != (rows, rank):
        raise ValueError(
            f"log_pi must have shape [M, r] = {(rows, rank)}, got {tuple(log_pi.shape)}"
        )
    if tuple(teacher.shape) != (rows, dim):
        raise ValueError(
            f"teacher_hidden must have shape [M, d] = {(rows, dim)}, got {tuple(teacher.shape)}"
        )
    for name, tensor in (("u", u), ("weight", weight), ("log_pi", log_pi), ("teacher", teacher)):
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating tensor, got {tensor.dtype}")
        if tensor.device != u.device:
            raise ValueError(f"{name} is on {tensor.device} but u is on {u.device}")


def _row_kl(
    u: torch.Tensor, weight: torch.Tensor, log_pi: torch.Tensor, teacher: torch.Tensor
) -> torch.Tensor:
    """KL per row, plain autograd: u (m, r, d), weight (V, d), log_pi (m, r), teacher (m, d)."""
    acc = accumulation_dtype(u.dtype)
    # The teacher is a constant: no gradient reaches W_U through it.
    teacher_logits = teacher.to(weight.dtype) @ weight.detach().T
    log_p = torch.log_softmax(teacher_logits.to(acc), dim=-1)  # (m, V)
    student = torch.log_softmax((u @ weight.T).to(acc), dim=-1)  # (m, r, V)
    log_q = torch.logsumexp(log_pi.to(acc)[:, :, None] + student, dim=1)  # (m, V)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def distill_kl_reference(
    u: torch.Tensor, weight: torch.Tensor, log_pi: torch.Tensor, teacher_hidden: torch.Tensor
) -> torch.Tensor:
    """KL(p_teacher || q) per row, materialising every logit; see the module docstring.

    Args:
        u: (M, r, d) expert states of the rows' offset.
        weight: (V, d) unembedding W_U (or its draft-vocabulary rows).
        log_pi: (M, r) log posterior weights of the experts, normalised over r.
        teacher_hidden: (M, d) the frozen model's hidden state whose next-token distribution
            is the teacher; no gradient flows to it.

    Returns:
        (M,) float32 (float64 for float64 input) KL divergences, >= 0.
    """
    _check(u, weight, log_pi, teacher_hidden)
    return _row_kl(u, weight, log_pi, teacher_hidden.detach())


def kl_chunk_rows(vocab_size: int, rank: int, chunk_bytes: int) -> int:
    """Rows per chunk so that a chunk's fp32 buffers (about 3·(r + 1)·V numbers a row) fit."""
    return max(1, chunk_bytes // (vocab_size * 4 * 3 * (rank + 1)))


class _ChunkedDistillKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, weight, log_pi, teacher, chunk_rows):
        rows = u.shape[0]
        out = torch.empty(rows, dtype=accumulation_dtype(u.dtype), device=u.device)
        with torch.no_grad():
            for start in range(0, rows, chunk_rows):
                end = start + chunk_rows
                out[start:end] = _row_kl(
                    u[start:end], weight, log_pi[start:end], teacher[start:end]
                )
        ctx.save_for_backward(u, weight, log_pi, teacher)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u, weight, log_pi, teacher = ctx.saved_tensors
        acc = accumulation_dtype(u.dtype)
        need_u, need_w, need_pi = ctx.needs_input_grad[:3]
        grad_u = torch.zeros_like(u) if need_u else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_pi = torch.zeros_like(log_pi) if need_pi else None
        for start in range(0, u.shape[0], ctx.chunk_rows):
            end = start + ctx.chunk_rows
            x = u[start:end]  # (m, r, d)
            g = grad_out[start:end].to(acc)[:, None, None]  # (m, 1, 1)
            p = torch.softmax((teacher[start:end].to(weight.dtype) @ weight.T).to(acc), dim=-1)
            student = torch.log_softmax((x @ weight.T).to(acc), dim=-1)  # (m, r, V)
            joint = log_pi[start:end].to(acc)[:, :, None] + student
            rho = torch.softmax(joint, dim=1)  # (m, r, V): expert posterior given each token
            weighted = p[:, None, :] * rho  # p(v) rho_{a,v}
            c = weighted.sum(dim=-1, keepdim=True)  # (m, r, 1)
            grad_logits = (student.exp() * c - weighted) * g  # (m, r, V)
            del student, joint, rho, weighted
            if need_pi:
                grad_pi[start:end] = (-c.squeeze(-1) * g.squeeze(-1)).to(grad_pi.dtype)
            grad_logits = grad_logits.to(weight.dtype)
            if need_u:
                grad_u[start:end] = grad_logits @ weight
            if need_w:
                grad_w += torch.einsum("mrv,mrd->vd", grad_logits, x).to(acc)
        return (
            grad_u,
            grad_w.to(weight.dtype) if need_w else None,
            grad_pi,
            None,
            None,
        )


def distill_kl(
    u: torch.Tensor,
    weight: torch.Tensor,
    log_pi: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    impl: str = "chunked",
    chunk_bytes: int = 64 * 2**20,
) -> torch.Tensor:
    """KL(p_teacher || q) per row: the self-distillation loss of one offset's CP conditional.

    Args:
        u: (M, r, d) expert states of the rows' offset.
        weight: (V, d) unembedding W_U, same dtype as ``u`` (or its draft-vocabulary rows).
        log_pi: (M, r) log posterior weights of the experts given the window prefix.
        teacher_hidden: (M, d) hidden states whose ``softmax(W_U h)`` is the teacher.
        impl: ``chunked`` (O(chunk·r·V) memory) or ``reference``.
        chunk_bytes: memory budget of one chunk for ``chunked``.

    Returns:
        (M,) float32 (float64 for float64 input), differentiable in u, weight and log_pi.
    """
    if impl not in DISTILL_IMPLS:
        raise ValueError(f"impl must be one of {DISTILL_IMPLS}, got {impl!r}")
    _check(u, weight, log_pi, teacher_hidden)
    if weight.dtype != u.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from u dtype {u.dtype}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if impl == "reference":
        return _row_kl(u, weight, log_pi, teacher_hidden.detach())
    chunk = kl_chunk_rows(weight.shape[0], u.shape[1], chunk_bytes)
    return _ChunkedDistillKL.apply(u, weight, log_pi, teacher_hidden.detach(), chunk)


def window_distill_loss(
    u: torch.Tensor,
    weight: torch.Tensor,
    log_w: torch.Tensor,
    row_lp: torch.Tensor,
    observed: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_observed: torch.Tensor,
    *,
    beta: float = 0.9,
    gamma: float = 0.8,
    impl: str = "chunked",
    chunk_bytes: int = 64 * 2**20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced distillation of every offset of a CP window, per position.

    For offset k = 1..n at position t, with the CP conditional given the true window prefix,

        log pi_k = log_softmax_a( log w_a + sum_{s<k} log p_{s,a}(x_{t+s}) )
        q_k(v)   = sum_a pi_{k,a} p_{k,a}(v),

    the loss of the position is sum_k gamma^(k-1) (beta·KL(p_k || q_k) + (1 - beta)·NLL_k),
    where p_k = softmax(W_U h_{t+k-1}) is the frozen model's own next-token distribution for
    x_{t+k} and NLL_k = -log q_k(x_{t+k}). The NLL terms sum (gamma = 1) to the exact joint
    NLL of the window, since -log P(x_{t+1..t+n}) = sum_k -log q_k(x_{t+k} | x_{t+1..t+k-1}).

    Args:
        u: (N, n, r, d) expert states.
        weight: (V, d) W_U (or its draft-vocabulary rows: then every distribution lives on
            those ids and ``row_lp`` must be computed over the same rows).
        log_w: (N, r) log gate weights.
        row_lp: (N, n, r) log p_{s,a}(x_{t+s}) of the observed targets, 0 where not observed.
        observed: (N, n) bool, whether x_{t+s} is observed (in the block, not ignored).
        teacher_hidden: (N, n, d) h_{t+k-1}, the hidden state whose next-token distribution is
            the teacher of offset k (any values where ``teacher_observed`` is False).
        teacher_observed: (N, n) bool, whether position t+k-1 exists.
        beta: weight of the KL against the NLL, in [0, 1].
        gamma: decay of the offsets' weights, in (0, 1].

    Returns:
        loss: (N,) per-position loss (0 where nothing is observed); kl: (N, n) KL terms and
        nll: (N, n) conditional NLL terms (0 where not defined), both detached.

    A missing prefix target is marginalised out of pi (it adds no evidence), so the NLL terms
    of the observed targets always sum to the exact joint NLL of what is observed. A KL term
    counts only where the whole prefix x_{t+1..t+k-1} is observed (the teacher conditions on
    those tokens, so the student must too) and the teacher's position exists.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
    n_tokens, n_future, rank, dim = u.shape
    if tuple(row_lp.shape) != (n_tokens, n_future, rank) or tuple(log_w.shape) != (n_tokens, rank):
        raise ValueError(
            f"row_lp must be [N, n, r] = {(n_tokens, n_future, rank)} and log_w [N, r], got "
            f"{tuple(row_lp.shape)} and {tuple(log_w.shape)}"
        )
    if tuple(observed.shape) != (n_tokens, n_future) or tuple(teacher_observed.shape) != (
        n_tokens,
        n_future,
    ):
        raise ValueError("observed and teacher_observed must have shape [N, n]")
    if tuple(teacher_hidden.shape) != (n_tokens, n_future, dim):
        raise ValueError(
            f"teacher_hidden must have shape [N, n, d] = {(n_tokens, n_future, dim)}, "
            f"got {tuple(teacher_hidden.shape)}"
        )
    acc = accumulation_dtype(u.dtype)
    prefix = log_w.to(acc)  # (N, r): log w + sum of the earlier offsets' evidence
    prefix_ok = torch.ones(n_tokens, dtype=torch.bool, device=u.device)
    loss = torch.zeros(n_tokens, dtype=acc, device=u.device)
    kls, nlls = [], []
    for k in range(n_future):
        log_pi = torch.log_softmax(prefix, dim=-1)  # (N, r)
        lp_k = row_lp[:, k].to(acc)
        kl_rows = prefix_ok & teacher_observed[:, k]
        kl = torch.zeros(n_tokens, dtype=acc, device=u.device)
        if beta > 0 and bool(kl_rows.any()):
            index = kl_rows.nonzero().squeeze(1)
            kl = kl.index_put(
                (index,),
                distill_kl(
                    u[index, k],
                    weight,
                    log_pi[index],
                    teacher_hidden[index, k],
                    impl=impl,
                    chunk_bytes=chunk_bytes,
                ),
            )
        nll_rows = observed[:, k]
        nll = torch.where(nll_rows, -torch.logsumexp(log_pi + lp_k, dim=-1), 0.0)
        loss = loss + gamma**k * (beta * kl + (1.0 - beta) * nll)
        kls.append(kl.detach())
        nlls.append(nll.detach())
        prefix = prefix + lp_k  # lp is 0 where x_{t+k} is not observed
        prefix_ok = prefix_ok & observed[:, k]
    return loss, torch.stack(kls, dim=1), torch.stack(nlls, dim=1)
