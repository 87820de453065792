"""``first_draft_hits``: top-k of the head's first draft given x_{t+1}, against enumeration."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_head import make_head

from cpd_mtp.metrics import first_draft_hits


def reference_hits(head, hidden, ids, ks, draft_ids=None):
    """Count by brute force: the joint p(x1, x2) = sum_a w_a p_1a(x1) p_2a(x2) of every pair,
    normalised over x2 at the observed x1, ranked over the whole vocabulary."""
    with torch.no_grad():
        log_w = head.log_gate(hidden)  # (N, T, r)
        log_p = head.expert_log_probs(hidden)  # (N, T, n, r, K)
    vocab = head.config.vocab_size
    hits, positions = dict.fromkeys(ks, 0), 0
    for b in range(hidden.shape[0]):
        for t in range(hidden.shape[1] - 2):
            x1, x2 = int(ids[b, t + 1]), int(ids[b, t + 2])
            full = torch.full((head.config.n_future, head.config.rank, vocab), -torch.inf)
            if draft_ids is None:
                full = log_p[b, t].double()
            else:
                full = full.double()
                full[..., draft_ids] = log_p[b, t].double()
            joint = torch.stack(
                [
                    torch.logsumexp(log_w[b, t].double() + full[0, :, x1] + full[1, :, v], 0)
                    for v in range(vocab)
                ]
            )
            if draft_ids is not None and x1 not in draft_ids.tolist():  # no evidence from x1
                joint = torch.logsumexp(log_w[b, t].double()[:, None] + full[1], 0)
            order = sorted(range(vocab), key=lambda v: -float(joint[v]))
            positions += 1
            for k in ks:
                hits[k] += int(x2 in order[:k] and joint[x2] > -torch.inf)
    return hits, positions


@settings(max_examples=20, deadline=None)
@given(
    rank=st.integers(1, 4),
    with_draft_vocab=st.booleans(),
    seed=st.integers(0, 1000),
    length=st.integers(3, 6),
)
def test_first_draft_hits_equal_enumeration(rank, with_draft_vocab, seed, length):
    extra = {"next_token": "base", "draft_vocab_size": 5} if with_draft_vocab else {}
    head = make_head(seed=seed, rank=rank, vocab_size=7, n_future=3, **extra)
    generator = torch.Generator().manual_seed(seed)
    draft_ids = None
    if with_draft_vocab:
        draft_ids = torch.randperm(7, generator=generator)[:5].sort().values
        head.set_draft_vocab(draft_ids)
    hidden = torch.randn(2, length, 6, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, length), generator=generator)
    ks = (1, 2, 5)
    assert first_draft_hits(head, hidden, ids, ks) == reference_hits(
        head, hidden, ids, ks, draft_ids
    )


def test_ignored_positions_do_not_count():
    head = make_head(rank=2, vocab_size=5)
    hidden = torch.randn(1, 5, 6, dtype=torch.float64)
    ids = torch.tensor([[1, 2, -100, 3, 4]])
    hits, positions = first_draft_hits(head, hidden, ids, (1,))
    # t = 0: x1 = 2, x2 = -100 (ignored); t = 1: x1 = -100 (ignored); t = 2: x1 = 3, x2 = 4.
    assert positions == 1
    assert hits == reference_hits(head, hidden[:, 2:], ids[:, 2:], (1,))[0]
