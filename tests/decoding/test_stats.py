"""Decoding statistics (``cpd_mtp.decoding.stats``) against brute-force counting."""

from __future__ import annotations

import math

import torch

from cpd_mtp.decoding.stats import DecodingStats, DraftCounter
from cpd_mtp.decoding.tree import chain_tree, verify


def brute_force_counts(drafts, accepted, remaining, eos, m):
    """Per row, walk the drafts: position j is verified iff every earlier one was accepted, its
    token is within the budget and no EOS came before it."""
    proposed, accepted_counts = [0] * m, [0] * m
    for row in range(drafts.shape[0]):
        for j in range(drafts.shape[1]):
            if j > accepted[row] or j >= remaining[row]:
                break
            if any(int(drafts[row, i]) in eos for i in range(j)):
                break
            proposed[j] += 1
            accepted_counts[j] += int(j < accepted[row])
    return proposed, accepted_counts


def chain_path(drafts, accepted):
    """Greedy verification of a chain whose verifier agrees with exactly ``accepted`` drafts."""
    b, m_now = drafts.shape
    target = torch.zeros(b, m_now + 1, 6)
    for row in range(b):
        for j in range(m_now):
            token = int(drafts[row, j]) if j < accepted[row] else (int(drafts[row, j]) + 1) % 6
            target[row, j, token] = 1.0
    path = verify(chain_tree(torch.zeros(b, dtype=torch.long), drafts), target)
    assert torch.equal(path.accepted, accepted)
    return path


def test_counts_match_brute_force():
    g = torch.Generator().manual_seed(0)
    m, eos = 4, [3]
    counter = DraftCounter(batch=5, draft_positions=m, device=torch.device("cpu"))
    want_p, want_a = [0] * m, [0] * m
    for _ in range(50):
        b, m_now = (
            int(torch.randint(1, 6, (1,), generator=g)),
            int(torch.randint(0, m + 1, (1,), generator=g)),
        )
        drafts = torch.randint(0, 6, (b, m_now), generator=g)
        accepted = torch.randint(0, m_now + 1, (b,), generator=g)
        remaining = torch.randint(1, m + 3, (b,), generator=g)
        path = chain_path(drafts, accepted)
        path_tokens = chain_tree(torch.zeros(b, dtype=torch.long), drafts).tokens.gather(
            1, path.nodes
        )
        counter.count_verification(path, path_tokens, remaining, torch.tensor(eos))
        p, a = brute_force_counts(drafts, accepted.tolist(), remaining.tolist(), eos, m)
        want_p = [x + y for x, y in zip(want_p, p)]
        want_a = [x + y for x, y in zip(want_a, a)]
    stats = counter.finish(torch.zeros(5, dtype=torch.long))
    assert stats.proposed_counts == want_p and stats.accepted_counts == want_a
    assert sum(want_p) > sum(want_a) > 0


def test_rates_and_expected_tokens():
    stats = DecodingStats(
        draft_positions=3,
        forwards=4,
        row_forwards=[4, 2],
        new_tokens_per_row=[7, 3],
        proposed_counts=[10, 6, 0],
        accepted_counts=[6, 3, 0],
    )
    assert stats.new_tokens == 10
    assert stats.tokens_per_forward == 10 / 6
    assert stats.acceptance_rate[:2] == [0.6, 0.5] and math.isnan(stats.acceptance_rate[2])
    assert stats.expected_tokens_per_step == 1 + 0.6 + 0.6 * 0.5 + 0.0
    assert DecodingStats().tokens_per_forward == 0.0
    assert DecodingStats().expected_tokens_per_step == 1.0


def test_combine_sums_counts_and_concatenates_rows():
    a = DecodingStats(2, 3, [3], [5], [2, 1], [1, 0])
    b = DecodingStats(2, 2, [2, 1], [2, 1], [1, 1], [1, 1])
    total = DecodingStats.combine([a, b])
    assert total.forwards == 5 and total.row_forwards == [3, 2, 1]
    assert total.new_tokens_per_row == [5, 2, 1]
    assert total.proposed_counts == [3, 2] and total.accepted_counts == [2, 1]
    assert total.tokens_per_forward == 8 / 6
    assert DecodingStats.combine([]).proposed_counts == []
