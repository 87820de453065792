"""Drafters (``cpd_mtp.decoding.drafters``): the CP conditionals against the enumerated joint."""

from __future__ import annotations

import pytest
import torch
from decoding_builders import enumerate_joint, random_head_model

from cpd_mtp.decoding import CPDrafter, Drafter, UniformDrafter, generate
from cpd_mtp.decoding.drafters import propose
from cpd_mtp.head import CPDMTPHead


class RecordingDrafter(CPDrafter):
    def __init__(self, head):
        super().__init__(head)
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def start(self, hidden, num_drafts, **kwargs):
        state = super().start(hidden, num_drafts, **kwargs)
        return (hidden.clone(), state)

    def next(self, state, chosen):
        hidden, inner = state
        log_q = super().next(inner, chosen)
        self.records.append((hidden, chosen.clone(), log_q.clone()))
        return log_q


@pytest.mark.parametrize("do_sample", [False, True])
def test_draft_conditionals_equal_enumerated_joint(do_sample):
    model = random_head_model(vocab=4, n_future=3, rank=3, seed=9)
    prompt = torch.tensor([[2, 0, 3, 1, 1]])
    drafter = RecordingDrafter(model.head)
    out = generate(
        model,
        prompt,
        9,
        do_sample=do_sample,
        drafter=drafter,
        generator=torch.Generator().manual_seed(0),
    )
    seq = out.sequences
    with torch.no_grad():  # cache-free hidden states of the final sequence
        full_hidden, _ = model.trunk_hidden(seq)
        log_w, log_p = model.head.draft_state(full_hidden[0])  # (T, r), (T, n, r, V)
    assert len(drafter.records) >= 4
    for anchor, chosen, log_q in drafter.records:
        # The anchor is the hidden state of an accepted position t, and x_{t+1} = chosen[0].
        dist = (full_hidden[0] - anchor[0]).abs().amax(-1)
        t = int(dist.argmin())
        assert float(dist[t]) < 1e-4
        assert int(seq[0, t + 1]) == int(chosen[0, 0])
        joint = enumerate_joint(log_w[t], log_p[t])  # over (x_{t+1}, .., x_{t+n})
        fixed = joint[
            tuple(chosen[0].tolist())
        ]  # (V,)*(n-k) over the free offsets, k = chosen.shape[1]
        conditional = torch.logsumexp(fixed.reshape(4, -1), dim=1) if fixed.dim() > 1 else fixed
        conditional = conditional - torch.logsumexp(conditional, 0)
        torch.testing.assert_close(log_q[0].double(), conditional, atol=1e-5, rtol=1e-5)


def test_start_is_the_same_with_or_without_the_decoders_pieces():
    model = random_head_model(vocab=5, n_future=4, rank=2, seed=1)
    head, drafter = model.head, CPDrafter(model.head)
    hidden = torch.randn(3, head.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = head.marginal_and_pieces(hidden)[1:]
        log_w_all, log_p_all = head.draft_state(hidden)
    for num_drafts in range(4):
        for given in (None, first):
            log_w, log_p = drafter.start(hidden, num_drafts, first=given)
            torch.testing.assert_close(log_w, log_w_all)
            torch.testing.assert_close(log_p, log_p_all[:, : num_drafts + 1])


def test_propose_greedy_chains_argmax_and_uniform_is_uniform():
    model = random_head_model(vocab=5, n_future=3, rank=2, seed=3)
    head = model.head
    hidden = torch.randn(2, head.config.hidden_size, generator=torch.Generator().manual_seed(4))
    first_token = torch.tensor([1, 4])
    with torch.no_grad():
        drafts, log_q = propose(CPDrafter(head), hidden, first_token, 2, warp=None)
        log_w, log_p = head.draft_state(hidden)
    assert log_q is None and drafts.shape == (2, 2)
    chosen = first_token[:, None]
    for k in range(2):
        want = CPDMTPHead.conditional(log_w, log_p, chosen)[1].argmax(-1)
        assert torch.equal(drafts[:, k], want)
        chosen = torch.cat([chosen, want[:, None]], dim=1)
    uniform = UniformDrafter(5, max_drafts=2)
    assert isinstance(uniform, Drafter) and isinstance(CPDrafter(head), Drafter)
    state = uniform.start(hidden, 2)
    torch.testing.assert_close(uniform.next(state, chosen).exp(), torch.full((2, 5), 0.2))
