"""Load balancing and expert statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpd_mtp import CPDMTPConfig, CPDMTPHead
from cpd_mtp.balance import balance_loss, expert_statistics, router_z_loss


def log_probs(rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def test_switch_is_one_at_a_uniform_split():
    uniform = log_probs([[0.25] * 4] * 3)
    assert balance_loss(uniform, uniform.exp(), "switch").item() == pytest.approx(1.0)
    assert balance_loss(uniform, uniform.exp(), "importance").item() == pytest.approx(1.0)


def test_switch_grows_with_imbalance():
    values = []
    for peak in [0.25, 0.4, 0.7, 0.97]:
        rest = (1 - peak) / 3
        log_w = log_probs([[peak, rest, rest, rest]] * 5)
        values.append(balance_loss(log_w, log_w.exp(), "switch").item())
    assert values == sorted(values) and values[0] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(4 * (0.97**2 + 3 * 0.01**2))  # r · sum P_a f_a


@settings(max_examples=30, deadline=None)
@given(rank=st.integers(1, 6), tokens=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_importance_is_one_plus_squared_cv(rank, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    log_w = torch.log_softmax(torch.randn(tokens, rank, generator=g, dtype=torch.float64) * 3, -1)
    mean = log_w.exp().mean(0)
    cv2 = (mean.std(unbiased=False) / mean.mean()) ** 2
    torch.testing.assert_close(balance_loss(log_w, log_w.exp(), "importance"), 1 + cv2)
    # switch with f = P is r · sum P², the same number; never below 1 (Cauchy-Schwarz).
    sw = balance_loss(log_w, mean.expand(tokens, rank), "switch")
    torch.testing.assert_close(sw, 1 + cv2)
    assert sw >= 1 - 1e-12


def test_switch_gradient_flows_through_weights_only():
    log_w = log_probs([[0.6, 0.4], [0.2, 0.8]]).requires_grad_()
    gamma = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    balance_loss(log_w, gamma, "switch").backward()
    assert gamma.grad is None
    f = gamma.detach().mean(0)
    # d/d log w_{t,a} of r · sum_a f_a mean_t w_{t,a} is r · f_a · w_{t,a} / N
    torch.testing.assert_close(log_w.grad, 2 * f * log_w.detach().exp() / 2)


def test_none_is_zero():
    assert balance_loss(log_probs([[0.9, 0.1]]), log_probs([[0.9, 0.1]]).exp(), "none") == 0


def test_router_z_loss_by_hand():
    z = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    want = (math.log(2) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert router_z_loss(z).item() == pytest.approx(want)


def test_expert_statistics_on_hand_made_gates():
    log_w = log_probs([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    gamma = torch.tensor([[0.2, 0.8, 0.0], [0.6, 0.0, 0.4]], dtype=torch.float64)
    stats = expert_statistics(log_w, gamma)
    torch.testing.assert_close(stats["expert_weight"], torch.tensor([0.75, 0.25, 0.0]).double())
    torch.testing.assert_close(
        stats["expert_responsibility"], torch.tensor([0.4, 0.4, 0.2]).double()
    )
    assert stats["gate_entropy"].item() == pytest.approx(math.log(2) / 2)


def test_head_reports_balance_and_stats_from_its_gate():
    torch.manual_seed(0)
    cfg = CPDMTPConfig(
        hidden_size=8,
        vocab_size=11,
        n_future=2,
        rank=3,
        balance="switch",
        balance_coef=0.3,
        router_z_coef=0.1,
        expert_type="lowrank",
        expert_inner_size=2,
    )
    head = CPDMTPHead(cfg).double()
    hidden = torch.randn(2, 5, 8, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1:] = -100  # position (0,0) has no target and must not count
    out = head(hidden, labels=labels)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, :] = False
    keep[1, -1] = False
    z = head.gate(hidden)[keep]
    w = torch.softmax(z, -1)
    assert int(out.num_positions) == int(keep.sum())
    torch.testing.assert_close(out.expert_weight, w.mean(0))
    torch.testing.assert_close(out.expert_responsibility.sum(), torch.tensor(1.0).double())
    f = out.expert_responsibility
    want = 0.3 * 3 * (f * w.mean(0)).sum() + 0.1 * torch.logsumexp(z, -1).square().mean()
    torch.testing.assert_close(out.aux_loss, want)
    torch.testing.assert_close(out.loss, out.joint_nll + out.aux_loss)


def test_expert_statistics_of_no_rows_are_zero_not_nan():
    rank = 3
    stats = expert_statistics(torch.zeros(0, rank), torch.zeros(0, rank))
    torch.testing.assert_close(stats["expert_weight"], torch.zeros(rank))
    torch.testing.assert_close(stats["expert_responsibility"], torch.zeros(rank))
    torch.testing.assert_close(stats["gate_entropy"], torch.zeros(()))
