"""Drafters (``cpd_mtp.decoding.drafters``) against brute force: the CP conditionals of every
tree node against the enumerated joint, draws without replacement against their law, prompt
lookup against a plain search, and the tree size against an exhaustive argmax."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from decoding_builders import chi_square_p_value, enumerate_joint, random_head_model
from hypothesis import given, settings
from hypothesis import strategies as st

from cpd_mtp.decoding.calibration import AcceptanceCalibration
from cpd_mtp.decoding.cost import ForwardCost
from cpd_mtp.decoding.drafters import (
    ContextDrafter,
    CPDrafter,
    DraftContext,
    Drafter,
    TreeBudget,
    TreeDrafter,
    UniformDrafter,
)
from cpd_mtp.decoding.sampling import apply_warpers, build_warpers
from cpd_mtp.decoding.tree import DETERMINISTIC, SAMPLED

VOCAB = 4


def enumerated_conditional(log_w, log_p, path):
    """log q(x | path) at offset len(path) + 1 from the (V,)*n joint of one position."""
    joint = enumerate_joint(log_w, log_p)  # (V,)*n
    fixed = joint[tuple(path)]
    while fixed.dim() > 1:  # marginalise the offsets after the next one
        fixed = torch.logsumexp(fixed, dim=-1)
    return fixed - torch.logsumexp(fixed, 0)


def context(anchor, root, depth, history=None, warp=None, seed=0):
    return DraftContext(
        anchor=anchor,
        root=root,
        max_depth=depth,
        history=history or [root[i : i + 1] for i in range(root.shape[0])],
        warp=warp,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("chain", [False, True])
def test_every_candidate_scores_the_enumerated_conditional(chain):
    model = random_head_model(vocab=VOCAB, n_future=4, rank=3, seed=9)
    head = model.head
    hidden = torch.randn(2, head.config.hidden_size, generator=torch.Generator().manual_seed(1))
    root = torch.tensor([1, 3])
    drafter = CPDrafter(head, children=3, width=5)
    calibration = AcceptanceCalibration(sources=2, max_depth=3, prior_weight=1e9)  # trust q
    with torch.no_grad():
        cand = drafter.candidates(context(hidden, root, 3), calibration, 40, 3, chain=chain)
        log_w, log_p = head.draft_state(hidden)  # (b, r), (b, n, r, V)
    tokens, parents, depth = cand["tokens"], cand["parents"], cand["depth"]
    for row in range(2):
        seen = set()
        for j in range(1, tokens.shape[1]):
            path = [int(tokens[row, j])]
            u = int(parents[row, j])
            while u >= 0:
                path.insert(0, int(tokens[row, u]))
                u = int(parents[row, u])
            assert len(path) == int(depth[row, j]) + 1 and path[0] == int(root[row])
            want = enumerated_conditional(log_w[row], log_p[row], path[:-1])[path[-1]].exp()
            torch.testing.assert_close(cand["q"][row, j].double(), want, atol=1e-5, rtol=1e-5)
            assert (int(parents[row, j]), path[-1]) not in seen  # siblings are distinct
            seen.add((int(parents[row, j]), path[-1]))
            # The score is the product of the (calibrated, here exact) q along the path.
            assert float(cand["score"][row, j]) <= float(cand["score"][row, parents[row, j]])
        if chain:
            assert tokens.shape[1] == 4 and parents[row].tolist() == [-1, 0, 1, 2]
            # The chain is the top draft at each depth.
            for j in range(1, 4):
                path = tokens[row, :j].tolist()
                want = enumerated_conditional(log_w[row], log_p[row], path).argmax()
                assert int(tokens[row, j]) == int(want)


def test_a_sampled_tree_draws_siblings_without_replacement_from_the_warped_q():
    """Rows of the same shape: the first child of the root is distributed as q, the second
    as q without the first, renormalised (chi-square, 20,000 draws, p > 1e-3)."""
    model = random_head_model(vocab=VOCAB, n_future=3, rank=2, seed=4)
    head = model.head
    rows = 20_000
    hidden = torch.randn(1, head.config.hidden_size, generator=torch.Generator().manual_seed(3))
    hidden = hidden.expand(rows, -1)
    drafter = CPDrafter(head)
    warp = functools.partial(apply_warpers, build_warpers(0.8, None, None))
    with torch.no_grad():
        log_w, log_p = drafter.pieces(hidden, 2, None)
    root = torch.full((rows,), 2)
    post = CPDrafter._posterior(log_w.float(), log_p[:, 0].float(), root)
    parents = torch.tensor([[-1, 0, 0, 1]]).expand(rows, -1)
    depth = torch.tensor([[0, 1, 1, 2]]).expand(rows, -1)
    tokens, valid, child_log_q, _ = drafter.realize(
        parents, depth, root, post, log_p.float(), warp, torch.Generator().manual_seed(5)
    )
    assert bool(valid.all()) and bool((tokens[:, 1] != tokens[:, 2]).all())
    with torch.no_grad():
        log_w1, log_p1 = head.draft_state(hidden[:1])
    want = warp(enumerated_conditional(log_w1[0], log_p1[0], [2])[None].float())[0]
    torch.testing.assert_close(child_log_q[0, 0].exp(), want.exp(), atol=1e-5, rtol=1e-4)
    q = want.exp().double()
    first = {(a,): int(c) for a, c in enumerate(torch.bincount(tokens[:, 1], minlength=VOCAB))}
    assert chi_square_p_value(first, {(a,): float(q[a]) for a in range(VOCAB)}, rows) > 1e-3
    second = torch.zeros(VOCAB, dtype=torch.float64)
    for a in range(VOCAB):
        rest = q.clone()
        rest[a] = 0
        second += q[a] * rest / rest.sum()
    observed = {(a,): int(c) for a, c in enumerate(torch.bincount(tokens[:, 2], minlength=VOCAB))}
    expected = {(a,): float(second[a]) for a in range(VOCAB)}
    assert chi_square_p_value(observed, expected, rows) > 1e-3
    # The third node is a child of the first: drawn from q given the first child's token.
    assert torch.isfinite(child_log_q[:, 1]).any(-1).all()


@settings(max_examples=60, deadline=None)
@given(
    history=st.lists(st.integers(0, 4), min_size=1, max_size=30),
    num_tokens=st.integers(1, 6),
    max_ngram=st.integers(1, 4),
    max_len=st.integers(0, 8),
)
def test_prompt_lookup_continues_the_latest_longest_match(history, num_tokens, max_ngram, max_len):
    drafter = ContextDrafter(num_tokens=num_tokens, max_ngram=max_ngram)
    got = drafter.chain(torch.tensor(history), max_len).tolist()
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


def test_a_greedy_tree_merges_context_drafts_into_the_trie():
    model = random_head_model(vocab=VOCAB, n_future=3, rank=2, seed=2)
    drafter = TreeDrafter(CPDrafter(model.head, children=2, width=2), ContextDrafter(4))
    hidden = torch.randn(1, model.head.config.hidden_size)
    history = [torch.tensor([0, 1, 2, 3, 0, 1, 2])]  # the context proposes 3, 0, 1 (depth 3)
    proposal = drafter.propose(
        context(hidden, torch.tensor([2]), 3, history), TreeBudget(max_nodes=30)
    )
    tree = proposal.tree
    paths = set()
    for j in range(tree.size):
        assert int(tree.parents[0, j]) < j  # parents first
        key = (int(tree.parents[0, j]), int(tree.tokens[0, j]))
        assert key not in paths  # distinct siblings: one node per path
        paths.add(key)
    context_nodes = (proposal.source[0] == 1).nonzero().flatten().tolist()
    chain, u = [], 0
    for token in (3, 0, 1):  # the context chain is in the tree, shared or not
        u = next(
            j
            for j in range(tree.size)
            if int(tree.parents[0, j]) == u and int(tree.tokens[0, j]) == token
        )
        chain.append(u)
    assert set(context_nodes) <= set(chain)
    # A node proposed by the context alone is deterministic; a shared one stays the head's.
    assert torch.equal(tree.kind[0] == DETERMINISTIC, proposal.source[0] == 1)
    assert bool((tree.kind[0][proposal.source[0] == 0] == SAMPLED).all())


def test_a_sampled_tree_puts_context_drafts_first_as_deterministic_branches():
    model = random_head_model(vocab=VOCAB, n_future=3, rank=2, seed=2)
    drafter = TreeDrafter(CPDrafter(model.head, children=2, width=2), ContextDrafter(3))
    hidden = torch.randn(1, model.head.config.hidden_size)
    warp = functools.partial(apply_warpers, build_warpers(1.0, None, None))
    history = [torch.tensor([1, 2, 3, 1])]  # after root 1 the context proposes 2, 3, 1
    proposal = drafter.propose(
        context(hidden, torch.tensor([1]), 3, history, warp=warp), TreeBudget(max_nodes=30)
    )
    tree = proposal.tree
    deterministic = (tree.kind[0] == DETERMINISTIC) & tree.valid[0]
    assert tree.tokens[0][deterministic].tolist() == [2, 3, 1]
    root_children = (tree.parents[0] == 0).nonzero().flatten()
    assert bool(deterministic[root_children[0]])  # tried first among the root's children
    assert tree.child_log_q is not None


@settings(max_examples=50, deadline=None)
@given(
    scores=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=12),
    costs=st.lists(st.floats(0.5, 3.0), min_size=13, max_size=13),
    max_nodes=st.integers(0, 15),
)
def test_the_tree_size_maximises_expected_tokens_per_second(scores, costs, max_nodes):
    ordered = sorted(scores, reverse=True)
    cost = ForwardCost()
    for fed, seconds in enumerate(costs, start=1):
        cost.record(fed, seconds)
    chosen = TreeBudget(max_nodes, cost).choose(torch.tensor([ordered]).reshape(1, -1))
    limit = min(max_nodes, len(ordered))
    rate = [(1 + sum(ordered[:t])) / costs[t] for t in range(limit + 1)]
    assert rate[chosen] == pytest.approx(max(rate))
    assert TreeBudget(max_nodes).choose(torch.tensor([ordered]).reshape(1, -1)) == limit


def test_forward_cost_interpolates_between_measured_sizes():
    cost = ForwardCost()
    assert cost(7) == 1.0 and not cost.measured
    cost.record(1, 1.0)
    cost.record(4, 2.5)
    assert cost(1) == 1.0 and cost(2) == pytest.approx(1.5) and cost(8) == pytest.approx(5.0)
    cost.record(4, 3.5)  # a running estimate
    assert cost(4) == pytest.approx(0.8 * 2.5 + 0.2 * 3.5)
    assert cost.relative() == {1: 1.0, 4: pytest.approx(2.7)}


def test_calibration_moves_from_q_to_the_measured_rate():
    calibration = AcceptanceCalibration(sources=2, max_depth=3, bins=4, prior_weight=2.0)
    q = torch.tensor([0.5])
    prior = float(calibration(torch.tensor([0]), torch.tensor([1]), q))
    assert prior == pytest.approx(float(calibration.centre[2]))
    calibration.update(torch.zeros(8, dtype=torch.long), torch.ones(8), q.expand(8), torch.zeros(8))
    after = float(calibration(torch.tensor([0]), torch.tensor([1]), q))
    assert after == pytest.approx(2.0 * prior / 10.0)
    other = float(calibration(torch.tensor([1]), torch.tensor([1]), q))  # other source
    assert other == pytest.approx(prior)


def test_the_drafters_satisfy_the_protocol():
    model = random_head_model(vocab=VOCAB, n_future=3, rank=2, seed=3)
    for drafter in (
        CPDrafter(model.head),
        ContextDrafter(),
        TreeDrafter(CPDrafter(model.head), ContextDrafter()),
        UniformDrafter(VOCAB, 2),
    ):
        assert isinstance(drafter, Drafter)
    with pytest.raises(ValueError, match="needs a CP drafter"):
        TreeDrafter(None, None)
    with pytest.raises(ValueError, match="num_tokens"):
        ContextDrafter(num_tokens=0)
    assert math.isfinite(
        float(
            UniformDrafter(VOCAB, 2)
            .propose(context(torch.zeros(1, 4), torch.tensor([1]), 2), TreeBudget(2))
            .score.sum()
        )
    )
