"""cpd_mtp.ops: every implementation of the mixture loss against independent references."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cpd_mtp import ops
from cpd_mtp.ops.chunked import chunk_rows_for_budget, row_logprobs_chunked

IGNORE = -100


def make_inputs(seed, n_tokens, n_future, rank, dim, vocab, ignore_frac, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n_tokens, n_future, rank, dim, generator=g).to(dtype)
    weight = torch.randn(vocab, dim, generator=g).to(dtype)
    log_w = torch.log_softmax(torch.randn(n_tokens, rank, generator=g), dim=-1).to(dtype)
    targets = torch.randint(0, vocab, (n_tokens, n_future), generator=g)
    drop = torch.rand(n_tokens, n_future, generator=g) < ignore_frac
    # Sequence ends: the last positions lose their farthest targets, as shift_targets does.
    for back in range(min(n_future - 1, n_tokens)):
        drop[n_tokens - 1 - back, n_future - 1 - back :] = True
    return u, weight, log_w, targets.masked_fill(drop, IGNORE)


def explicit_nll(u, weight, log_w, targets):
    """-l_t written out with F.cross_entropy per (t, s, a): an independent oracle."""
    n_tokens, n_future, rank, _ = u.shape
    logits = torch.einsum("tsad,vd->tsav", u.double(), weight.double())
    out = []
    for t in range(n_tokens):
        per_expert = log_w[t].double().clone()
        for s in range(n_future):
            if targets[t, s] == IGNORE:
                continue
            ce = F.cross_entropy(logits[t, s], targets[t, s].repeat(rank), reduction="none")
            per_expert = per_expert - ce
        out.append(-torch.logsumexp(per_expert, 0))
    return torch.stack(out)


def loss_and_grads(impl, u, weight, log_w, targets, **kwargs):
    u, weight, log_w = (x.detach().clone().requires_grad_() for x in (u, weight, log_w))
    nll = ops.mixture_nll(u, weight, log_w, targets, impl=impl, **kwargs)
    # A non-uniform upstream gradient checks the per-token weighting, not just the sum.
    upstream = torch.linspace(0.5, 1.5, nll.shape[0], dtype=nll.dtype)
    grads = torch.autograd.grad((nll * upstream).sum(), (u, weight, log_w))
    return nll.detach(), grads


shapes = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "n_tokens": st.integers(1, 7),
        "n_future": st.integers(1, 4),
        "rank": st.integers(1, 4),
        "dim": st.integers(1, 9),
        "vocab": st.integers(2, 37),
        "ignore_frac": st.sampled_from([0.0, 0.3, 1.0]),
    }
)


@settings(max_examples=40, deadline=None)
@given(case=shapes, chunk_bytes=st.sampled_from([1, 200, 10**9]))
def test_chunked_matches_reference_fp32(case, chunk_bytes):
    inputs = make_inputs(**case)
    ref, ref_grads = loss_and_grads("reference", *inputs)
    out, grads = loss_and_grads("chunked", *inputs, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("u", "weight", "log_w"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"grad {name}")


@settings(max_examples=15, deadline=None)
@given(case=shapes)
def test_reference_matches_explicit_cross_entropy(case):
    inputs = make_inputs(**case)
    nll = ops.mixture_nll(*inputs, impl="reference")
    torch.testing.assert_close(nll.double(), explicit_nll(*inputs), rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(case=shapes)
def test_chunked_bf16_error_is_that_of_the_reference(case):
    """bf16 chunked may be off from fp64 by at most a small multiple of bf16 reference's own error."""
    inputs = make_inputs(**case, dtype=torch.bfloat16)
    exact, exact_grads = loss_and_grads("reference", *(x.double() for x in inputs[:3]), inputs[3])
    ref, ref_grads = loss_and_grads("reference", *inputs)
    out, grads = loss_and_grads("chunked", *inputs, chunk_bytes=300)
    for got, want_lp, want in [(out, ref, exact), *zip(grads, ref_grads, exact_grads)]:
        ref_err = (want_lp.double() - want).abs().max().item()
        err = (got.double() - want).abs().max().item()
        scale = want.abs().max().item() + 1.0
        assert err <= 2.0 * ref_err + 1e-2 * scale, (err, ref_err)


def test_chunked_gradcheck_float64():
    u, weight, log_w, targets = make_inputs(0, 4, 3, 2, 5, 11, 0.3, dtype=torch.float64)
    u.requires_grad_()
    weight.requires_grad_()
    log_w.requires_grad_()

    def fn(u, weight, log_w):
        return ops.mixture_nll(
            u, weight, log_w, targets, impl="chunked", chunk_bytes=11 * 4 * 3 * 2
        )

    assert torch.autograd.gradcheck(fn, (u, weight, log_w))


def test_all_targets_ignored_gives_zero_loss_and_zero_grads():
    u, weight, log_w, targets = make_inputs(1, 3, 2, 3, 4, 9, 1.0)
    for impl in ("reference", "chunked"):
        nll, (gu, gw, glw) = loss_and_grads(impl, u, weight, log_w, targets)
        torch.testing.assert_close(nll, torch.zeros(3))
        assert gu.abs().max() == 0 and gw.abs().max() == 0
        # -l_t = -logsumexp(log_w), whose gradient is -w (times the upstream weight).
        upstream = torch.linspace(0.5, 1.5, 3)
        torch.testing.assert_close(glw, -log_w.exp() * upstream[:, None])


def test_row_logprobs_chunked_equals_log_softmax_gather():
    u, weight, _, targets = make_inputs(2, 5, 3, 2, 6, 13, 0.3)
    lp = row_logprobs_chunked(u, weight, targets, IGNORE, chunk_bytes=1)
    want = torch.log_softmax(torch.einsum("tsad,vd->tsav", u, weight), -1)
    for t in range(5):
        for s in range(3):
            expect = 0.0 if targets[t, s] == IGNORE else want[t, s, :, targets[t, s]]
            torch.testing.assert_close(lp[t, s], torch.as_tensor(expect).expand(2).float())


def test_chunk_rows_respect_budget():
    assert chunk_rows_for_budget(1000, 1) == 1
    rows = chunk_rows_for_budget(16000, 64 * 2**20)
    assert rows * 16000 * 4 * 3 <= 64 * 2**20 < (rows + 1) * 16000 * 4 * 3


def test_auto_dispatches_to_chunked_on_cpu():
    assert ops.resolve_impl("auto", torch.device("cpu")) == "chunked"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"needs CUDA.*TRITON_INTERPRET"):
        ops.resolve_impl("triton", torch.device("cpu"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda u, w, lw, t: (u[0], w, lw, t), r"u must have shape \[N, n, r, d\]"),
        (lambda u, w, lw, t: (u, w[:, :-1], lw, t), "weight has d="),
        (lambda u, w, lw, t: (u, w, lw[:, :-1], t), r"log_w must have shape \[N, r\]"),
        (lambda u, w, lw, t: (u, w, lw, t[:, :-1]), r"targets must have shape \[N, n\]"),
        (lambda u, w, lw, t: (u, w, lw, t.float()), "targets must be an integer tensor"),
        (lambda u, w, lw, t: (u, w, lw, t.clone().fill_(9)), r"targets holds 9, outside \[0, 9\)"),
        (lambda u, w, lw, t: (u, w, lw, t.clone().fill_(-1)), "targets holds -1"),
        (lambda u, w, lw, t: (u.long(), w, lw, t), "u must be a floating tensor"),
        (lambda u, w, lw, t: (u, w.double(), lw, t), "weight dtype"),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_bad_input_is_a_value_error(change, message, impl):
    args = change(*make_inputs(3, 4, 2, 3, 5, 9, 0.0))
    with pytest.raises(ValueError, match=message):
        ops.mixture_nll(*args, impl=impl)


def test_unknown_impl_is_a_value_error():
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.mixture_nll(*make_inputs(3, 4, 2, 3, 5, 9, 0.0), impl="fast")


# ---------------------------------------------------------------------------------------------
# Label dtypes: the range check and the ignore_index test must not wrap around in narrow dtypes.

LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def _impls_here() -> list[str]:
    """reference and chunked, plus triton where it can run (CUDA or the interpreter)."""
    try:
        ops.resolve_impl("triton", torch.device("cpu"))
    except ValueError:
        return ["reference", "chunked"]
    return ["reference", "chunked", "triton"]


@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from(LABEL_DTYPES), data=st.data())
def test_in_range_labels_of_every_integer_dtype_are_accepted(dtype, data):
    top = torch.iinfo(dtype).max
    # A vocabulary larger than the dtype's max where that is cheap (uint8, int8, int16).
    vocab = data.draw(st.integers(min(top, 2**15) + 1, min(top, 2**15) + 40), label="vocab")
    ids = st.integers(0, min(top, vocab - 1))
    if torch.iinfo(dtype).min <= IGNORE:
        ids = ids | st.just(IGNORE)
    labels = data.draw(st.lists(ids, min_size=6, max_size=6), label="labels")
    u, weight, log_w, _ = make_inputs(1, 3, 2, 2, 3, vocab, 0.0)
    targets = torch.tensor(labels, dtype=torch.int64).view(3, 2)
    ops.check_targets(targets.to(dtype), vocab, IGNORE, "targets")  # no false error
    want = explicit_nll(u, weight, log_w, targets)
    for impl in ("reference", "chunked"):
        nll = ops.mixture_nll(u, weight, log_w, targets.to(dtype), impl=impl)
        torch.testing.assert_close(nll.double(), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from(LABEL_DTYPES), data=st.data())
def test_out_of_range_labels_of_every_integer_dtype_are_a_value_error(dtype, data):
    info = torch.iinfo(dtype)
    vocab = data.draw(st.integers(2, min(info.max, 1000)), label="vocab")
    too_big = st.integers(vocab, info.max) if vocab <= info.max else st.nothing()
    negative = (
        st.integers(info.min, -1).filter(lambda x: x != IGNORE) if info.min < 0 else st.nothing()
    )
    bad = data.draw(too_big | negative, label="bad")
    targets = torch.zeros(3, 2, dtype=dtype)
    targets[1, 1] = bad
    with pytest.raises(ValueError, match=rf"targets holds {bad}, outside \[0, {vocab}\)"):
        ops.check_targets(targets, vocab, IGNORE, "targets")


@pytest.mark.parametrize("impl", _impls_here())
def test_uint8_label_equal_to_ignore_index_mod_256_is_a_target(impl):
    # -100 wraps to 156 in uint8: label 156 is a real token, not a missing one.
    u, weight, log_w, _ = make_inputs(2, 3, 2, 2, 4, 200, 0.0)
    targets = torch.full((3, 2), 156, dtype=torch.int64)
    want = explicit_nll(u, weight, log_w, targets)
    nll = ops.mixture_nll(u, weight, log_w, targets.to(torch.uint8), impl=impl)
    torch.testing.assert_close(nll.double(), want, rtol=1e-5, atol=1e-5)
    lp = ops.row_logprobs(u, weight, targets.to(torch.uint8), impl=impl)
    torch.testing.assert_close(lp, ops.row_logprobs(u, weight, targets, impl="reference"))


# ---------------------------------------------------------------------------------------------
# Autocast: u and W_U are cast to the autocast dtype before the dtype check, like F.linear.


@pytest.mark.parametrize("impl", _impls_here())
@pytest.mark.parametrize(
    ("u_dtype", "w_dtype"),
    [
        (torch.bfloat16, torch.float32),  # a bf16 trunk under autocast, an fp32 W_U parameter
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
)
def test_autocast_casts_u_and_weight_before_the_dtype_check(impl, u_dtype, w_dtype):
    u, weight, log_w, targets = make_inputs(3, 5, 3, 2, 16, 40, 0.2)
    u = u.to(u_dtype).requires_grad_()
    weight = weight.to(w_dtype).requires_grad_()
    upstream = torch.linspace(0.5, 1.5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = ops.mixture_nll(u, weight, log_w, targets, impl=impl)
        lp = ops.row_logprobs(u, weight, targets, impl=impl)
    # The same calls with both tensors already in bf16, outside autocast.
    ub, wb = (t.detach().bfloat16().requires_grad_() for t in (u, weight))
    want_nll = ops.mixture_nll(ub, wb, log_w, targets, impl=impl)
    want_lp = ops.row_logprobs(ub, wb, targets, impl=impl)
    torch.testing.assert_close(nll, want_nll, rtol=0, atol=0)
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=0)
    gu, gw = torch.autograd.grad((nll * upstream).sum(), (u, weight))
    want_gu, want_gw = torch.autograd.grad((want_nll * upstream).sum(), (ub, wb))
    # Gradients reach each leaf in its own dtype: the bf16 gradient, cast back.
    assert gu.dtype == u_dtype and gw.dtype == w_dtype
    torch.testing.assert_close(gu, want_gu.to(u_dtype), rtol=0, atol=0)
    torch.testing.assert_close(gw, want_gw.to(w_dtype), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The label check on CUDA is asynchronous: no GPU->CPU sync on the training path.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.cuda
def test_label_check_on_cuda_does_not_synchronise():
    targets = torch.randint(0, 9, (64, 4), device="cuda")
    targets[0, 0] = IGNORE
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call now raises
    try:
        ops.check_targets(targets, 9, IGNORE, "targets")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.cuda
def test_bad_label_on_cuda_fails_at_the_next_sync_with_the_message():
    # A failed device-side assert leaves the CUDA context unusable: run it in its own process.
    code = (
        "import torch\n"
        "from cpd_mtp import ops\n"
        "t = torch.full((3, 2), 9, device='cuda')\n"
        "ops.check_targets(t, 9, -100, 'targets')\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "targets holds a value outside [0, 9)" in result.stderr, result.stderr[-2000:]


@settings(max_examples=30, deadline=None)
@given(
    case=shapes,
    keep_all=st.booleans(),
    chunk_bytes=st.sampled_from([1, 150, 10**9]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_fast_chunked_rows_match_reference_with_and_without_ignored(
    case, keep_all, chunk_bytes, dtype
):
    """The fast path (fp32/fp64): row slices when every target is kept, gathers otherwise."""
    u, weight, _, targets = make_inputs(**case, dtype=dtype)
    if keep_all:
        targets = targets.clamp(min=0)  # every row kept: the slice path, no index_select
    upstream = torch.rand((*targets.shape, u.shape[2]), generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ("reference", "chunked"):
        leaves = [x.detach().clone().requires_grad_() for x in (u, weight)]
        lp = ops.row_logprobs(*leaves, targets, impl=impl, chunk_bytes=chunk_bytes)
        grads = torch.autograd.grad((lp * upstream.to(lp.dtype)).sum(), leaves)
        results[impl] = (lp.detach(), *grads)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for got, want in zip(results["chunked"], results["reference"]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@settings(max_examples=30, deadline=None)
@given(
    case=shapes,
    keep_all=st.booleans(),
    chunk_bytes=st.sampled_from([1, 150, 10**9]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_a_frozen_unembedding_gets_the_references_gradient_of_u(case, keep_all, chunk_bytes, dtype):
    """Heads-only training (W_U frozen): dU comes from E_p[W] kept in forward, no second pass."""
    u, weight, _, targets = make_inputs(**case, dtype=dtype)
    if keep_all:
        targets = targets.clamp(min=0)
    upstream = torch.randn((*targets.shape, u.shape[2]), generator=torch.Generator().manual_seed(2))
    results = {}
    for impl in ("reference", "chunked"):
        leaf = u.detach().clone().requires_grad_()
        lp = ops.row_logprobs(leaf, weight.detach(), targets, impl=impl, chunk_bytes=chunk_bytes)
        (grad,) = torch.autograd.grad((lp * upstream.to(lp.dtype)).sum(), [leaf])
        results[impl] = (lp.detach(), grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for got, want in zip(results["chunked"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_fast_chunk_rows_hold_one_buffer_per_row():
    from cpd_mtp.ops.chunked import fast_chunk_rows

    assert fast_chunk_rows(1000, 1) == 1
    rows = fast_chunk_rows(32000, 64 * 2**20)
    assert rows * 32000 * 4 <= 64 * 2**20 < (rows + 1) * 32000 * 4
    assert fast_chunk_rows(32000, 64 * 2**20, itemsize=8) == rows // 2
