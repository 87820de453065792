"""Drafters: where the speculative decoder's draft trees come from.

At each step the decoder hands a drafter a ``DraftContext``: the hidden state at the last
accepted position t, the token x_{t+1} the verifier already chose (the tree's root), the tokens
of every row so far, and whether it samples. The drafter answers with a ``Proposal``: a draft
tree (``cpd_mtp.decoding.tree.DraftTree``) and, per node, the estimated probability that the
verifier accepts it. After verification the decoder calls ``update`` with what was accepted,
so a drafter can learn how far to trust itself.

- ``CPDrafter``: the CP head's conditionals. Each node's children are scored by the posterior
  over experts updated with the node's path (no trunk call): pi_a ∝ w_a prod_s p_{s,a}(x_{t+s}),
  q = sum_a pi_a p_{s+1,a}. A token-conditioned head computes w and p from the anchor and the
  root x_{t+1} (its input), and the root adds no evidence. Greedy trees keep the top children
  of each node, scored by the calibrated product of q along the path (EAGLE-2's dynamic tree);
  sampled trees take the same shape, chosen before any draw, and fill it with draws without
  replacement from the warped q.
- ``ContextDrafter``: prompt lookup: the tokens that followed the latest earlier occurrence of
  the last tokens, in the prompt or the text generated so far, as one more branch.
- ``TreeDrafter``: the two together, and the size of the tree: the number of nodes that
  maximises expected tokens per step over the measured cost of the forward
  (``cpd_mtp.decoding.cost.ForwardCost``), or a fixed number.
- ``UniformDrafter``: an uninformed drafter for tests (decoding stays exact, it accepts less).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from cpd_mtp.decoding.calibration import AcceptanceCalibration
from cpd_mtp.decoding.cost import ForwardCost
from cpd_mtp.decoding.tree import DETERMINISTIC, SAMPLED, DraftTree, TreePath
from cpd_mtp.head import CPDMTPHead
from cpd_mtp.ops.few_rows import mark_reused

__all__ = [
    "CPDrafter",
    "ContextDrafter",
    "DraftContext",
    "Drafter",
    "HeadPieces",
    "Proposal",
    "TreeBudget",
    "TreeDrafter",
    "UniformDrafter",
]

# (log_w (B, r), log p_{1,a} (B, r, V)): the head's next-token pieces at the anchor.
HeadPieces = tuple[torch.Tensor, torch.Tensor]
Warp = Callable[[torch.Tensor], torch.Tensor]

# Sources of drafts, for calibration.
CP_SOURCE, CONTEXT_SOURCE = 0, 1


@dataclass
class DraftContext:
    """What a drafter sees at one step, for the b rows still generating.

    Attributes:
        anchor: (b, d) hidden state at the last accepted position t.
        root: (b,) the kept token x_{t+1}, the tree's root.
        max_depth: the deepest draft allowed this step (>= 0): the rows' remaining budget.
        history: one (L_i,) int64 tensor per row: the row's prompt (without padding) and every
            token generated so far, ending with ``root``.
        warp: None for greedy decoding; else the warping of every target and draft
            distribution (drafts are then drawn from the warped q).
        generator: random source for sampling.
        first: the head's (log_w, log p_1) at the anchor when the decoder has them (marginal
            mode), else None.
    """

    anchor: torch.Tensor
    root: torch.Tensor
    max_depth: int
    history: Sequence[torch.Tensor]
    warp: Warp | None = None
    generator: torch.Generator | None = None
    first: HeadPieces | None = None

    @property
    def greedy(self) -> bool:
        return self.warp is None


@dataclass
class Proposal:
    """A drafter's draft trees and what it expects of each node.

    Attributes:
        tree: the trees, root at node 0.
        score: (b, N) estimated probability that the verifier accepts the node (its whole
            path); 1 for the root, 0 for padding.
        source: (b, N) which drafter proposed the node (calibration).
        q: (b, N) the drafter's probability of the node's token given its parent (1 for a
            deterministic draft).
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


@runtime_checkable
class Drafter(Protocol):
    """Proposes draft trees (``propose``) and hears what was accepted (``update``).

    ``max_depth`` is the deepest draft the drafter can give (None: unbounded).
    """

    max_depth: int | None

    def propose(self, context: DraftContext, budget: TreeBudget) -> Proposal: ...

    def update(self, proposal: Proposal, path: TreePath) -> None: ...


# ------------------------------------------------------------------------------ CP head
class CPDrafter:
    """The CP head's conditionals as draft trees: candidates, then (when sampling) draws.

    Args:
        head: the model's ``CPDMTPHead``.
        children: the most children one node may have.
        width: the most nodes kept per depth.
    """

    def __init__(self, head: CPDMTPHead, children: int = 8, width: int = 32) -> None:
        self.head = head
        self.max_depth = head.config.n_future - 1
        self.children = children
        self.width = width
        self.vocab_size = head.config.vocab_size
        # With a draft vocabulary the experts' distributions live on its K ids: tokens are
        # looked up there, and each q is put back on the full vocabulary (0 elsewhere).
        self.draft_ids = head.draft_ids
        self.position = None
        self.unembedding = None
        if self.draft_ids is not None:
            self.position = head.draft_position(torch.arange(self.vocab_size))
            # W_U is frozen while decoding: gather its K draft rows once, not per step.
            self.unembedding = mark_reused(head._expert_unembedding().detach())

    @torch.no_grad()
    def pieces(
        self,
        anchor: torch.Tensor,
        depth: int,
        first: HeadPieces | None,
        root: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, d) anchor -> log w (b, r) and log p (b, depth + 1, r, K) for offsets 1..depth+1.

        ``first``: (log_w, log p_1) already computed at the anchor (marginal mode); then only
        offsets 2.. are computed. Without it (base mode) every offset comes from one product of
        the expert rows with W_U's (draft) rows: W_U is read once.

        ``root``: (b,) x_{t+1}, the verifier's token. A token-conditioned head reads it (its
        gate and experts see z = h + C e(x_{t+1})), and its offset 1 is that input, not a
        draft: log p of offset 1 is 0 for every expert, so the root adds no evidence to the
        posterior (the head never learned an offset-1 factor).
        """
        head = self.head
        if head.config.token_conditioned:
            if root is None:
                raise ValueError("a token-conditioned head drafts given the root x_{t+1}")
            z = head.conditioned_state(anchor, root)
            log_w = head.log_gate(z)
            if depth == 0:
                shape = (anchor.shape[0], 1, head.config.rank, head.config.draft_vocab)
                return log_w, log_w.new_zeros(shape)
            rest = head.expert_log_probs(z, slice(1, depth + 1), self.unembedding)
            return log_w, torch.cat([torch.zeros_like(rest[:, :1]), rest], dim=1)
        if first is None:
            return self.head.log_gate(anchor), self.head.expert_log_probs(
                anchor, slice(0, depth + 1), self.unembedding
            )
        log_w, log_p1 = first
        if depth == 0:
            return log_w, log_p1[:, None]
        rest = self.head.expert_log_probs(anchor, slice(1, depth + 1))
        return log_w, torch.cat([log_p1[:, None].to(rest.dtype), rest], dim=1)

    def _positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> their index among the experts' K ids (-1 outside the draft vocabulary)."""
        if self.position is None:
            return tokens
        return self.position.to(tokens.device)[tokens]

    def _tokens(self, positions: torch.Tensor) -> torch.Tensor:
        if self.draft_ids is None:
            return positions
        return self.draft_ids.to(positions.device)[positions]

    @staticmethod
    def _posterior(post: torch.Tensor, log_p: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """(..., r) log posteriors, updated with the tokens at (...) ``position`` under
        (..., r, K) ``log_p``; a token outside the draft vocabulary (-1) adds no evidence."""
        index = position.clamp(min=0)[..., None, None].expand(*position.shape, log_p.shape[-2], 1)
        lp = log_p.gather(-1, index).squeeze(-1)  # (..., r)
        post = post + torch.where((position >= 0)[..., None], lp, torch.zeros_like(lp))
        return torch.log_softmax(post, dim=-1)

    def candidates(
        self,
        context: DraftContext,
        calibration: AcceptanceCalibration,
        max_nodes: int,
        depth: int,
        chain: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The best candidate nodes by calibrated score, level by level (no draws).

        Returns (b, 1 + M) tensors ``tokens``, ``parents``, ``depth``, ``score``, ``q`` and the
        head pieces (``log_p`` (b, depth + 1, r, K), ``post`` (b, 1 + M, r): each node's log
        posterior over experts given its path), root first, nodes in level order.
        """
        log_w, log_p = self.pieces(context.anchor, depth, context.first, context.root)
        log_p = log_p.float()
        b = context.root.shape[0]
        device = context.root.device
        post = self._posterior(log_w.float(), log_p[:, 0], self._positions(context.root))
        tokens, parents, depths = (
            [context.root],
            [torch.full((b,), -1, device=device)],
            [torch.zeros(b, dtype=torch.long, device=device)],
        )
        scores, qs, posts = [torch.ones(b, device=device)], [torch.ones(b, device=device)], [post]
        frontier_post = post[:, None]  # (b, F, r)
        frontier_score = torch.ones(b, 1, device=device)
        frontier_index = torch.zeros(b, 1, dtype=torch.long, device=device)
        count = 1
        per_node = 1 if chain else self.children
        for d in range(1, depth + 1):
            if count - 1 >= max_nodes:
                break
            # q of each frontier node's children: sum_a pi_a p_{d+1,a}.
            log_q = torch.logsumexp(frontier_post[..., None] + log_p[:, d][:, None], dim=2)
            k = min(per_node, log_q.shape[-1])
            top_lq, top_pos = log_q.topk(k, dim=-1)  # (b, F, k)
            top_q = top_lq.exp()
            source = torch.full_like(top_pos, CP_SOURCE)
            level = torch.full_like(top_pos, d)
            cand = frontier_score[..., None] * calibration(source, level, top_q)
            flat_score = cand.flatten(1)
            keep = min(1 if chain else self.width, flat_score.shape[1], max_nodes - (count - 1))
            best, pick = flat_score.topk(keep, dim=-1)  # (b, L)
            parent_slot = pick // k
            pos = top_pos.flatten(1).gather(1, pick)
            parent_post = frontier_post.gather(
                1, parent_slot[..., None].expand(-1, -1, post.shape[-1])
            )  # (b, L, r)
            new_post = self._posterior(
                parent_post, log_p[:, d][:, None].expand(-1, keep, -1, -1), pos
            )
            tokens.append(self._tokens(pos))
            parents.append(frontier_index.gather(1, parent_slot))
            depths.append(torch.full_like(pos, d))
            scores.append(best)
            qs.append(top_q.flatten(1).gather(1, pick))
            posts.append(new_post)
            frontier_post, frontier_score = new_post, best
            frontier_index = torch.arange(count, count + keep, device=device).expand(b, -1)
            count += keep
        return {
            "tokens": _columns(tokens),
            "parents": _columns(parents),
            "depth": _columns(depths),
            "score": _columns(scores),
            "q": _columns(qs),
            "post": torch.cat([p if p.dim() == 3 else p[:, None] for p in posts], dim=1),
            "log_p": log_p,
        }

    def realize(
        self,
        parents: torch.Tensor,
        depth: torch.Tensor,
        root: torch.Tensor,
        post_root: torch.Tensor,
        log_p: torch.Tensor,
        warp: Warp,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fill a tree shape with draws: each node's children are drawn without replacement
        from its warped q (Gumbel top-k), in sibling order.

        Args:
            parents: (b, N) the shape (root at 0, parents before children), chosen before any
                draw.
            depth: (b, N) the nodes' depths; nodes of depth -1 are not the CP head's (left as
                they are).
            root: (b,) root tokens.
            post_root: (b, r) the root's log posterior.
            log_p: (b, D + 1, r, K) the head's log p at the anchor.
            warp: the warping of q (as of the target).
            generator: random source.

        Returns:
            tokens (b, N), valid (b, N) (False where q had fewer tokens than children),
            child_log_q (b, N, V) the warped log q each node's children were drawn from, and
            q (b, N) each node's probability under its parent's warped q.
        """
        b, n = parents.shape
        device = parents.device
        vocab = self.vocab_size
        tokens = torch.zeros(b, n, dtype=torch.long, device=device)
        tokens[:, 0] = root
        valid = torch.ones(b, n, dtype=torch.bool, device=device)
        q_node = torch.ones(b, n, device=device)
        child_log_q = torch.full((b, n, vocab), -math.inf, device=device)
        post = post_root.new_zeros(b, n, post_root.shape[-1])
        post[:, 0] = post_root
        # Sibling rank of every CP node: how many earlier CP nodes share its parent.
        same = (parents[:, :, None] == parents[:, None, :]) & (depth >= 0)[:, None, :]
        earlier = torch.ones(n, n, dtype=torch.bool, device=device).tril(-1)
        rank = (same & earlier[None]).sum(-1)  # (b, N)
        max_depth = int(depth.max())
        for d in range(0, max_depth):
            level = (depth == d).nonzero()  # parents at depth d: (row, node) pairs
            if level.numel() == 0:
                continue
            rows, nodes = level[:, 0], level[:, 1]
            log_q = torch.logsumexp(post[rows, nodes][..., None] + log_p[rows, d + 1], dim=-2)
            if self.draft_ids is not None:
                full = log_q.new_full((rows.shape[0], vocab), -math.inf)
                log_q = full.index_copy_(1, self.draft_ids.to(device), log_q)
            warped = warp(log_q)  # (P, V) normalised
            child_log_q[rows, nodes] = warped
            kids = (parents[rows] == nodes[:, None]) & (depth[rows] == d + 1)  # (P, N)
            most = int(kids.sum(-1).max()) if kids.numel() else 0
            if most == 0:
                continue
            # Gumbel top-k: the k largest of log q + Gumbel noise are k draws without
            # replacement, in draw order.
            uniform = torch.rand(warped.shape, generator=generator, device=device)
            exponential = (-torch.log(uniform.clamp(min=1e-30))).clamp(min=1e-30)
            gumbel = -torch.log(exponential)
            top_keys, top_tok = (warped + gumbel).topk(most, dim=-1)  # (P, most)
            child_rows, child_nodes = kids.nonzero(as_tuple=True)
            r = rank[rows[child_rows], child_nodes]
            tok = top_tok[child_rows, r]
            key = top_keys[child_rows, r]
            row_id = rows[child_rows]
            tokens[row_id, child_nodes] = tok
            valid[row_id, child_nodes] = torch.isfinite(key)
            q_node[row_id, child_nodes] = warped[child_rows, tok].exp()
            post[row_id, child_nodes] = self._posterior(
                post[row_id, nodes[child_rows]], log_p[row_id, d + 1], self._positions(tok)
            )
        # A node under an invalid parent is invalid too (parents precede children).
        for u in range(1, n):
            valid[:, u] &= valid.gather(1, parents[:, u : u + 1].clamp(min=0)).squeeze(1)
        return tokens, valid, child_log_q, q_node

    def propose(self, context: DraftContext, budget: TreeBudget) -> Proposal:
        """The CP head's tree on its own (``TreeDrafter`` adds context drafts and sizing)."""
        return TreeDrafter(self, None).propose(context, budget)

    def update(self, proposal: Proposal, path: TreePath) -> None:
        return None


# ------------------------------------------------------------------------------ context
class ContextDrafter:
    """Prompt lookup: continue the latest earlier occurrence of the last tokens.

    For each row, the last g tokens (g from ``max_ngram`` down to 1) are searched for earlier in
    the row's prompt and generated text; the ``num_tokens`` tokens that followed the latest
    match are proposed as a chain under the root (Hugging Face's ``prompt_lookup_num_tokens``
    searches the same way, taking the first match).

    Args:
        num_tokens: the longest chain proposed.
        max_ngram: the longest suffix matched.
    """

    def __init__(self, num_tokens: int = 10, max_ngram: int = 3) -> None:
        if num_tokens < 1 or max_ngram < 1:
            raise ValueError(
                f"num_tokens and max_ngram must be >= 1, got {num_tokens} and {max_ngram}"
            )
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.max_depth = None

    def chain(self, history: torch.Tensor, max_len: int) -> torch.Tensor:
        """(L,) tokens so far -> (k,) proposed continuation, k <= min(num_tokens, max_len)."""
        length = history.shape[0]
        limit = min(self.num_tokens, max_len)
        if limit <= 0:
            return history[:0]
        for g in range(min(self.max_ngram, length - 1), 0, -1):
            suffix = history[length - g :]
            windows = history[: length - 1].unfold(0, g, 1)  # starts 0 .. length - 1 - g
            hits = (windows == suffix).all(-1).nonzero().flatten()
            if hits.numel():
                start = int(hits[-1]) + g  # the latest match's continuation
                return history[start : start + limit]
        return history[:0]

    def propose(self, context: DraftContext, budget: TreeBudget) -> Proposal:
        return TreeDrafter(None, self).propose(context, budget)

    def update(self, proposal: Proposal, path: TreePath) -> None:
        return None


# ------------------------------------------------------------------------------ both
@dataclass
class _Nodes:
    """Candidate nodes of one row, root first (plain lists while merging)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    q: list[float] = field(default_factory=list)
    source: list[int] = field(default_factory=list)
    kind: list[int] = field(default_factory=list)
    origin: list[int] = field(default_factory=list)  # index among the CP candidates, or -1


class TreeDrafter:
    """Draft trees from the CP head and from the context, sized by the measured cost.

    Args:
        cp: the CP head's drafter (None: context drafts only).
        context: the context drafter (None: CP drafts only).
        chain: one chain of CP drafts (the top draft at every depth), no branching.
        calibration: the acceptance calibration (a fresh one by default).
    """

    def __init__(
        self,
        cp: CPDrafter | None,
        context: ContextDrafter | None,
        *,
        chain: bool = False,
        calibration: AcceptanceCalibration | None = None,
    ) -> None:
        if cp is None and context is None:
            raise ValueError("TreeDrafter needs a CP drafter, a context drafter or both")
        self.cp = cp
        self.context = context
        self.chain = chain
        depths = [cp.max_depth if cp is not None else 0]
        if context is not None:
            depths.append(context.num_tokens)
        self.max_depth = None if cp is None else (cp.max_depth if context is None else None)
        self.calibration = calibration or AcceptanceCalibration(sources=2, max_depth=max(depths))

    def propose(self, context: DraftContext, budget: TreeBudget) -> Proposal:
        device = context.root.device
        b = context.root.shape[0]
        cp_depth = 0 if self.cp is None else min(self.cp.max_depth, context.max_depth)
        cand = None
        if self.cp is not None and cp_depth > 0 and budget.max_nodes > 0:
            cand = self.cp.candidates(
                context, self.calibration, budget.max_nodes, cp_depth, chain=self.chain
            )
        chains: list[torch.Tensor] = []
        if self.context is not None:
            for row in range(b):
                chains.append(self.context.chain(context.history[row], context.max_depth))
        rows = [self._row_nodes(i, context, cand, chains, context.greedy) for i in range(b)]
        # The best nodes first (a child never scores above its parent), root kept at 0.
        orders = [
            sorted(range(1, len(r.tokens)), key=lambda j, r=r: (-r.score[j], r.depth[j], j))
            for r in rows
        ]
        sorted_scores = torch.zeros(b, max((len(o) for o in orders), default=0))
        for i, order in enumerate(orders):
            sorted_scores[i, : len(order)] = torch.tensor([rows[i].score[j] for j in order])
        keep = budget.choose(sorted_scores)
        return self._build(rows, orders, keep, context, cand, device)

    def _row_nodes(
        self,
        i: int,
        context: DraftContext,
        cand: dict[str, torch.Tensor] | None,
        chains: list[torch.Tensor],
        greedy: bool,
    ) -> _Nodes:
        nodes = _Nodes()
        root = int(context.root[i])
        nodes.tokens.append(root)
        nodes.parents.append(-1)
        nodes.depth.append(0)
        nodes.score.append(2.0)  # above every draft: always first
        nodes.q.append(1.0)
        nodes.source.append(CP_SOURCE)
        nodes.kind.append(SAMPLED)
        nodes.origin.append(0)
        children: dict[tuple[int, int], int] = {}
        if cand is not None:
            tokens = cand["tokens"][i].tolist()
            parents = cand["parents"][i].tolist()
            depth = cand["depth"][i].tolist()
            score = cand["score"][i].tolist()
            q = cand["q"][i].tolist()
            for j in range(1, len(tokens)):
                children[(parents[j], tokens[j])] = len(nodes.tokens)
                nodes.tokens.append(tokens[j])
                nodes.parents.append(parents[j])
                nodes.depth.append(depth[j])
                nodes.score.append(score[j])
                nodes.q.append(q[j])
                nodes.source.append(CP_SOURCE)
                nodes.kind.append(SAMPLED)
                nodes.origin.append(j)
        if chains and chains[i].numel():
            tokens = chains[i].tolist()
            depth = torch.arange(1, len(tokens) + 1, device=context.root.device)
            ones = torch.ones(len(tokens))
            score = torch.cumprod(
                self.calibration(torch.full_like(depth, CONTEXT_SOURCE), depth, ones), 0
            ).tolist()
            parent = 0
            for j, token in enumerate(tokens):
                shared = children.get((parent, token)) if greedy else None
                if shared is not None:  # greedy: one node per distinct path (a trie)
                    nodes.score[shared] = max(nodes.score[shared], score[j])
                    parent = shared
                    continue
                index = len(nodes.tokens)
                nodes.tokens.append(token)
                nodes.parents.append(parent)
                nodes.depth.append(j + 1)
                nodes.score.append(score[j])
                nodes.q.append(1.0)
                nodes.source.append(CONTEXT_SOURCE)
                nodes.kind.append(DETERMINISTIC)
                nodes.origin.append(-1)
                children[(parent, token)] = index
                parent = index
        return nodes

    def _build(
        self,
        rows: list[_Nodes],
        orders: list[list[int]],
        keep: int,
        context: DraftContext,
        cand: dict[str, torch.Tensor] | None,
        device: torch.device,
    ) -> Proposal:
        b = len(rows)
        n = 1 + keep
        tokens = torch.zeros(b, n, dtype=torch.long)
        parents = torch.zeros(b, n, dtype=torch.long)
        depth = torch.zeros(b, n, dtype=torch.long)
        valid = torch.zeros(b, n, dtype=torch.bool)
        kind = torch.zeros(b, n, dtype=torch.long)
        score = torch.zeros(b, n)
        source = torch.zeros(b, n, dtype=torch.long)
        q = torch.ones(b, n)
        origin = torch.full((b, n), -1, dtype=torch.long)
        for i, (row, order) in enumerate(zip(rows, orders)):
            chosen = order[:keep]
            if not context.greedy:
                # Level by level; deterministic drafts first among siblings (they are tried
                # first), then the CP slots by score (the best slot gets the first draw).
                chosen = sorted(
                    chosen,
                    key=lambda j, row=row: (
                        row.depth[j],
                        row.kind[j] != DETERMINISTIC,
                        -row.score[j],
                        j,
                    ),
                )
            new_index = {0: 0}
            for slot, j in enumerate(chosen, start=1):
                new_index[j] = slot
            ordered = [0, *chosen]
            for slot, j in enumerate(ordered):
                tokens[i, slot] = row.tokens[j]
                parents[i, slot] = new_index[row.parents[j]] if slot else -1
                depth[i, slot] = row.depth[j]
                valid[i, slot] = True
                kind[i, slot] = row.kind[j]
                score[i, slot] = row.score[j] if slot else 1.0
                source[i, slot] = row.source[j]
                q[i, slot] = row.q[j]
                origin[i, slot] = row.origin[j]
            for slot in range(len(ordered), n):  # padding: a leaf under the root, never taken
                parents[i, slot] = 0
                depth[i, slot] = 1
                kind[i, slot] = DETERMINISTIC
        to = lambda x: x.to(device)  # noqa: E731
        tree = DraftTree(to(tokens), to(parents), to(depth), to(valid), to(kind))
        if not context.greedy:
            tree, q = self._sample(tree, origin.to(device), context, cand, q.to(device))
        return Proposal(tree=tree, score=to(score), source=to(source), q=q.to(device))

    def _sample(
        self,
        tree: DraftTree,
        origin: torch.Tensor,
        context: DraftContext,
        cand: dict[str, torch.Tensor] | None,
        q: torch.Tensor,
    ) -> tuple[DraftTree, torch.Tensor]:
        """Fill the CP nodes of a chosen shape with draws (the context drafts stay)."""
        if self.cp is None or cand is None:  # context drafts only: nothing to draw
            return tree, q
        sampled = (tree.kind == SAMPLED) & tree.valid
        sampled[:, 0] = True
        # The CP part of the shape (context nodes never have CP children): realize it with the
        # context nodes marked out (depth -1), and keep their tokens.
        tokens, valid, child_log_q, q_cp = self.cp.realize(
            tree.parents,
            torch.where(sampled, tree.depth, -1),
            context.root,
            cand["post"][:, 0],
            cand["log_p"],
            context.warp,
            context.generator,
        )
        tokens = torch.where(sampled, tokens, tree.tokens)
        valid = tree.valid & torch.where(sampled, valid, torch.ones_like(valid))
        q = torch.where(sampled, q_cp, q)
        return DraftTree(tokens, tree.parents, tree.depth, valid, tree.kind, child_log_q), q

    def update(self, proposal: Proposal, path: TreePath) -> None:
        """Count every tested draft (its parent is on the accepted path) and its outcome."""
        tree = proposal.tree
        b, n = tree.tokens.shape
        on_path = torch.zeros(b, n, dtype=torch.bool, device=tree.tokens.device)
        on_path.scatter_(1, path.nodes, True)
        parent_on = on_path.gather(1, tree.parents.clamp(min=0))
        tested = tree.valid & parent_on
        tested[:, 0] = False
        self.calibration.update(
            proposal.source[tested], tree.depth[tested], proposal.q[tested], on_path[tested]
        )


# ------------------------------------------------------------------------------ tests
class UniformDrafter:
    """A deliberately uninformed drafter: a chain drawn from the uniform q (greedy: token 0).

    Decoding with it stays exact (the verification step corrects any q); it only accepts less.
    """

    def __init__(self, vocab_size: int, max_depth: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.max_depth = max_depth

    def propose(self, context: DraftContext, budget: TreeBudget) -> Proposal:
        from cpd_mtp.decoding.tree import chain_tree

        b = context.root.shape[0]
        device = context.root.device
        m = min(budget.max_nodes, context.max_depth)
        if self.max_depth is not None:
            m = min(m, self.max_depth)
        log_q = torch.full((b, self.vocab_size), -math.log(self.vocab_size), device=device)
        if context.greedy:
            drafts = torch.zeros(b, m, dtype=torch.long, device=device)
            tree = chain_tree(context.root, drafts)
        else:
            warped = context.warp(log_q)
            from cpd_mtp.decoding.sampling import sample

            draws = [sample(warped, context.generator) for _ in range(m)]
            drafts = torch.stack(draws, 1) if m else context.root.new_zeros(b, 0)
            tree = chain_tree(context.root, drafts)
            tree.child_log_q = warped[:, None].expand(-1, m + 1, -1).contiguous()
        ones = torch.ones(b, m + 1, device=device)
        return Proposal(tree, ones, torch.zeros_like(ones, dtype=torch.long), ones)

    def update(self, proposal: Proposal, path: TreePath) -> None:
        return None


def _columns(parts: list[torch.Tensor]) -> torch.Tensor:
    """(b,) and (b, k) pieces side by side: (b, sum k)."""
    return torch.cat([x if x.dim() == 2 else x[:, None] for x in parts], dim=1)
