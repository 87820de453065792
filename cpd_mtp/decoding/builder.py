"""One tree builder: any number of draft sources merged into the tree each step feeds.

``TreeBuilder.propose`` asks every source (``cpd_mtp.decoding.sources``) for candidates, merges
them row by row into a trie (one node per distinct path: siblings are distinct tokens, so the
verifier's walk matches at most one), scores each node by the calibrated probability that the
verifier accepts its whole path (the product, along the path, of its source's calibrated
acceptance of each token), and keeps the best nodes: as many as maximise expected tokens per
second under the measured cost of the forward (``cpd_mtp.decoding.cost.ForwardCost``), or a
fixed number.

``TreeBuilder.update`` hears what was accepted: every tested node (its parent on the accepted
path) counts for its source's calibration (``AcceptanceCalibration``), which lives for the whole
call (``cpd_mtp.generate`` keeps it per model and decoding mode, so it carries over from call
to call). A source whose drafts stop being accepted gets low scores, and so a smaller share of
the tree; an untrained head's nodes are soon outscored by context drafts.

A source costs time to ask even when none of its nodes is kept (the CP head runs its experts).
So when trees are sized by the measured cost, the builder also weighs each source: its share of
a step's time (the seconds spent asking it and merging its candidates, against those plus a
one-token forward) and its share of a step's tokens (the expected tokens its kept nodes add,
the sum of their scores, against one plus every source's). A source whose token share is below
its time share, over at least ``REST_AFTER`` steps, *rests*: it is asked only on the first step
of a call and every ``PROBE_EVERY``-th step after, enough to notice if it starts paying.
Resting changes which drafts are offered, never the output (verification is exact).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cpd_mtp.decoding.calibration import AcceptanceCalibration
from cpd_mtp.decoding.cost import ForwardCost
from cpd_mtp.decoding.sources import Candidates, DraftContext, DraftSource, SourceLimit
from cpd_mtp.decoding.tree import DraftTree, TreePath

__all__ = ["CALIBRATED_DEPTH", "Proposal", "TreeBudget", "TreeBuilder"]

# Depths calibrated apart; deeper drafts share the last depth's counts.
CALIBRATED_DEPTH = 16
# A source is weighed after REST_AFTER steps that asked it; a resting one is still asked on a
# call's first step and every PROBE_EVERY-th step after.
REST_AFTER = 16
PROBE_EVERY = 8


@dataclass
class Proposal:
    """The tree of one step and what the builder expects of each node.

    Attributes:
        tree: the trees, root at node 0.
        score: (b, N) calibrated probability that the verifier accepts the node's whole path;
            1 for the root, 0 for padding.
        source: (b, N) index of the source that proposed the node (the first one, when several
            proposed the same path).
        q: (b, N) that source's probability of the node's token given its parent.
    """

    tree: DraftTree
    score: torch.Tensor
    source: torch.Tensor
    q: torch.Tensor


@dataclass
class TreeBudget:
    """How many draft nodes a step may feed.

    Attributes:
        max_nodes: the most draft nodes per row.
        cost: measured seconds of a forward by fed tokens; with it the size maximises expected
            tokens per second, without it the tree takes ``max_nodes`` (its best ones).
        batch: rows fed together (the cost is looked up for batch x nodes tokens).
    """

    max_nodes: int
    cost: ForwardCost | None = None
    batch: int = 1

    def choose(self, scores: torch.Tensor) -> int:
        """The number of draft nodes T to keep, given (b, M) node scores sorted descending.

        Expected tokens per step with the best T nodes is 1 + their score sum (each node is on
        the accepted path with its score's probability, and the verifier adds one token);
        the chosen T maximises that over the cost of feeding T + 1 tokens per row.
        """
        available = min(self.max_nodes, scores.shape[1])
        if self.cost is None or not self.cost.measured or available == 0:
            return available
        gains = 1.0 + torch.cat(
            [scores.new_zeros(scores.shape[0], 1), scores[:, :available].cumsum(1)], dim=1
        ).mean(0)  # (available + 1,)
        costs = torch.tensor(
            [self.cost(self.batch * (t + 1)) for t in range(available + 1)], dtype=gains.dtype
        )
        return int(torch.argmax(gains / costs.to(gains.device)))


@dataclass
class _Trie:
    """One row's merged candidates, root first (plain lists while merging)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    q: list[float] = field(default_factory=list)
    source: list[int] = field(default_factory=list)
    children: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(self, parent: int, token: int, score: float, q: float, source: int) -> int:
        """The node (parent, token), added or, when present, given the better score."""
        node = self.children.get((parent, token))
        if node is not None:
            if score > self.score[node]:
                self.score[node], self.q[node], self.source[node] = score, q, source
            return node
        node = len(self.tokens)
        self.children[(parent, token)] = node
        self.tokens.append(token)
        self.parents.append(parent)
        self.depth.append(self.depth[parent] + 1)
        self.score.append(score)
        self.q.append(q)
        self.source.append(source)
        return node


class TreeBuilder:
    """Draft trees from any number of sources, sized by the measured cost.

    Args:
        sources: the draft sources, in order of priority (a path proposed by several keeps the
            best score; ties go to the first).
        max_nodes: the most draft nodes per step.
        cost: the measured forward cost: the tree's size maximises expected tokens per second;
            None: always the best ``max_nodes`` nodes.
        chain: one chain (every source proposes its best child of each node only, and the best
            path is kept).
        depth_caps: the deepest draft of each source by its index (e.g. ``draft_positions`` for
            the CP head), on top of the source's own ``max_depth``.
        calibration: what verification has shown of each source so far (one per source, in
            order; ``cpd_mtp.generate`` keeps one per model and decoding mode, so it carries
            over from call to call); None: a fresh one.
    """

    def __init__(
        self,
        sources: Sequence[DraftSource],
        max_nodes: int,
        *,
        cost: ForwardCost | None = None,
        chain: bool = False,
        depth_caps: dict[int, int] | None = None,
        calibration: AcceptanceCalibration | None = None,
    ) -> None:
        if not sources:
            raise ValueError("TreeBuilder needs at least one draft source")
        for source in sources:
            if not isinstance(source, DraftSource):
                raise TypeError(
                    f"{type(source).__name__} is not a draft source: it needs name, max_depth and "
                    "propose(context, limit) (cpd_mtp.decoding.sources.DraftSource)"
                )
        self.sources = list(sources)
        self.max_nodes = max_nodes
        self.cost = cost
        self.chain = chain
        self.depth_caps = dict(depth_caps or {})
        self.calibration = calibration or AcceptanceCalibration(
            sources=len(self.sources), max_depth=CALIBRATED_DEPTH
        )
        self.steps = 0
        self.clock = time.perf_counter

    @property
    def max_depth(self) -> int | None:
        """The deepest draft any source can propose (None: a source without a limit)."""
        depths = []
        for index, source in enumerate(self.sources):
            depth = source.max_depth
            cap = self.depth_caps.get(index)
            if cap is not None:
                depth = cap if depth is None else min(depth, cap)
            if depth is None:
                return None
            depths.append(depth)
        return max(depths)

    def propose(self, context: DraftContext) -> Proposal:
        """The tree of this step: every source's candidates merged, the best nodes kept."""
        b = context.root.shape[0]
        budget = TreeBudget(self.max_nodes if context.max_depth > 0 else 0, self.cost, b)
        rows = [_Trie([int(t)], [-1], [0], [2.0], [1.0], [0]) for t in context.root.tolist()]
        self.steps += 1
        weigh = self.cost is not None  # sources are weighed only where they may rest
        asked: dict[int, float] = {}
        if budget.max_nodes > 0:
            for index, source in enumerate(self.sources):
                if self.steps % PROBE_EVERY != 1 and self.resting(index, b):
                    continue
                depth = context.max_depth
                for cap in (source.max_depth, self.depth_caps.get(index)):
                    depth = depth if cap is None else min(depth, cap)
                if depth < 1:
                    continue
                limit = SourceLimit(
                    max_nodes=budget.max_nodes,
                    max_depth=depth,
                    chain=self.chain,
                    acceptance=lambda d, q, s=index: self._acceptance(s, d, q),
                )
                start = self.clock() if weigh else 0.0
                self._merge(rows, index, source.propose(context, limit))
                if weigh:
                    asked[index] = self.clock() - start
        # The best nodes first (a child never scores above its parent), root kept at 0.
        orders = [
            sorted(range(1, len(r.tokens)), key=lambda j, r=r: (-r.score[j], r.depth[j], j))
            for r in rows
        ]
        if self.chain:  # the best path: each kept node the child of the one before
            orders = [_best_path(row, order) for row, order in zip(rows, orders)]
        sorted_scores = torch.zeros(b, max((len(o) for o in orders), default=0))
        for i, order in enumerate(orders):
            sorted_scores[i, : len(order)] = torch.tensor([rows[i].score[j] for j in order])
        keep = budget.choose(sorted_scores)
        proposal = self._build(rows, orders, keep, context.root.device)
        kept = proposal.tree.valid.clone()
        kept[:, 0] = False
        for index, seconds in asked.items():
            gain = (proposal.score * (kept & (proposal.source == index))).sum(1).mean()
            self.calibration.record_source(index, seconds, float(gain))
        return proposal

    def resting(self, source: int, batch: int = 1) -> bool:
        """Whether ``source`` adds a smaller share of a step's tokens than of its time (only
        when trees are sized by a measured cost, after ``REST_AFTER`` steps that asked it)."""
        calibration = self.calibration
        if self.cost is None or not self.cost.measured or calibration.asked[source] < REST_AFTER:
            return False
        step = self.cost(batch) + sum(calibration.seconds)
        tokens = 1.0 + sum(calibration.gain)
        return calibration.gain[source] / tokens < calibration.seconds[source] / step

    def _acceptance(self, source: int, depth: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.calibration(torch.full_like(depth, source), depth, q)

    def _merge(self, rows: list[_Trie], source: int, cand: Candidates) -> None:
        """Add one source's candidates to every row's trie, scored by calibrated paths."""
        if cand.tokens.shape[1] == 0:
            return
        accept = self._acceptance(source, cand.depth, cand.q)  # (b, M)
        for i, row in enumerate(rows):
            tokens, parents = cand.tokens[i].tolist(), cand.parents[i].tolist()
            valid, q, step = cand.valid[i].tolist(), cand.q[i].tolist(), accept[i].tolist()
            node_of: list[int] = []
            path_score: list[float] = []
            for j in range(len(tokens)):
                if not valid[j] or (parents[j] >= 0 and node_of[parents[j]] < 0):
                    node_of.append(-1)  # padding, or under padding
                    path_score.append(0.0)
                    continue
                parent = 0 if parents[j] < 0 else node_of[parents[j]]
                above = 1.0 if parents[j] < 0 else path_score[parents[j]]
                path_score.append(above * step[j])
                node_of.append(row.add(parent, tokens[j], path_score[j], q[j], source))

    def _build(
        self, rows: list[_Trie], orders: list[list[int]], keep: int, device: torch.device
    ) -> Proposal:
        b, n = len(rows), 1 + keep
        tokens = torch.zeros(b, n, dtype=torch.long)
        parents = torch.zeros(b, n, dtype=torch.long)
        depth = torch.zeros(b, n, dtype=torch.long)
        valid = torch.zeros(b, n, dtype=torch.bool)
        score = torch.zeros(b, n)
        source = torch.zeros(b, n, dtype=torch.long)
        q = torch.ones(b, n)
        for i, (row, order) in enumerate(zip(rows, orders)):
            # Parents before children: the kept nodes in level order.
            chosen = sorted(order[:keep], key=lambda j, row=row: (row.depth[j], -row.score[j], j))
            slot_of = {0: 0, **{j: slot for slot, j in enumerate(chosen, start=1)}}
            for slot, j in enumerate([0, *chosen]):
                tokens[i, slot] = row.tokens[j]
                parents[i, slot] = slot_of[row.parents[j]] if slot else -1
                depth[i, slot] = row.depth[j]
                valid[i, slot] = True
                score[i, slot] = row.score[j] if slot else 1.0
                source[i, slot] = row.source[j]
                q[i, slot] = row.q[j]
            # Padding slots, never accepted (``valid`` is False): leaves under the root, or the
            # chain continued when every row is a chain.
            for slot in range(len(chosen) + 1, n):
                parents[i, slot] = slot - 1 if self.chain else 0
                depth[i, slot] = slot if self.chain else 1
        tree = DraftTree(tokens.to(device), parents.to(device), depth.to(device), valid.to(device))
        return Proposal(tree, score.to(device), source.to(device), q.to(device))

    def update(self, proposal: Proposal, path: TreePath) -> None:
        """Count every tested draft (its parent is on the accepted path) and its outcome."""
        tree = proposal.tree
        b, n = tree.tokens.shape
        on_path = torch.zeros(b, n, dtype=torch.bool, device=tree.tokens.device)
        on_path.scatter_(1, path.nodes, True)
        tested = tree.valid & on_path.gather(1, tree.parents.clamp(min=0))
        tested[:, 0] = False
        self.calibration.update(
            proposal.source[tested], tree.depth[tested], proposal.q[tested], on_path[tested]
        )

    def select(self, rows: torch.Tensor) -> None:
        """Keep the sources' per-row state of the rows at ``rows`` (the others finished)."""
        for source in self.sources:
            select = getattr(source, "select", None)
            if callable(select):
                select(rows)


def _best_path(row: _Trie, order: list[int]) -> list[int]:
    """The path that follows the best-scoring child from the root, root excluded."""
    children: dict[int, list[int]] = {}
    for j in order:
        children.setdefault(row.parents[j], []).append(j)
    path, node = [], 0
    while node in children:
        node = max(children[node], key=lambda j: (row.score[j], -j))
        path.append(node)
    return path
