"""The tree builder (``cpd_mtp.decoding.builder``): one trie from any sources, scored by each
source's calibrated acceptance, sized by the measured cost; against hand-built expectations and
an exhaustive argmax."""

from __future__ import annotations

import pytest
import torch
from decoding_builders import random_head_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_draft_sources import context

from cpd_mtp.decoding.builder import TreeBudget, TreeBuilder
from cpd_mtp.decoding.calibration import AcceptanceCalibration
from cpd_mtp.decoding.cost import ForwardCost
from cpd_mtp.decoding.sources import Candidates, ContextSource, CPSource
from cpd_mtp.decoding.tree import TreePath

VOCAB = 4


class Fixed:
    """A source that proposes the same chain of tokens every step (q = ``q``)."""

    def __init__(self, tokens: list[int], q: float = 1.0, name: str = "fixed") -> None:
        self.tokens, self.q, self.name, self.max_depth = tokens, q, name, len(tokens)

    def propose(self, context, limit):
        b = context.root.shape[0]
        m = min(limit.max_depth, len(self.tokens))
        cand = Candidates.chain(torch.tensor(self.tokens[:m]).expand(b, -1))
        cand.q = torch.full_like(cand.q, self.q)
        return cand


def paths_of(tree, row=0):
    """The token path (root excluded) of every node."""
    paths = []
    for j in range(tree.size):
        path, u = [], j
        while u > 0:
            path.insert(0, int(tree.tokens[row, u]))
            u = int(tree.parents[row, u])
        paths.append(tuple(path))
    return paths


def test_sources_merge_into_a_trie_with_distinct_siblings():
    model = random_head_model(vocab=VOCAB, n_future=3, rank=2, seed=2)
    builder = TreeBuilder([CPSource(model.head, children=2, width=2), ContextSource(4)], 30)
    hidden = torch.randn(1, model.head.config.hidden_size)
    history = [torch.tensor([0, 1, 2, 3, 0, 1, 2])]  # the context proposes 3, 0, 1 (depth 3)
    proposal = builder.propose(context(hidden, torch.tensor([2]), 3, history))
    tree = proposal.tree
    paths = paths_of(tree)
    assert len(set(paths)) == len(paths)  # one node per distinct path
    assert all(int(tree.parents[0, j]) < j for j in range(1, tree.size))  # parents first
    for prefix in ((3,), (3, 0), (3, 0, 1)):  # the context chain is in the tree
        assert prefix in paths
    # A path only the context proposed is the context's (source 1).
    cp_only = {p for p, s in zip(paths, proposal.source[0].tolist()) if s == 0}
    assert (3, 0, 1) not in cp_only or proposal.score[0, paths.index((3, 0, 1))] > 0


def test_a_node_scores_the_product_of_its_sources_acceptance_along_its_path():
    builder = TreeBuilder([Fixed([1, 2, 3], q=0.5)], 10)
    proposal = builder.propose(context(torch.zeros(1, 4), torch.tensor([0]), 3))
    centre = builder.calibration.centre
    bin_of_half = int((0.5**0.5) * builder.calibration.bins)
    step = float(centre[bin_of_half])  # no verification yet: the bin's prior
    assert proposal.score[0, 1:].tolist() == pytest.approx([step, step**2, step**3])


def test_a_source_that_stops_paying_loses_its_share_of_the_tree():
    """Two sources propose chains of different tokens under the same root; verification
    accepts only the second's. Once the first's rejections have outweighed its prior trust
    in q, its nodes fall out of a small tree for good."""
    loser, winner = Fixed([1, 1, 1], name="loser"), Fixed([2, 2, 2], q=0.5, name="winner")
    builder = TreeBuilder([loser, winner], 3)
    ctx = context(torch.zeros(1, 4), torch.tensor([0]), 3)
    first = builder.propose(ctx)
    assert (first.source[0, 1:] == 0).any()  # the loser's q = 1 outscores at first
    for _ in range(20):
        proposal = builder.propose(ctx)
        tree = proposal.tree
        paths = paths_of(tree)
        nodes = [0] + [paths.index((2,) * k) for k in (1, 2, 3) if (2,) * k in paths]
        width = len(nodes)
        path = TreePath(
            nodes=torch.tensor([nodes]),
            accepted=torch.tensor([width - 1]),
            next_token=torch.tensor([3]),
            tried=torch.ones(1, 3, dtype=torch.bool),
        )
        builder.update(proposal, path)
    last = builder.propose(ctx)
    assert last.source[0, 1:].tolist() == [1, 1, 1]  # only the winner's chain is left


class FakeClock:
    """A clock the sources advance: ``seconds`` of work per proposal."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Timed(Fixed):
    """A ``Fixed`` source that counts how often it is asked and takes ``seconds`` each time."""

    def __init__(self, tokens, clock: FakeClock, seconds: float, **kwargs) -> None:
        super().__init__(tokens, **kwargs)
        self.clock, self.seconds, self.asked = clock, seconds, 0

    def propose(self, context, limit):
        self.asked += 1
        self.clock.now += self.seconds
        return super().propose(context, limit)


def _verify_against(builder, proposal, accepted_token):
    """The path verification takes when only ``accepted_token`` chains are accepted."""
    paths = paths_of(proposal.tree)
    nodes = [0]
    for k in (1, 2, 3):
        if (accepted_token,) * k not in paths:
            break
        nodes.append(paths.index((accepted_token,) * k))
    path = TreePath(
        nodes=torch.tensor([nodes]),
        accepted=torch.tensor([len(nodes) - 1]),
        next_token=torch.tensor([3]),
        tried=torch.ones(1, 3, dtype=torch.bool),
    )
    builder.update(proposal, path)


def _timed_builder(loser_seconds: float, measured: bool = True):
    clock = FakeClock()
    loser = Timed([1, 1, 1], clock, loser_seconds, name="loser")
    winner = Timed([2, 2, 2], clock, 1e-5, q=0.5, name="winner")
    cost = ForwardCost()
    if measured:
        for fed in range(1, 8):
            cost.record(fed, 0.010 + 0.001 * fed)  # a 10 ms forward
    builder = TreeBuilder([loser, winner], 6, cost=cost)
    builder.clock = clock
    return builder, loser, winner


def test_a_source_that_costs_more_time_than_it_adds_tokens_rests_but_is_probed():
    """The loser takes 20 ms of a ~30 ms step and its drafts are always rejected: once weighed
    (REST_AFTER steps) it is asked every PROBE_EVERY-th step only; the winner every step."""
    from cpd_mtp.decoding.builder import PROBE_EVERY, REST_AFTER

    builder, loser, winner = _timed_builder(0.02)
    ctx = context(torch.zeros(1, 4), torch.tensor([0]), 3)
    for _ in range(REST_AFTER):
        _verify_against(builder, builder.propose(ctx), accepted_token=2)
    assert builder.resting(0) and not builder.resting(1)
    asked = loser.asked
    steps = 4 * PROBE_EVERY
    for _ in range(steps):
        _verify_against(builder, builder.propose(ctx), accepted_token=2)
    assert loser.asked - asked == steps // PROBE_EVERY
    assert winner.asked == REST_AFTER + steps


@pytest.mark.parametrize(("seconds", "measured"), [(1e-6, True), (0.02, False)])
def test_a_cheap_source_or_an_unmeasured_cost_never_rests(seconds, measured):
    """A source that costs next to nothing is worth asking even for few tokens; without a
    measured cost (fixed tree sizes) no source rests."""
    from cpd_mtp.decoding.builder import REST_AFTER

    builder, loser, _ = _timed_builder(seconds, measured)
    ctx = context(torch.zeros(1, 4), torch.tensor([0]), 3)
    for _ in range(2 * REST_AFTER):
        _verify_against(builder, builder.propose(ctx), accepted_token=2)
    assert not builder.resting(0) and loser.asked == 2 * REST_AFTER


def test_a_resting_source_that_starts_paying_is_asked_again():
    from cpd_mtp.decoding.builder import PROBE_EVERY, REST_AFTER

    builder, _, _ = _timed_builder(0.02)
    ctx = context(torch.zeros(1, 4), torch.tensor([0]), 3)
    for _ in range(REST_AFTER):
        _verify_against(builder, builder.propose(ctx), accepted_token=2)
    assert builder.resting(0)
    for _ in range(PROBE_EVERY * 40):  # its probes are now accepted
        _verify_against(builder, builder.propose(ctx), accepted_token=1)
        if not builder.resting(0):
            break
    assert not builder.resting(0)


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


def test_a_chain_builder_keeps_one_path():
    builder = TreeBuilder([Fixed([1, 2]), Fixed([3, 1])], 10, chain=True)
    proposal = builder.propose(context(torch.zeros(1, 4), torch.tensor([0]), 2))
    assert proposal.tree.is_chain and proposal.tree.size == 3


def test_depth_caps_and_bad_sources():
    builder = TreeBuilder([Fixed([1, 2, 3])], 10, depth_caps={0: 1})
    assert builder.max_depth == 1
    proposal = builder.propose(context(torch.zeros(1, 4), torch.tensor([0]), 3))
    assert proposal.tree.size == 2
    with pytest.raises(TypeError, match="is not a draft source"):
        TreeBuilder([object()], 4)
    with pytest.raises(ValueError, match="at least one"):
        TreeBuilder([], 4)


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
