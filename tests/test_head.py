"""CPDMTPHead against brute-force enumeration and torch's own cross-entropy."""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cpd_mtp.head as head_module
from cpd_mtp import CPDMTPConfig, CPDMTPHead, CPDMTPHeadOutput, ops
from cpd_mtp.ops import checks

EXPERT_TYPES = ["linear", "resblock", "lowrank"]


def make_head(seed=0, dtype=torch.float64, **kwargs) -> CPDMTPHead:
    torch.manual_seed(seed)
    defaults = dict(
        hidden_size=6,
        vocab_size=5,
        n_future=3,
        rank=4,
        expert_type="linear",
        expert_init_noise=1.0,
        expert_inner_size=3,
        balance="none",
    )
    head = CPDMTPHead(CPDMTPConfig(**{**defaults, **kwargs})).to(dtype)
    with torch.no_grad():  # a spread-out gate and W_U so every expert matters
        head.gate.weight.normal_(0, 1.0)
        head.weight.normal_(0, 1.0)
    return head


def enumerated_joint(head: CPDMTPHead, h: torch.Tensor) -> torch.Tensor:
    """P(x_1..x_n | h) for every continuation, by explicit products: shape (V,) * n."""
    log_w, log_p = head.draft_state(h[None])  # (1, r), (1, n, r, V)
    w, p = log_w[0].exp(), log_p[0].exp()
    n, vocab = p.shape[0], p.shape[-1]
    joint = torch.zeros((vocab,) * n, dtype=p.dtype)
    for xs in itertools.product(range(vocab), repeat=n):
        prod = w.clone()
        for s, x in enumerate(xs):
            prod = prod * p[s, :, x]
        joint[xs] = prod.sum()
    return joint


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_brute_force_enumeration(expert_type):
    head = make_head(expert_type=expert_type)
    vocab, n = 5, 3
    torch.manual_seed(1)
    h = torch.randn(6, dtype=torch.float64)
    joint = enumerated_joint(head, h)
    torch.testing.assert_close(joint.sum(), torch.tensor(1.0, dtype=torch.float64))
    # The next-token marginal is exp(head(hidden)).
    torch.testing.assert_close(joint.sum(dim=(1, 2)), head(h[None, None])[0, 0].exp())
    # The loss of every continuation is -log of its enumerated probability. A sequence of
    # length n+1 puts all n targets on position 0; later positions only see fewer targets.
    conts = torch.tensor(list(itertools.product(range(vocab), repeat=n)))
    labels = torch.cat([torch.zeros(len(conts), 1, dtype=torch.long), conts], dim=1)
    hidden = torch.randn(len(conts), n + 1, 6, dtype=torch.float64)
    hidden[:, 0] = h
    out = head(hidden, labels=labels)
    assert (out.num_targets, out.num_positions) == (len(conts) * 6, len(conts) * 3)
    nll = out.position_nll[:, 0]
    torch.testing.assert_close(nll, -joint.log().flatten(), rtol=1e-9, atol=1e-9)


def test_sequence_end_marginalises_missing_targets():
    """At the last-but-one position only x_{t+1} exists: its loss is the enumerated marginal."""
    head = make_head()
    torch.manual_seed(2)
    hidden = torch.randn(1, 2, 6, dtype=torch.float64)
    joint = enumerated_joint(head, hidden[0, 0])
    for x in range(5):
        out = head(hidden, labels=torch.tensor([[0, x]]))
        assert int(out.num_positions) == 1 and int(out.num_targets) == 1
        torch.testing.assert_close(out.joint_nll, -joint.sum(dim=(1, 2))[x].log())


def test_ignore_index_marginalises_a_middle_target():
    head = make_head()
    torch.manual_seed(3)
    hidden = torch.randn(1, 4, 6, dtype=torch.float64)
    joint = enumerated_joint(head, hidden[0, 0])
    labels = torch.tensor([[0, 2, -100, 4]])
    # Position 0 has targets (2, ·, 4); positions 1 and 2 have other targets: isolate position 0.
    pos0 = head(hidden, labels=labels).position_nll[0, 0]
    torch.testing.assert_close(pos0, -joint[2, :, 4].sum().log())


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_conditionals_match_enumerated_joint(expert_type):
    head = make_head(expert_type=expert_type, seed=4)
    torch.manual_seed(5)
    h = torch.randn(6, dtype=torch.float64)
    joint = enumerated_joint(head, h)
    log_w, log_p = head.draft_state(h[None])
    for prefix in [(), (3,), (1, 4)]:
        _, log_q = CPDMTPHead.conditional(log_w, log_p, torch.tensor([prefix], dtype=torch.long))
        slice_ = joint[prefix]
        while slice_.dim() > 1:  # marginalise the offsets after the next one
            slice_ = slice_.sum(dim=-1)
        torch.testing.assert_close(log_q[0].exp(), slice_ / slice_.sum())


def test_n1_r1_equals_cross_entropy():
    head = make_head(n_future=1, rank=1, vocab_size=11, balance="switch", balance_coef=0.5)
    torch.manual_seed(6)
    hidden = torch.randn(2, 7, 6, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 7))
    labels[1, 3] = -100
    out = head(hidden, labels=labels)
    logits = head.experts(hidden)[..., 0, 0, :] @ head.weight.T  # (B, T, V)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.joint_nll, ce)
    torch.testing.assert_close(out.per_head_nll[0], ce)
    torch.testing.assert_close(out.logits, torch.log_softmax(logits, -1))
    torch.testing.assert_close(out.aux_loss, torch.tensor(0.5, dtype=torch.float64))  # r=1: 1


def test_rank1_equals_sum_of_independent_cross_entropies():
    head = make_head(rank=1, n_future=3, vocab_size=9)
    torch.manual_seed(7)
    hidden = torch.randn(3, 8, 6, dtype=torch.float64)
    labels = torch.randint(0, 9, (3, 8))
    labels[0, 5] = -100
    out = head(hidden, labels=labels)
    logits = head.experts(hidden)[..., 0, :] @ head.weight.T  # (B, T, n, V)
    total, positions = 0.0, torch.zeros(3, 8, dtype=torch.bool)
    for s in range(1, 4):
        tgt = labels[:, s:]
        ce = F.cross_entropy(logits[:, :-s, s - 1].reshape(-1, 9), tgt.reshape(-1), reduction="sum")
        total = total + ce
        positions[:, :-s] |= tgt != -100
        per_head = F.cross_entropy(logits[:, :-s, s - 1].reshape(-1, 9), tgt.reshape(-1))
        torch.testing.assert_close(out.per_head_nll[s - 1], per_head)
    torch.testing.assert_close(out.joint_nll, total / positions.sum())


def test_identical_experts_equal_rank1():
    one = make_head(rank=1, seed=8)
    many = make_head(rank=4, seed=9)
    with torch.no_grad():
        many.weight.copy_(one.weight)
        many.experts.proj.copy_(one.experts.proj.repeat_interleave(4, dim=0))
    torch.manual_seed(10)
    hidden = torch.randn(2, 6, 6, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 6))
    a, b = one(hidden, labels=labels), many(hidden, labels=labels)
    torch.testing.assert_close(a.joint_nll, b.joint_nll)
    torch.testing.assert_close(a.logits, b.logits)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_permuting_experts_changes_nothing(expert_type):
    head = make_head(expert_type=expert_type, seed=11, balance="switch")
    perm = torch.tensor([2, 0, 3, 1])
    permuted = make_head(expert_type=expert_type, seed=12, balance="switch")
    permuted.load_state_dict(head.state_dict())
    with torch.no_grad():
        permuted.gate.weight.copy_(head.gate.weight[perm])
        permuted.gate.bias.copy_(head.gate.bias[perm])
        for name, param in permuted.experts.named_parameters():
            src = getattr(head.experts, name).view(3, 4, *param.shape[1:])
            param.copy_(src[:, perm].reshape(param.shape))
    torch.manual_seed(13)
    hidden = torch.randn(2, 6, 6, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 6))
    a, b = head(hidden, labels=labels), permuted(hidden, labels=labels)
    for field in ("loss", "joint_nll", "per_head_nll", "aux_loss", "logits", "gate_entropy"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field))
    torch.testing.assert_close(a.expert_weight[perm], b.expert_weight)


@settings(max_examples=20, deadline=None)
@given(
    n_future=st.integers(1, 4),
    rank=st.integers(1, 4),
    expert_type=st.sampled_from(EXPERT_TYPES),
    impl=st.sampled_from(["reference", "chunked"]),
    seq=st.integers(1, 6),
)
def test_marginal_is_normalised_and_loss_matches_across_impls(
    n_future, rank, expert_type, impl, seq
):
    head = make_head(n_future=n_future, rank=rank, expert_type=expert_type, vocab_size=13)
    hidden = torch.randn(2, seq, 6, dtype=torch.float64)
    labels = torch.randint(0, 13, (2, seq))
    logp = head(hidden)
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(2, seq, dtype=torch.float64))
    ref = head(hidden, labels=labels)
    head.config.loss_impl = impl
    out = head(hidden, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.logits, logp)


def test_gradients_reach_every_parameter_and_shared_weight():
    lm_head = torch.nn.Linear(6, 5, bias=False)
    head = CPDMTPHead.from_linear(lm_head, n_future=2, rank=3, expert_type="resblock")
    assert head.weight is lm_head.weight
    hidden = torch.randn(2, 5, 6)
    head(hidden, labels=torch.randint(0, 5, (2, 5))).loss.backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert lm_head.weight.grad is not None


def test_from_linear_starts_near_the_original_lm_head():
    torch.manual_seed(14)
    lm_head = torch.nn.Linear(32, 50, bias=False)
    head = CPDMTPHead.from_linear(
        lm_head, n_future=2, rank=1, expert_type="linear", expert_init_noise=0.0
    )
    hidden = torch.randn(3, 32)
    torch.testing.assert_close(head(hidden), torch.log_softmax(lm_head(hidden), -1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"n_future": 0}, "n_future must be an integer >= 1"),
        ({"rank": 1.5}, "rank must be an integer"),
        ({"expert_type": "mlp"}, "expert_type must be one of"),
        ({"balance": "aux"}, "balance must be one of"),
        ({"loss_impl": "cuda"}, "loss_impl must be one of"),
        ({"balance_coef": -1.0}, "balance_coef must be >= 0"),
    ],
)
def test_bad_config_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CPDMTPConfig(hidden_size=4, vocab_size=7, **kwargs)


def test_bad_forward_input_is_a_value_error():
    head = make_head(dtype=torch.float32)
    hidden = torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match="hidden must be a floating tensor"):
        head(torch.ones(2, 4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="last dimension hidden_size=6"):
        head(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="labels must have shape"):
        head(hidden, labels=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels holds 5, outside \[0, 5\)"):
        head(hidden, labels=torch.full((2, 4), 5))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        head(hidden, labels=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="lm_head has a bias"):
        CPDMTPHead.from_linear(torch.nn.Linear(6, 5), n_future=2, rank=2)
    with pytest.raises(ValueError, match="chosen must hold"):
        log_w, log_p = head.draft_state(hidden[:, 0])
        CPDMTPHead.conditional(log_w, log_p, torch.zeros(2, 3, dtype=torch.long))


def reference_loss_terms(head: CPDMTPHead, hidden: torch.Tensor, labels: torch.Tensor) -> dict:
    """The head's loss and statistics position by position, from their definitions."""
    cfg = head.config
    n, r = cfg.n_future, cfg.rank
    batch, seq = labels.shape
    nll_sum, num_targets, rows = 0.0, 0, []  # rows: (log w, gamma, has a target, gate logits)
    head_nll, head_count = torch.zeros(n, dtype=torch.float64), torch.zeros(n)
    position_nll = torch.zeros(batch, seq, dtype=torch.float64)
    for b, t in itertools.product(range(batch), range(seq)):
        h = hidden[b, t]
        z = head.gate(h)  # (r,)
        log_w = torch.log_softmax(z, -1)
        log_p = torch.log_softmax(head.experts(h[None])[0] @ head.weight.T, -1)  # (n, r, V)
        joint, observed = log_w.clone(), 0
        for s in range(1, n + 1):
            if t + s < seq and labels[b, t + s] != cfg.ignore_index:
                x = labels[b, t + s]
                joint = joint + log_p[s - 1, :, x]
                head_nll[s - 1] -= torch.logsumexp(log_w + log_p[s - 1, :, x], 0)
                head_count[s - 1] += 1
                observed += 1
        if observed:
            position_nll[b, t] = -torch.logsumexp(joint, 0)
            nll_sum = nll_sum + position_nll[b, t]
        num_targets += observed
        rows.append((log_w, torch.softmax(joint, -1), observed > 0, z))
    with_target = [row for row in rows if row[2]]
    stat_rows = with_target or rows  # no target anywhere: every position, where gamma = w
    if stat_rows:
        weight = torch.stack([row[0].exp() for row in stat_rows]).mean(0)
        resp = torch.stack([row[1] for row in stat_rows]).mean(0)
        entropy = torch.stack([-(row[0].exp() * row[0]).sum() for row in stat_rows]).mean()
    else:
        weight = resp = torch.zeros(r, dtype=torch.float64)
        entropy = torch.zeros((), dtype=torch.float64)
    aux = torch.zeros((), dtype=torch.float64)
    if with_target:
        mean_w = torch.stack([row[0].exp() for row in with_target]).mean(0)
        mean_f = torch.stack([row[1] for row in with_target]).mean(0)
        z_loss = torch.stack([torch.logsumexp(row[3], 0) ** 2 for row in with_target]).mean()
        aux = cfg.balance_coef * r * (mean_f * mean_w).sum() + cfg.router_z_coef * z_loss
    joint_nll = torch.as_tensor(nll_sum, dtype=torch.float64) / max(len(with_target), 1)
    return {
        "loss": joint_nll + aux,
        "joint_nll": joint_nll,
        "joint_nll_per_target": torch.as_tensor(nll_sum, dtype=torch.float64) / max(num_targets, 1),
        "per_head_nll": head_nll / head_count.clamp(min=1),
        "aux_loss": aux,
        "position_nll": position_nll,
        "expert_weight": weight,
        "expert_responsibility": resp,
        "gate_entropy": entropy,
        "num_positions": len(with_target),
        "num_targets": num_targets,
    }


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(0, 3),
    seq=st.integers(0, 5),
    n_future=st.integers(1, 3),
    rank=st.integers(1, 3),
    ignore=st.sampled_from(["none", "all", "random", "tail"]),
    seed=st.integers(0, 2**16),
)
@example(batch=0, seq=4, n_future=2, rank=3, ignore="none", seed=0)  # B = 0
@example(batch=2, seq=0, n_future=2, rank=3, ignore="none", seed=1)  # T = 0
@example(batch=2, seq=1, n_future=3, rank=2, ignore="none", seed=2)  # T = 1: no target
@example(batch=2, seq=4, n_future=2, rank=3, ignore="all", seed=3)  # every label ignored
def test_degenerate_shapes_and_ignore_patterns_match_the_definition(
    batch, seq, n_future, rank, ignore, seed
):
    """B or T = 0, T = 1 and all-ignored labels: finite, defined outputs that match a
    position-by-position computation, and a loss that backward accepts."""
    head = make_head(
        seed=seed % 7,
        n_future=n_future,
        rank=rank,
        balance="switch",
        balance_coef=0.3,
        router_z_coef=0.1,
    )
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, 6, dtype=torch.float64, generator=g).requires_grad_()
    labels = torch.randint(0, 5, (batch, seq), generator=g)
    if ignore == "all":
        labels[:] = -100
    elif ignore == "random":
        labels[torch.rand(batch, seq, generator=g) < 0.5] = -100
    elif ignore == "tail":
        labels[:, seq // 2 :] = -100
    out = head(hidden, labels=labels)
    with torch.no_grad():
        want = reference_loss_terms(head, hidden, labels)
    assert int(out.num_positions) == want["num_positions"]
    assert int(out.num_targets) == want["num_targets"]
    for name in (
        "loss",
        "joint_nll",
        "joint_nll_per_target",
        "per_head_nll",
        "aux_loss",
        "position_nll",
        "expert_weight",
        "expert_responsibility",
        "gate_entropy",
    ):
        got = getattr(out, name)
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.to(torch.float64), want[name], msg=name)
    if batch * seq:  # at least one position: the statistics are distributions over experts
        torch.testing.assert_close(out.expert_weight.sum(), torch.tensor(1.0).double())
        torch.testing.assert_close(out.expert_responsibility.sum(), torch.tensor(1.0).double())
    assert out.logits.shape == (batch, seq, 5)
    torch.testing.assert_close(out.logits, head(hidden))
    out.loss.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    for name, param in head.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if want["num_positions"] == 0:  # nothing observed: the loss is a constant 0
            assert not param.grad.any(), name


# ---------------------------------------------------------------------------------------------
# The output: a dict with attribute access (what DeepSpeed ZeRO-3 and transformers walk into).


def test_output_is_a_dict_whose_attributes_read_through_it():
    head = make_head()
    hidden = torch.randn(2, 4, 6, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 4))
    out = head(hidden, labels=labels, return_logits=False)
    assert isinstance(out, dict)
    assert out.logits is None and "logits" not in out  # a None field is not a key
    assert list(out) == [f for f in CPDMTPHeadOutput.FIELDS if f not in ("logits", "distill_kl")]
    assert out.to_tuple() == tuple(out.values())
    for key in out:
        assert getattr(out, key) is out[key]
    # ZeRO-3 replaces every tensor in place (``value[key] = ...``); attributes must see it.
    for key in list(out.keys()):
        out[key] = out[key] * 1
        assert getattr(out, key) is out[key]
    # transformers / accelerate rebuild a mapping as ``type(out)({...})``.
    rebuilt = type(out)({k: v.detach() for k, v in out.items()})
    assert isinstance(rebuilt, CPDMTPHeadOutput) and rebuilt.keys() == out.keys()
    copied = pickle.loads(pickle.dumps(rebuilt))
    assert isinstance(copied, CPDMTPHeadOutput)
    torch.testing.assert_close(copied.joint_nll, out.joint_nll)
    out.logits = torch.zeros(1)
    assert "logits" in out and out.to_tuple()[1] is out.logits
    out.logits = None
    assert "logits" not in out
    with pytest.raises(AttributeError):
        out.no_such_field = 1
    with pytest.raises(AttributeError):
        _ = out.no_such_field
    with pytest.raises(TypeError, match="no fields"):
        CPDMTPHeadOutput(lossy=1)


def test_a_training_step_checks_its_labels_once(monkeypatch):
    """The head checks labels itself and runs the loss unchecked: one range check per step."""
    calls = []

    def counting(real):
        def check(*args, **kwargs):
            calls.append(real.__name__)
            return real(*args, **kwargs)

        return check

    monkeypatch.setattr(checks, "check_targets", counting(checks.check_targets))
    monkeypatch.setattr(head_module, "check_targets", counting(head_module.check_targets))
    monkeypatch.setattr(ops, "check_mixture_args", counting(ops.check_mixture_args))
    for impl in ("reference", "chunked"):
        calls.clear()
        head = make_head(loss_impl=impl)
        out = head(torch.randn(2, 4, 6, dtype=torch.float64), labels=torch.randint(0, 5, (2, 4)))
        out.loss.backward()
        assert calls == ["check_targets"], impl
    with pytest.raises(ValueError, match=r"labels holds 7"):
        head(torch.randn(2, 4, 6, dtype=torch.float64), labels=torch.full((2, 4), 7))


# ---------------------------------------------------------------- base mode, draft vocabulary


def _base_head(vocab=30, dim=8, n_future=3, rank=2, draft=None, seed=0):
    torch.manual_seed(seed)
    kwargs = {"draft_vocab_size": len(draft)} if draft is not None else {}
    config = CPDMTPConfig(
        dim,
        vocab,
        n_future=n_future,
        rank=rank,
        next_token="base",
        expert_init_noise=0.3,
        loss_impl="reference",
        **kwargs,
    )
    head = CPDMTPHead(config)
    if draft is not None:
        head.set_draft_vocab(torch.tensor(draft))
    return head


def test_base_mode_scores_are_the_lm_head_logits():
    head = _base_head()
    hidden = torch.randn(2, 5, 8)
    assert torch.equal(head(hidden), torch.nn.functional.linear(hidden, head.weight))


def test_draft_vocabulary_loss_equals_a_head_over_those_rows():
    draft = [1, 4, 5, 9, 11, 20, 29]
    head = _base_head(draft=draft)
    # The reference: an ordinary head over K = 7 ids whose W_U is those rows, labels remapped,
    # tokens outside the draft vocabulary ignored.
    config = CPDMTPConfig(8, 7, n_future=3, rank=2, expert_init_noise=0.3, loss_impl="reference")
    ref = CPDMTPHead(config)
    ref.load_state_dict({**head.state_dict(), "weight": head.weight[draft]}, strict=False)
    hidden = torch.randn(3, 6, 8)
    labels = torch.randint(0, 30, (3, 6))
    labels[0, :3] = torch.tensor([4, 9, 29])
    remap = torch.full((30,), -100)
    remap[draft] = torch.arange(7)
    out, want = head(hidden, labels, return_logits=False), ref(hidden, remap[labels])
    torch.testing.assert_close(out.loss, want.loss)
    torch.testing.assert_close(out.per_head_nll, want.per_head_nll)
    assert int(out.num_targets) == int(want.num_targets)
    out.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(head.experts.proj_in.grad, ref.experts.proj_in.grad)


def test_distill_with_beta_0_and_gamma_1_is_the_exact_joint_nll():
    head = _base_head()
    hidden, labels = torch.randn(2, 7, 8), torch.randint(0, 30, (2, 7))
    labels[1, 2] = -100
    plain = head(hidden, labels, return_logits=False)
    distilled = head(hidden, labels, return_logits=False, distill=(0.0, 1.0))
    # The same sum of per-position NLLs; the distillation mean is over every position.
    n_pos = labels.numel()
    torch.testing.assert_close(
        distilled.loss - distilled.aux_loss,
        plain.joint_nll * plain.num_positions / n_pos,
    )


def test_distill_teacher_is_the_models_own_next_token_distribution():
    """beta = 1, one offset: the loss is KL(softmax(W_U h_t) || marginal over the experts)."""
    head = _base_head(n_future=1)
    hidden, labels = torch.randn(1, 4, 8), torch.randint(0, 30, (1, 4))
    out = head(hidden, labels, return_logits=False, distill=(1.0, 0.8))
    log_p = torch.log_softmax(hidden[0] @ head.weight.T, -1)  # (T, V) teacher
    log_q = head.marginal_log_probs(hidden[0])  # (T, V) the CP marginal
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    torch.testing.assert_close(out.loss - out.aux_loss, kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.distill_kl, kl[None], rtol=1e-5, atol=1e-6)
