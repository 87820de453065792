"""Draft sources: what proposes candidate continuations, one class each.

At every step the decoder hands each source a ``DraftContext`` (the hidden state at the last
accepted position t, the token x_{t+1} the verifier already chose, the rows' tokens so far, and,
when sampling, the warping and the coupled noise) and a ``SourceLimit`` (how many nodes and how
deep, and the calibrated acceptance of its drafts so far). The source answers with
``Candidates``: nodes under the root x_{t+1}, each with its parent, its depth and the source's
own probability q of its token given its parent. ``cpd_mtp.decoding.builder.TreeBuilder``
merges the candidates of any number of sources into one draft tree.

A new source is one class with a ``name``, a ``max_depth`` (its deepest draft; None: no limit)
and ``propose``::

    class RepeatRoot:
        name, max_depth = "repeat", 3

        def propose(self, context, limit):
            depth = min(self.max_depth, limit.max_depth)
            return Candidates.chain(context.root[:, None].expand(-1, depth))

    cpd_mtp.generate(model, ids, 64, drafter=[RepeatRoot(), CPSource(model.head)])

Sources that keep per-row state define ``select(rows)`` (rows that finished are dropped).

When sampling, a source ranks its candidates for output position k by log q(v) + G_k, with the
coupled noise G_k of that position (``DraftContext.perturb``; ``cpd_mtp.decoding.noise``): its
first candidate is then a draw from its q coupled with the verifier's draw. A source that
proposes deterministically (prompt lookup) needs no noise; verification is exact either way.

- ``CPSource``: the CP head's conditionals. Each node's children come from the posterior over
  experts updated with the node's path (no trunk call): pi_a ∝ w_a prod_s p_{s,a}(x_{t+s}),
  q = sum_a pi_a p_{s+1,a}; the best nodes by calibrated path score are kept level by level
  (EAGLE-2's dynamic tree).
- ``ContextSource``: prompt lookup: the tokens that followed the latest earlier occurrence of the
  last tokens, in the prompt or the text generated so far, as one chain.
- ``UniformSource``: an uninformed chain for tests (decoding stays exact, it accepts less).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from cpd_mtp.decoding.noise import PositionNoise
from cpd_mtp.head import CPDMTPHead
from cpd_mtp.ops.few_rows import mark_reused

__all__ = [
    "CPSource",
    "Candidates",
    "ContextSource",
    "DraftContext",
    "DraftSource",
    "HeadPieces",
    "SourceLimit",
    "UniformSource",
]

# (log_w (b, r), log p_1 (b, r, V)): the head's next-token pieces at the anchor (marginal mode).
HeadPieces = tuple[torch.Tensor, torch.Tensor]
Warp = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DraftContext:
    """What a source sees at one step, for the b rows still generating.

    Attributes:
        anchor: (b, d) hidden state at the last accepted position t.
        root: (b,) the kept token x_{t+1}, the tree's root.
        max_depth: the deepest draft allowed this step (>= 0): the rows' remaining budget and
            the call's ``draft_positions``.
        history: one (L_i,) int64 tensor per row: the row's prompt (without padding) and every
            token generated so far, ending with ``root``.
        rows: (b,) the rows' indices in the batch.
        root_position: (b,) the output position (new-token index) of ``root``; a node of depth
            j is the token at ``root_position + j``.
        warp: None for greedy decoding; else the warping of every target and draft
            distribution.
        noise: the call's coupled noise when sampling (else None).
        first: the head's (log_w, log p_1) at the anchor when the decoder has them (marginal
            mode), else None.
    """

    anchor: torch.Tensor
    root: torch.Tensor
    max_depth: int
    history: Sequence[torch.Tensor]
    rows: torch.Tensor | None = None
    root_position: torch.Tensor | None = None
    warp: Warp | None = None
    noise: PositionNoise | None = None
    first: HeadPieces | None = None

    @property
    def greedy(self) -> bool:
        return self.warp is None

    def perturb(
        self, log_q: torch.Tensor, depth: int, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ranking scores of candidates at ``depth``: log q itself when greedy, log q + G
        (the coupled noise of output position ``root_position + depth``) when sampling.

        Args:
            log_q: (b, ..., K) the source's (warped) log-probabilities.
            depth: the candidates' depth (>= 1).
            ids: (K,) the vocabulary ids of ``log_q``'s last axis (a draft vocabulary); None:
                all V ids.
        """
        if self.noise is None:
            return log_q
        positions = (self.root_position + depth)[:, None]
        noise = self.noise(self.rows, positions)[:, 0]  # (b, V)
        if ids is not None:
            noise = noise[:, ids.to(noise.device)]
        shape = (noise.shape[0],) + (1,) * (log_q.dim() - 2) + (noise.shape[-1],)
        return log_q + noise.view(shape).to(log_q.device)


@dataclass
class SourceLimit:
    """What a source may propose this step.

    Attributes:
        max_nodes: the most candidate nodes per row.
        max_depth: the deepest candidate (>= 1).
        chain: propose one chain (the best child of each node), no branching.
        acceptance: the calibrated acceptance probability of this source's drafts,
            ``acceptance(depth, q)`` for tensors of depths and q (what verification showed so
            far in this call; before any, q itself).
    """

    max_nodes: int
    max_depth: int
    chain: bool = False
    acceptance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda depth, q: q


@dataclass
class Candidates:
    """A source's candidate nodes for b rows, M per row, parents before children.

    Attributes:
        tokens: (b, M) int64 token ids.
        parents: (b, M) int64 index of the parent among these candidates; -1: the root x_{t+1}.
        depth: (b, M) int64 depth, >= 1 (the root's children have depth 1).
        q: (b, M) float32 the source's probability of the token given its parent (1 for a
            deterministic proposal), the feature its acceptance is calibrated on.
        valid: (b, M) bool; False for padding.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    q: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def chain(cls, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> Candidates:
        """(b, m) tokens as one deterministic chain under the root (q = 1)."""
        b, m = tokens.shape
        index = torch.arange(m, device=tokens.device)
        return cls(
            tokens=tokens.long(),
            parents=(index - 1).expand(b, -1).contiguous(),
            depth=(index + 1).expand(b, -1).contiguous(),
            q=torch.ones(b, m, device=tokens.device),
            valid=torch.ones(b, m, dtype=torch.bool, device=tokens.device)
            if valid is None
            else valid,
        )

    @classmethod
    def empty(cls, b: int, device: torch.device | str = "cpu") -> Candidates:
        none = torch.zeros(b, 0, dtype=torch.long, device=device)
        return cls(none, none, none, none.float(), none.bool())


@runtime_checkable
class DraftSource(Protocol):
    """Proposes candidate nodes under the root (see the module docstring)."""

    name: str
    max_depth: int | None

    def propose(self, context: DraftContext, limit: SourceLimit) -> Candidates: ...


# ------------------------------------------------------------------------------ CP head
class CPSource:
    """The CP head's conditionals as candidate trees.

    Args:
        head: the model's ``CPDMTPHead``.
        max_depth: the deepest draft (default n_future - 1, the head's).
        children: the most children one node may have.
        width: the most nodes kept per depth.
    """

    name = "cp"

    def __init__(
        self, head: CPDMTPHead, max_depth: int | None = None, children: int = 8, width: int = 32
    ) -> None:
        deepest = head.config.n_future - 1
        if max_depth is not None and not 0 <= max_depth <= deepest:
            raise ValueError(f"the CP head drafts 0..{deepest} tokens deep, got {max_depth}")
        self.head = head
        self.max_depth = deepest if max_depth is None else max_depth
        self.children = children
        self.width = width
        # With a draft vocabulary the experts' distributions live on its K ids.
        self.draft_ids = head.draft_ids
        self.unembedding = None
        if self.draft_ids is not None:
            # W_U is frozen while decoding: gather its K draft rows once, not per step.
            self.unembedding = mark_reused(head._expert_unembedding().detach())

    def _positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> their index among the experts' K ids (-1 outside the draft vocabulary)."""
        return self.head.draft_position(tokens).to(tokens.device)

    def _tokens(self, positions: torch.Tensor) -> torch.Tensor:
        if self.draft_ids is None:
            return positions
        return self.draft_ids.to(positions.device)[positions]

    @torch.no_grad()
    def propose(self, context: DraftContext, limit: SourceLimit) -> Candidates:
        b, device = context.root.shape[0], context.root.device
        depth = min(limit.max_depth, self.max_depth)
        if depth < 1 or limit.max_nodes < 1:
            return Candidates.empty(b, device)
        head = self.head
        log_w, log_p = head.draft_state(
            context.anchor,
            context.root,
            depth=depth,
            first=context.first,
            unembedding=self.unembedding,
        )
        log_p = log_p.float()
        post = head.posterior(log_w.float(), log_p[:, 0], self._positions(context.root))
        frontier_post = post[:, None]  # (b, F, r)
        frontier_score = torch.ones(b, 1, device=device)
        frontier_index = torch.full((b, 1), -1, dtype=torch.long, device=device)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("tokens", "parents", "depth", "q")}
        count, per_node = 0, 1 if limit.chain else self.children
        for d in range(1, depth + 1):
            if count >= limit.max_nodes:
                break
            log_q = head.next_offset(frontier_post, log_p[:, d][:, None])  # (b, F, K)
            if context.warp is not None:
                log_q = context.warp(log_q)
            ranking = context.perturb(log_q, d, self.draft_ids)
            k = min(per_node, log_q.shape[-1])
            top_rank, top_pos = ranking.topk(k, dim=-1)  # (b, F, k)
            if context.greedy:
                top_q = top_rank.exp()
            else:  # the feature calibrated when sampling: the token's weight in the perturbed q
                top_q = (top_rank - torch.logsumexp(ranking, dim=-1, keepdim=True)).exp()
            cand = frontier_score[..., None] * limit.acceptance(torch.full_like(top_pos, d), top_q)
            keep = min(1 if limit.chain else self.width, k * cand.shape[1], limit.max_nodes - count)
            best, pick = cand.flatten(1).topk(keep, dim=-1)  # (b, L)
            slot = pick // k
            pos = top_pos.flatten(1).gather(1, pick)
            parent_post = frontier_post.gather(1, slot[..., None].expand(-1, -1, post.shape[-1]))
            frontier_post = head.posterior(
                parent_post, log_p[:, d][:, None].expand(-1, keep, -1, -1), pos
            )
            parts["tokens"].append(self._tokens(pos))
            parts["parents"].append(frontier_index.gather(1, slot))
            parts["depth"].append(torch.full_like(pos, d))
            parts["q"].append(top_q.flatten(1).gather(1, pick))
            frontier_score = best
            frontier_index = torch.arange(count, count + keep, device=device).expand(b, -1)
            count += keep
        if not count:
            return Candidates.empty(b, device)
        joined = {key: torch.cat(value, dim=1) for key, value in parts.items()}
        return Candidates(valid=torch.ones_like(joined["tokens"], dtype=torch.bool), **joined)


# ------------------------------------------------------------------------------ context
class ContextSource:
    """Prompt lookup: continue the latest earlier occurrence of the last tokens.

    For each row, the last g tokens (g from ``max_ngram`` down to 1) are searched for earlier in
    the row's prompt and generated text; the ``num_tokens`` tokens that followed the latest
    match are proposed as a chain under the root (Hugging Face's ``prompt_lookup_num_tokens``
    searches the same way, taking the first match).

    Args:
        num_tokens: the longest chain proposed.
        max_ngram: the longest suffix matched.
    """

    name = "context"

    def __init__(self, num_tokens: int = 10, max_ngram: int = 3) -> None:
        if num_tokens < 1 or max_ngram < 1:
            raise ValueError(
                f"num_tokens and max_ngram must be >= 1, got {num_tokens} and {max_ngram}"
            )
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.max_depth = num_tokens

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

    def propose(self, context: DraftContext, limit: SourceLimit) -> Candidates:
        b, device = context.root.shape[0], context.root.device
        length = min(limit.max_depth, limit.max_nodes, self.num_tokens)
        chains = [self.chain(history, length) for history in context.history]
        width = max((c.shape[0] for c in chains), default=0)
        if width == 0:
            return Candidates.empty(b, device)
        tokens = torch.zeros(b, width, dtype=torch.long, device=device)
        valid = torch.zeros(b, width, dtype=torch.bool, device=device)
        for i, chain in enumerate(chains):
            tokens[i, : chain.shape[0]] = chain.to(device)
            valid[i, : chain.shape[0]] = True
        return Candidates.chain(tokens, valid)


# ------------------------------------------------------------------------------ tests
class UniformSource:
    """A deliberately uninformed chain: each token drawn from the uniform q (coupled with the
    verifier's noise when sampling; token 0 when greedy). Decoding stays exact; it accepts less.
    """

    name = "uniform"

    def __init__(self, vocab_size: int, max_depth: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.max_depth = max_depth

    def propose(self, context: DraftContext, limit: SourceLimit) -> Candidates:
        b, device = context.root.shape[0], context.root.device
        m = min(limit.max_depth, limit.max_nodes, self.max_depth or limit.max_depth)
        log_q = torch.full((b, self.vocab_size), -math.log(self.vocab_size), device=device)
        drafts = [context.perturb(log_q, d).argmax(-1) for d in range(1, m + 1)]
        tokens = torch.stack(drafts, 1) if m > 0 else context.root.new_zeros(b, 0)
        candidates = Candidates.chain(tokens)
        candidates.q = torch.full_like(candidates.q, 1.0 / self.vocab_size)
        return candidates
