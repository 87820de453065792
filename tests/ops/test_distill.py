"""The self-distillation KL (cpd_mtp.ops.distill) against brute force and between its implementations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpd_mtp.ops.distill import distill_kl, distill_kl_reference

FEW = settings(max_examples=25, deadline=None)


def make(rows, rank, dim, vocab, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, rank, dim, generator=g, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=g, dtype=dtype)
    log_pi = torch.randn(rows, rank, generator=g, dtype=dtype).log_softmax(-1)
    teacher = torch.randn(rows, dim, generator=g, dtype=dtype)
    return u, weight, log_pi, teacher


def brute_force_kl(u, weight, log_pi, teacher) -> list[float]:
    """Explicit sums over tokens and experts, one row at a time, in Python floats."""
    out = []
    for m in range(u.shape[0]):
        teacher_logits = [float(weight[v] @ teacher[m]) for v in range(weight.shape[0])]
        top = max(teacher_logits)
        z = sum(math.exp(t - top) for t in teacher_logits)
        p = [math.exp(t - top) / z for t in teacher_logits]
        q = [0.0] * weight.shape[0]
        for a in range(u.shape[1]):
            logits = [float(weight[v] @ u[m, a]) for v in range(weight.shape[0])]
            top_a = max(logits)
            z_a = sum(math.exp(x - top_a) for x in logits)
            for v, x in enumerate(logits):
                q[v] += math.exp(float(log_pi[m, a])) * math.exp(x - top_a) / z_a
        out.append(sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q) if pv > 0))
    return out


@FEW
@given(
    rows=st.integers(1, 4),
    rank=st.integers(1, 3),
    dim=st.integers(1, 5),
    vocab=st.integers(2, 7),
    seed=st.integers(0, 2**31 - 1),
)
def test_both_implementations_equal_brute_force(rows, rank, dim, vocab, seed):
    args = make(rows, rank, dim, vocab, seed)
    expected = torch.tensor(brute_force_kl(*args), dtype=torch.float64)
    for impl in ("reference", "chunked"):
        got = distill_kl(*args, impl=impl, chunk_bytes=1)  # one row per chunk
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    assert bool((expected >= -1e-12).all())


@FEW
@given(
    rows=st.integers(1, 9),
    rank=st.integers(1, 4),
    dim=st.integers(1, 8),
    vocab=st.integers(2, 40),
    chunk_bytes=st.sampled_from([1, 2000, 10**9]),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunked_gradients_equal_the_reference(rows, rank, dim, vocab, chunk_bytes, seed):
    leaves = [t.requires_grad_() for t in make(rows, rank, dim, vocab, seed)[:3]]
    teacher = make(rows, rank, dim, vocab, seed + 1)[3]
    upstream = torch.randn(rows, dtype=torch.float64)
    grads = {}
    for impl in ("reference", "chunked"):
        value = distill_kl(*leaves, teacher, impl=impl, chunk_bytes=chunk_bytes)
        grads[impl] = (value, torch.autograd.grad((value * upstream).sum(), leaves))
    torch.testing.assert_close(grads["chunked"][0], grads["reference"][0], rtol=1e-10, atol=1e-12)
    for got, expected in zip(grads["chunked"][1], grads["reference"][1]):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_chunked_passes_gradcheck():
    # W_U also makes the teacher, which is a constant (stop-gradient): gradcheck would
    # differentiate through it, so it checks u and log_pi; W_U's gradient is checked against
    # the reference above.
    u, weight, log_pi, teacher = make(3, 2, 4, 6, seed=0)
    leaves = (u.requires_grad_(), log_pi.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, c: distill_kl(a, weight, c, teacher, impl="chunked", chunk_bytes=1), leaves
    )


def test_kl_is_zero_when_the_conditional_is_the_teacher():
    u, weight, _, teacher = make(5, 1, 6, 11, seed=3)
    log_pi = torch.zeros(5, 1, dtype=torch.float64)
    same = teacher[:, None, :].clone()
    torch.testing.assert_close(
        distill_kl(same, weight, log_pi, teacher), torch.zeros(5, dtype=torch.float64)
    )
    assert bool((distill_kl(u, weight, log_pi, teacher) > 0).all())


def test_float32_stays_close_to_float64():
    args64 = make(16, 4, 32, 500, seed=5)
    args32 = [t.float() for t in args64]
    torch.testing.assert_close(
        distill_kl(*args32).double(), distill_kl_reference(*args64), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: (a[0][0], *a[1:]), "u must have shape"),
        (lambda a: (a[0], a[1][:, :2], *a[2:]), "weight must have shape"),
        (lambda a: (a[0], a[1], a[2][:, :1], a[3]), "log_pi must have shape"),
        (lambda a: (*a[:3], a[3][:1]), "teacher_hidden must have shape"),
        (lambda a: (a[0].float(), *a[1:]), "dtype"),
    ],
)
def test_bad_inputs_are_value_errors(change, message):
    with pytest.raises(ValueError, match=message):
        distill_kl(*change(make(3, 2, 4, 6, seed=0)))
    with pytest.raises(ValueError, match="impl"):
        distill_kl(*make(3, 2, 4, 6, seed=0), impl="triton")


# ---------------------------------------------------------------- the window loss


def _softmax(values):
    top = max(values)
    z = sum(math.exp(x - top) for x in values)
    return [math.exp(x - top) / z for x in values]


def brute_force_window(u, weight, log_w, targets, observed, teacher, teacher_ok, beta, gamma):
    """Per-position loss from the joint P(x_{1..n}) = sum_a w_a prod_s p_{s,a}(x_s), with the
    conditionals q_k(v | prefix) obtained by explicit sums over the experts."""
    n_tokens, n_future, rank, _ = u.shape
    vocab = weight.shape[0]
    out = []
    for t in range(n_tokens):
        w = _softmax([float(x) for x in log_w[t]])
        p = [
            [_softmax([float(weight[v] @ u[t, s, a]) for v in range(vocab)]) for a in range(rank)]
            for s in range(n_future)
        ]
        total = 0.0
        for k in range(n_future):
            whole_prefix = all(observed[t, s] for s in range(k))
            # P(observed prefix, x_k = v): a missing prefix target is summed out (factor 1).
            joint = [
                sum(
                    w[a]
                    * math.prod(p[s][a][int(targets[t, s])] for s in range(k) if observed[t, s])
                    * p[k][a][v]
                    for a in range(rank)
                )
                for v in range(vocab)
            ]
            q = [j / sum(joint) for j in joint]
            term = 0.0
            if teacher_ok[t, k] and whole_prefix:
                pt = _softmax([float(weight[v] @ teacher[t, k]) for v in range(vocab)])
                term += beta * sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, q))
            if observed[t, k]:
                term += (1 - beta) * -math.log(q[int(targets[t, k])])
            total += gamma**k * term
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@FEW
@given(
    n_tokens=st.integers(1, 4),
    n_future=st.integers(1, 3),
    rank=st.integers(1, 3),
    dim=st.integers(1, 4),
    vocab=st.integers(2, 4),
    beta=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    gamma=st.sampled_from([1.0, 0.8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_window_loss_equals_brute_force(n_tokens, n_future, rank, dim, vocab, beta, gamma, seed):
    from cpd_mtp.ops.distill import window_distill_loss
    from cpd_mtp.ops.reference import row_logprobs_reference

    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n_tokens, n_future, rank, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    log_w = torch.randn(n_tokens, rank, generator=g, dtype=torch.float64).log_softmax(-1)
    targets = torch.randint(0, vocab, (n_tokens, n_future), generator=g)
    observed = torch.rand(n_tokens, n_future, generator=g) < 0.8
    teacher = torch.randn(n_tokens, n_future, dim, generator=g, dtype=torch.float64)
    teacher_ok = torch.rand(n_tokens, n_future, generator=g) < 0.8
    row_lp = row_logprobs_reference(u, weight, torch.where(observed, targets, -100), -100)
    expected = brute_force_window(
        u, weight, log_w, targets, observed, teacher, teacher_ok, beta, gamma
    )
    for impl in ("reference", "chunked"):
        loss, kl, nll = window_distill_loss(
            u,
            weight,
            log_w,
            row_lp,
            observed,
            teacher,
            teacher_ok,
            beta=beta,
            gamma=gamma,
            impl=impl,
        )
        torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-10)
        weights = gamma ** torch.arange(n_future, dtype=torch.float64)
        torch.testing.assert_close(loss, ((beta * kl + (1 - beta) * nll) * weights).sum(1))


def test_window_nll_terms_sum_to_the_joint_nll():
    from cpd_mtp.ops import mixture_logsumexp
    from cpd_mtp.ops.distill import window_distill_loss
    from cpd_mtp.ops.reference import row_logprobs_reference

    g = torch.Generator().manual_seed(0)
    u = torch.randn(6, 4, 3, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(9, 5, generator=g, dtype=torch.float64)
    log_w = torch.randn(6, 3, generator=g, dtype=torch.float64).log_softmax(-1)
    targets = torch.randint(0, 9, (6, 4), generator=g)
    observed = torch.ones(6, 4, dtype=torch.bool)
    row_lp = row_logprobs_reference(u, weight, targets, -100)
    loss, _, nll = window_distill_loss(
        u,
        weight,
        log_w,
        row_lp,
        observed,
        torch.zeros(6, 4, 5, dtype=torch.float64),
        torch.ones(6, 4, dtype=torch.bool),
        beta=0.0,
        gamma=1.0,
    )
    joint, _ = mixture_logsumexp(row_lp, log_w)
    torch.testing.assert_close(loss, joint)
    torch.testing.assert_close(nll.sum(1), joint)


def test_window_nll_terms_sum_to_the_joint_nll_with_missing_targets():
    """Missing targets are marginalised: the observed terms still sum to the exact joint NLL."""
    from cpd_mtp.ops import mixture_logsumexp
    from cpd_mtp.ops.distill import window_distill_loss
    from cpd_mtp.ops.reference import row_logprobs_reference

    g = torch.Generator().manual_seed(1)
    u = torch.randn(8, 4, 3, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(9, 5, generator=g, dtype=torch.float64)
    log_w = torch.randn(8, 3, generator=g, dtype=torch.float64).log_softmax(-1)
    targets = torch.randint(0, 9, (8, 4), generator=g)
    observed = torch.rand(8, 4, generator=g) < 0.6
    row_lp = row_logprobs_reference(u, weight, torch.where(observed, targets, -100), -100)
    loss, _, _ = window_distill_loss(
        u,
        weight,
        log_w,
        row_lp,
        observed,
        torch.zeros(8, 4, 5, dtype=torch.float64),
        torch.zeros(8, 4, dtype=torch.bool),
        beta=0.0,
        gamma=1.0,
    )
    joint, _ = mixture_logsumexp(row_lp, log_w)
    torch.testing.assert_close(loss, joint)
