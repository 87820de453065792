"""Token-conditioned CP heads against brute-force enumeration.

A token-conditioned head (``token_conditioned=True``, base mode) reads z_t = h_t + C e(x_{t+1})
in its gate and experts, with e the model's frozen input embedding and C a learned (d, d) map
that starts at zero. The references here are computed outside the head's loss code: z by hand
from the embedding table and C, the joint over x_{t+2..t+n} enumerated on tiny vocabularies,
and the unconditioned head itself (for C = 0).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cpd_mtp import CPDMTPConfig, CPDMTPHead
from cpd_mtp.head import SHARED_KEYS
from cpd_mtp.metrics import HeadMetrics

EXPERT_TYPES = ["linear", "resblock", "lowrank"]
IGNORE = -100


def make_head(seed=0, dtype=torch.float64, conditioned=True, embedding=True, **kwargs):
    """A head with a spread-out gate, W_U and C, and (``embedding``) its own input embedding
    table, distinct from W_U as in an untied model."""
    torch.manual_seed(seed)
    defaults = dict(
        hidden_size=6,
        vocab_size=5,
        n_future=3,
        rank=3,
        expert_type="linear",
        expert_init_noise=1.0,
        expert_inner_size=3,
        balance="none",
        next_token="base",
        token_conditioned=conditioned,
    )
    config = CPDMTPConfig(**{**defaults, **kwargs})
    table = None
    if embedding:
        table = torch.nn.Parameter(
            torch.randn(config.vocab_size, config.hidden_size), requires_grad=False
        )
    head = CPDMTPHead(config, token_embedding=table if conditioned else None).to(dtype)
    with torch.no_grad():
        head.gate.weight.normal_(0, 1.0)
        head.weight.normal_(0, 1.0)
        for param in head.token_proj.parameters() if head.token_proj is not None else ():
            param.normal_(0, 0.5)
    return head


def z_by_hand(head: CPDMTPHead, h: torch.Tensor, x1: int) -> torch.Tensor:
    """z from the embedding table and the fusion's matrices, without the head's code:
    h + C e (``add``), or h + W2 SiLU(W1 [h / rms(h); e / rms(e)] + b1) + b2 (``mlp``)."""
    e = head.token_embedding.detach()[x1].to(h.dtype)
    fusion = head.token_proj
    if fusion.kind == "add":
        return h + fusion.weight.detach().to(h.dtype) @ e
    rms = lambda v: v / torch.sqrt((v * v).mean() + 1e-6)  # noqa: E731
    w1, b1 = fusion.fc_in.weight.detach().to(h.dtype), fusion.fc_in.bias.detach().to(h.dtype)
    w2, b2 = fusion.fc_out.weight.detach().to(h.dtype), fusion.fc_out.bias.detach().to(h.dtype)
    inner = w1 @ torch.cat([rms(h), rms(e)]) + b1
    return h + w2 @ (inner * torch.sigmoid(inner)) + b2


def enumerated_conditional(head: CPDMTPHead, z: torch.Tensor) -> torch.Tensor:
    """P(x_{t+2..t+n} | h_t, x_{t+1}) over every continuation: shape (K,) * (n - 1), by explicit
    products of the gate and experts at z (K = the draft vocabulary's size, or V)."""
    w = head.log_gate(z[None])[0].exp()  # (r,)
    p = head.expert_log_probs(z[None])[0].exp()  # (n, r, K)
    n, k = p.shape[0], p.shape[-1]
    joint = torch.zeros((k,) * (n - 1), dtype=p.dtype)
    for xs in itertools.product(range(k), repeat=n - 1):
        prod = w.clone()
        for s, x in enumerate(xs, start=1):
            prod = prod * p[s, :, x]
        joint[xs] = prod.sum()
    return joint


def brute_force_position_nll(head: CPDMTPHead, hidden: torch.Tensor, labels: torch.Tensor):
    """(-l_t per position, positions with a target, targets): the definition, enumerated.

    l_t = log sum_a w_a(z_t) prod_{s=2..n, observed} p_{s,a}(x_{t+s} | z_t), z_t from the
    teacher-forced x_{t+1} = labels[t + 1]; missing offsets are summed out of the enumerated
    joint, and a position without x_{t+1} has no target.
    """
    cfg = head.config
    batch, seq = labels.shape
    nll = torch.zeros(batch, seq, dtype=torch.float64)
    positions = targets = 0
    for b, t in itertools.product(range(batch), range(seq)):
        if t + 1 >= seq or labels[b, t + 1] == IGNORE:
            continue
        joint = enumerated_conditional(head, z_by_hand(head, hidden[b, t], int(labels[b, t + 1])))
        index = []
        for s in range(2, cfg.n_future + 1):
            x = int(labels[b, t + s]) if t + s < seq else IGNORE
            pos = int(head.draft_position(torch.tensor(x))) if x != IGNORE else -1
            index.append(pos if pos >= 0 else slice(None))
        observed = sum(1 for i in index if not isinstance(i, slice))
        if observed == 0:
            continue
        prob = joint[tuple(index)].sum()
        nll[b, t] = -prob.log().double()
        positions += 1
        targets += observed
    return nll, positions, targets


# ---------------------------------------------------------------------------------------------
# The loss against enumeration.


@settings(max_examples=25, deadline=None)
@given(
    n_future=st.integers(2, 4),
    rank=st.integers(1, 3),
    expert_type=st.sampled_from(EXPERT_TYPES),
    impl=st.sampled_from(["reference", "chunked"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seq=st.integers(1, 6),
    ignore=st.sampled_from(["none", "random"]),
    draft_vocab=st.sampled_from([None, 3]),
    seed=st.integers(0, 2**16),
    fusion=st.sampled_from(["add", "mlp"]),
)
@example(
    n_future=2, rank=2, expert_type="linear", impl="reference", dtype=torch.float64, seq=1,
    ignore="none", draft_vocab=None, seed=0, fusion="add",
)  # T = 1: no position has x_{t+1}  # fmt: skip
def test_the_conditioned_loss_is_the_enumerated_conditional(
    n_future, rank, expert_type, impl, dtype, seq, ignore, draft_vocab, seed, fusion
):
    vocab = 4 if n_future == 4 else 5  # 4^3 continuations at most
    head = make_head(
        token_fusion=fusion,
        seed=seed % 11,
        dtype=dtype,
        n_future=n_future,
        rank=rank,
        expert_type=expert_type,
        vocab_size=vocab,
        loss_impl=impl,
        draft_vocab_size=draft_vocab,
    )
    g = torch.Generator().manual_seed(seed)
    if draft_vocab is not None:
        head.set_draft_vocab(torch.randperm(vocab, generator=g)[:draft_vocab])
    hidden = torch.randn(2, seq, 6, generator=g).to(dtype)
    labels = torch.randint(0, vocab, (2, seq), generator=g)
    if ignore == "random":
        labels[torch.rand(2, seq, generator=g) < 0.4] = IGNORE
    out = head(hidden, labels=labels)
    with torch.no_grad():
        want, positions, targets = brute_force_position_nll(head, hidden, labels)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.position_nll.double(), want, **tol)
    assert (int(out.num_positions), int(out.num_targets)) == (positions, targets)
    torch.testing.assert_close(
        out.joint_nll.double(), want.sum() / max(positions, 1), **tol, check_dtype=False
    )
    assert float(out.per_head_nll[0]) == 0.0  # offset 1 is the input, never a target
    # The head's own account of what it scored: offset 1 never, nor a position without x_{t+1}.
    scored = head.loss_targets(labels) != IGNORE
    assert not scored[..., 0].any() and int(scored.sum()) == targets


def test_the_window_of_a_position_whose_next_label_is_ignored_is_not_scored():
    head = make_head()
    hidden = torch.randn(1, 5, 6, dtype=torch.float64)
    labels = torch.tensor([[1, IGNORE, 2, 3, 4]])
    out = head(hidden, labels=labels)
    # Position 0 has no x_{t+1}: no target even though x_{t+2} = 2 is there. Position 1 has
    # x_{t+1} = 2 and x_{t+2} = 3 (n = 3: x_{t+3} = 4): two targets; position 2 has one.
    assert out.position_nll[0, 0] == 0
    assert (int(out.num_positions), int(out.num_targets)) == (2, 3)


# ---------------------------------------------------------------------------------------------
# C = 0: the unconditioned head, bit for bit.


@pytest.mark.parametrize("fusion", ["add", "mlp"])
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_a_new_conditioned_head_is_the_unconditioned_head(expert_type, fusion):
    kwargs = dict(n_future=4, rank=3, vocab_size=11, expert_type=expert_type, balance="switch")
    plain = make_head(seed=3, dtype=torch.float32, conditioned=False, **kwargs)
    config = CPDMTPConfig(
        **{**plain.config.to_dict(), "token_conditioned": True, "token_fusion": fusion}
    )
    table = torch.nn.Parameter(torch.randn(11, 6), requires_grad=False)
    cond = CPDMTPHead(config, unembedding=plain.weight, token_embedding=table)
    out_map = cond.token_proj.weight if fusion == "add" else cond.token_proj.fc_out.weight
    assert not out_map.any()  # a new head's fusion adds nothing
    missing, unexpected = cond.load_state_dict(plain.state_dict(), strict=False)
    assert {m.split(".")[0] for m in missing} == {"token_proj"} and not unexpected

    hidden = torch.randn(3, 7, 6)
    labels = torch.randint(0, 11, (3, 7))
    x1 = labels[:, 1]
    assert torch.equal(cond.conditioned_state(hidden[:, 0], x1), hidden[:, 0])
    # z = h exactly, so the gate and the experts of offsets >= 2 are the unconditioned head's,
    # computed by the same operations (the same offsets selected): identical bits.
    with torch.no_grad():  # as a decoder calls them (drafting runs without autograd)
        log_w, log_p = cond.draft_state(hidden[:, 0], x1)
        assert torch.equal(log_w, plain.log_gate(hidden[:, 0]))
        assert torch.equal(log_p[:, 1:], plain.expert_log_probs(hidden[:, 0], slice(1, 4)))
        assert not log_p[:, 0].any()  # offset 1: no evidence
        for depth in (1, 3):
            w, p = cond.draft_state(hidden[:, 0], x1, depth=depth)
            assert torch.equal(w, plain.log_gate(hidden[:, 0]))
            assert torch.equal(p[:, 1:], plain.expert_log_probs(hidden[:, 0], slice(1, depth + 1)))
            assert not p[:, 0].any()
    # The loss: the unconditioned head's experts on offsets 2..n, the same operations.
    out = cond(hidden, labels=labels)
    want = plain_loss_on_offsets_from_2(plain, hidden, labels)
    assert torch.equal(out.position_nll, want)


def plain_loss_on_offsets_from_2(plain: CPDMTPHead, hidden, labels) -> torch.Tensor:
    """-l_t of the unconditioned head with its offset-1 targets (and the windows of positions
    without x_{t+1}) removed, from its own gate and experts and the ops the head uses."""
    from cpd_mtp.ops.dispatch import row_logprobs_unchecked
    from cpd_mtp.ops.mixture import mixture_logsumexp

    cfg = plain.config
    n = cfg.n_future
    padded = torch.cat([labels, torch.full((labels.shape[0], n), IGNORE)], dim=1)
    targets = torch.stack([padded[:, s : s + labels.shape[1]] for s in range(1, n + 1)], -1)
    targets[targets[..., 0] == IGNORE] = IGNORE
    targets = targets[..., 1:].reshape(-1, n - 1)
    h = hidden.reshape(-1, hidden.shape[-1])
    u = plain.experts(h, slice(1, n))
    log_w = torch.log_softmax(plain.gate_logits(h).float(), -1)
    row_lp = row_logprobs_unchecked(
        u, plain.weight, targets, ignore_index=IGNORE, impl="auto", chunk_bytes=cfg.chunk_bytes
    )
    nll, _ = mixture_logsumexp(torch.cat([row_lp.new_zeros(len(h), 1, cfg.rank), row_lp], 1), log_w)
    return nll.masked_fill(~(targets != IGNORE).any(-1), 0.0).view(labels.shape)


# ---------------------------------------------------------------------------------------------
# Gradients, distillation, state.


def test_gradients_reach_c_and_never_the_embedding():
    head = make_head(dtype=torch.float32, rank=2, expert_type="resblock")
    with torch.no_grad():
        head.token_proj.weight.zero_()  # even at its initial zero, C gets a gradient
    head.token_embedding.requires_grad_(True)  # trainable or not, the head never trains it
    hidden = torch.randn(2, 6, 6)
    labels = torch.randint(0, 5, (2, 6))
    for distill in (None, (0.7, 0.8)):
        head.zero_grad(set_to_none=True)
        head(hidden, labels=labels, distill=distill).loss.backward()
        assert (
            head.token_proj.weight.grad is not None and head.token_proj.weight.grad.abs().sum() > 0
        )
        assert head.token_embedding.grad is None
        for name in ("gate.weight", "experts.proj_in", "experts.proj_out"):
            assert head.get_parameter(name).grad.abs().sum() > 0, name


def test_the_distillation_window_starts_at_offset_2():
    head = make_head(dtype=torch.float64, n_future=3, rank=2, vocab_size=7)
    hidden = torch.randn(2, 6, 6, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 6))
    labels[1, 2] = IGNORE
    exact = head(hidden, labels=labels)
    # beta = 0, gamma = 1: the window's NLL terms are the chain rule of the exact conditional
    # joint NLL of offsets 2..n (an offset-1 term would add to it), averaged over all positions.
    nll_only = head(hidden, labels=labels, distill=(0.0, 1.0))
    n_pos = labels.numel()
    torch.testing.assert_close(
        nll_only.loss - nll_only.aux_loss, exact.joint_nll * exact.num_positions / n_pos
    )
    # beta = 1: the KL of offset 2 at position t is KL(softmax(W_U h_{t+1}) || q_2(. | z_t)),
    # counted where x_{t+1} is there; offset 1 has none.
    kl = head(hidden, labels=labels, distill=(1.0, 0.8)).distill_kl
    assert kl[0] == 0
    terms = []
    for b, t in itertools.product(range(2), range(5)):
        if labels[b, t + 1] == IGNORE:
            continue
        teacher = torch.log_softmax(head.weight @ hidden[b, t + 1], -1)
        z = z_by_hand(head, hidden[b, t], int(labels[b, t + 1]))
        q2 = enumerated_conditional(head, z).sum(dim=1).log()
        terms.append((teacher.exp() * (teacher - q2)).sum())
    torch.testing.assert_close(kl[1], torch.stack(terms).mean())


def test_the_embedding_is_shared_read_only_and_never_in_the_state_dict():
    table = torch.nn.Parameter(torch.randn(5, 6), requires_grad=False)
    lm_head = torch.nn.Linear(6, 5, bias=False)
    head = CPDMTPHead.from_linear(
        lm_head, 3, 2, next_token="base", token_conditioned=True, token_embedding=table
    )
    assert head.token_embedding is table and head.weight is lm_head.weight
    assert "token_embedding" in SHARED_KEYS
    state = head.state_dict()
    assert "token_embedding" not in state and "token_proj.weight" in state
    other = CPDMTPHead.from_linear(
        torch.nn.Linear(6, 5, bias=False), 3, 2, next_token="base", token_conditioned=True
    )
    assert other.token_embedding is other.weight  # None: W_U, as in a tied model
    other.load_state_dict(state, strict=False)  # W_U is missing, nothing else
    assert torch.equal(other.token_proj.weight, head.token_proj.weight)
    with pytest.raises(RuntimeError, match=r"Unexpected key.*token_embedding"):
        other.load_state_dict({**state, "token_embedding": table.detach()})
    # Moving the head moves the shared table with it, still shared.
    head.double()
    assert head.token_embedding is table and table.dtype == torch.float64


def test_metrics_of_a_conditioned_head_have_no_offset_1():
    head = make_head(dtype=torch.float32)
    hidden = torch.randn(2, 8, 6)
    labels = torch.randint(0, 5, (2, 8))
    metrics = HeadMetrics.for_head(head)
    metrics.add(head, head(hidden, labels=labels), labels)
    means = metrics.pop()
    assert "head_nll/1" not in means and {"head_nll/2", "head_nll/3"} <= set(means)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"next_token": "marginal"}, "token_conditioned needs next_token='base'"),
        ({"n_future": 1}, "token_conditioned needs n_future >= 2"),
        ({"token_conditioned": 1}, "token_conditioned must be True or False"),
    ],
)
def test_bad_conditioned_configs_are_value_errors(kwargs, message):
    settings = {"next_token": "base", "token_conditioned": True, **kwargs}
    with pytest.raises(ValueError, match=message):
        CPDMTPConfig(hidden_size=4, vocab_size=7, **settings)


def test_bad_conditioned_inputs_are_value_errors():
    head = make_head(dtype=torch.float32)
    hidden = torch.randn(2, 6)
    with pytest.raises(ValueError, match="pass next_token"):
        head.draft_state(hidden)
    with pytest.raises(ValueError, match="next_token must have shape"):
        head.draft_state(hidden, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="token_embedding must be a tensor of shape"):
        head.attach_token_embedding(torch.zeros(4, 6))
    with pytest.raises(ValueError, match="not token_conditioned"):
        make_head(conditioned=False).attach_token_embedding(torch.zeros(5, 6))


def test_the_triton_loss_agrees():
    """The experts' output u is what changes, not the ops: ``triton`` (the interpreter on a CPU)
    gives the reference loss and gradients of a conditioned head."""
    head = make_head(dtype=torch.float32, n_future=3, rank=2, vocab_size=37)
    hidden = torch.randn(2, 5, 6)
    labels = torch.randint(0, 37, (2, 5))
    grads = {}
    for impl in ("reference", "triton"):
        head.config.loss_impl = impl
        head.zero_grad(set_to_none=True)
        out = head(hidden, labels=labels)
        out.loss.backward()
        grads[impl] = (out.loss.detach(), head.token_proj.weight.grad.clone())
    torch.testing.assert_close(grads["triton"][0], grads["reference"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["triton"][1], grads["reference"][1], rtol=1e-4, atol=1e-5)
