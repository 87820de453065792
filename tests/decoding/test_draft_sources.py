"""Draft sources (``cpd_mtp.decoding.sources``) against brute force: the CP conditionals of
every candidate against the enumerated joint, coupled draws against their law, prompt lookup
against a plain search, and the protocol a user's source meets."""

from __future__ import annotations

import functools

import pytest
import torch
from decoding_builders import chi_square_p_value, enumerate_joint, random_head_model
from hypothesis import given, settings
from hypothesis import strategies as st

from cpd_mtp.decoding.noise import PositionNoise
from cpd_mtp.decoding.sampling import apply_warpers, build_warpers
from cpd_mtp.decoding.sources import (
    Candidates,
    ContextSource,
    CPSource,
    DraftContext,
    DraftSource,
    SourceLimit,
    UniformSource,
)

VOCAB = 4


def enumerated_conditional(log_w, log_p, path):
    """log q(x | path) at offset len(path) + 1 from the (V,)*n joint of one position."""
    joint = enumerate_joint(log_w, log_p)  # (V,)*n
    fixed = joint[tuple(path)]
    while fixed.dim() > 1:  # marginalise the offsets after the next one
        fixed = torch.logsumexp(fixed, dim=-1)
    return fixed - torch.logsumexp(fixed, 0)


def context(anchor, root, depth, history=None, warp=None, noise=None):
    b = root.shape[0]
    return DraftContext(
        anchor=anchor,
        root=root,
        max_depth=depth,
        history=history or [root[i : i + 1] for i in range(b)],
        rows=torch.arange(b),
        root_position=torch.zeros(b, dtype=torch.long),
        warp=warp,
        noise=noise,
    )


def candidate_paths(cand: Candidates, root: torch.Tensor, row: int) -> list[list[int]]:
    """Each candidate's path of tokens from the root (root first)."""
    paths = []
    for j in range(cand.tokens.shape[1]):
        path, u = [int(cand.tokens[row, j])], int(cand.parents[row, j])
        while u >= 0:
            path.insert(0, int(cand.tokens[row, u]))
            u = int(cand.parents[row, u])
        paths.append([int(root[row]), *path])
    return paths


@pytest.mark.parametrize("chain", [False, True])
def test_every_candidate_has_the_enumerated_conditional(chain):
    model = random_head_model(vocab=VOCAB, n_future=4, rank=3, seed=9)
    head = model.head
    hidden = torch.randn(2, head.config.hidden_size, generator=torch.Generator().manual_seed(1))
    root = torch.tensor([1, 3])
    source = CPSource(head, children=3, width=5)
    with torch.no_grad():
        cand = source.propose(context(hidden, root, 3), SourceLimit(40, 3, chain=chain))
        log_w, log_p = head.draft_state(hidden)  # (b, r), (b, n, r, V)
    for row in range(2):
        seen = set()
        for j, path in enumerate(candidate_paths(cand, root, row)):
            assert len(path) == int(cand.depth[row, j]) + 1
            want = enumerated_conditional(log_w[row], log_p[row], path[:-1])[path[-1]].exp()
            torch.testing.assert_close(cand.q[row, j].double(), want, atol=1e-5, rtol=1e-5)
            key = (int(cand.parents[row, j]), path[-1])
            assert key not in seen  # siblings are distinct
            seen.add(key)
            assert int(cand.parents[row, j]) < j  # parents first
        if chain:
            assert cand.parents[row].tolist() == [-1, 0, 1]
            for j in range(3):  # the chain is the top draft at each depth
                path = [int(root[row]), *cand.tokens[row, :j].tolist()]
                want = enumerated_conditional(log_w[row], log_p[row], path).argmax()
                assert int(cand.tokens[row, j]) == int(want)


def test_a_sampled_first_candidate_is_a_draw_from_the_warped_q():
    """Rows of the same state, each with its own coupled noise: the root's first child is
    distributed as the warped q (chi-square, 20,000 rows, p > 1e-3), and equals the
    Gumbel-max of that noise."""
    model = random_head_model(vocab=VOCAB, n_future=3, rank=2, seed=4)
    head = model.head
    rows = 20_000
    hidden = torch.randn(1, head.config.hidden_size, generator=torch.Generator().manual_seed(3))
    warp = functools.partial(apply_warpers, build_warpers(0.8, None, None))
    noise = PositionNoise(seed=5, vocab_size=VOCAB)
    root = torch.full((rows,), 2)
    source = CPSource(head, children=2, width=2)
    with torch.no_grad():
        cand = source.propose(
            context(hidden.expand(rows, -1), root, 1, warp=warp, noise=noise),
            SourceLimit(2, 1),
        )
        log_w, log_p = head.draft_state(hidden)
    want = warp(enumerated_conditional(log_w[0], log_p[0], [2])[None].float())[0]
    first = cand.tokens[:, 0]
    g = noise(torch.arange(rows), torch.ones(rows, 1, dtype=torch.long))[:, 0]
    assert torch.equal(first, (want + g).argmax(-1))
    q = want.exp().double()
    counts = torch.bincount(first, minlength=VOCAB)
    observed = {(a,): int(c) for a, c in enumerate(counts)}
    assert chi_square_p_value(observed, {(a,): float(q[a]) for a in range(VOCAB)}, rows) > 1e-3
    assert bool((cand.tokens[:, 0] != cand.tokens[:, 1]).all())  # distinct siblings


@settings(max_examples=60, deadline=None)
@given(
    history=st.lists(st.integers(0, 4), min_size=1, max_size=30),
    num_tokens=st.integers(1, 6),
    max_ngram=st.integers(1, 4),
    max_len=st.integers(0, 8),
)
def test_prompt_lookup_continues_the_latest_longest_match(history, num_tokens, max_ngram, max_len):
    source = ContextSource(num_tokens=num_tokens, max_ngram=max_ngram)
    got = source.chain(torch.tensor(history), max_len).tolist()
    want: list[int] = []
    limit = min(num_tokens, max_len)
    if limit > 0:
        n = len(history)
        for g in range(min(max_ngram, n - 1), 0, -1):
            starts = [s for s in range(n - g) if history[s : s + g] == history[n - g :]]
            if starts:
                start = starts[-1] + g
                want = history[start : start + limit]
                break
    assert got == want


def test_context_candidates_are_each_rows_chain_padded():
    source = ContextSource(num_tokens=4)
    history = [torch.tensor([5, 6, 7, 5]), torch.tensor([1, 2, 3])]
    cand = source.propose(
        context(torch.zeros(2, 4), torch.tensor([5, 3]), 6, history), SourceLimit(9, 6)
    )
    assert cand.tokens[0, :2].tolist() == [6, 7] and cand.valid[0].tolist() == [True, True, True]
    assert cand.tokens[0, 2].item() == 5  # 6, 7, 5: what followed the latest earlier 5
    assert not bool(cand.valid[1].any())  # no earlier 3: nothing proposed
    assert cand.parents[0].tolist() == [-1, 0, 1] and cand.depth[0].tolist() == [1, 2, 3]


def test_the_sources_satisfy_the_protocol():
    model = random_head_model(vocab=VOCAB, n_future=3, rank=2, seed=3)
    for source in (CPSource(model.head), ContextSource(), UniformSource(VOCAB, 2)):
        assert isinstance(source, DraftSource)
    assert not isinstance(object(), DraftSource)
    with pytest.raises(ValueError, match="num_tokens"):
        ContextSource(num_tokens=0)
    with pytest.raises(ValueError, match=r"drafts 0\.\.2 tokens deep"):
        CPSource(model.head, max_depth=3)
    cand = UniformSource(VOCAB, 2).propose(
        context(torch.zeros(1, 4), torch.tensor([1]), 2), SourceLimit(5, 2)
    )
    assert cand.tokens.tolist() == [[0, 0]] and torch.allclose(cand.q, torch.full((1, 2), 0.25))
