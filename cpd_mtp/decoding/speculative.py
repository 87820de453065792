"""Self-speculative decoding with the CP-MTP head as its own drafter, over draft trees.

One trunk forward per iteration (``SpeculativeDecoder.step``), over a Hugging Face
``DynamicCache``:

1. At the last accepted position t the verifier gives x_{t+1}; it is always kept.
2. The tree builder (``cpd_mtp.decoding.builder``) merges the candidates of the draft sources
   (``cpd_mtp.decoding.sources``) into a tree rooted at x_{t+1}: the CP head's conditionals
   (pi_a ∝ w_a prod_s p_{s,a}(x_{t+s}), q = sum_a pi_a p_{s+1,a}) branch at each node, and
   context matches add branches. A chain of drafts is a tree with one branch.
3. One forward feeds every node (a chain under a 2-D mask, a tree under a 4-D one,
   ``cpd_mtp.decoding.forward``); the verifier's distribution at each node is the target of its
   children. Verification (``cpd_mtp.decoding.tree.verify``) accepts a path and chooses the
   token after it; the cache keeps the prefix and the accepted path, and the builder hears what
   was accepted (its calibration of each source).

Verification is exact unless the call opts into a lossy rule (``acceptance="typical"`` or
``"confident"``, ``cpd_mtp.decoding.acceptance``), which accepts drafts against the verifier's
choice and says so in the output. Exact greedy output equals autoregressive greedy decoding of
the verifier token for token; sampled
output is distributed exactly as autoregressive sampling of the (warped) verifier, and is a
function of the call's seed and inputs alone (``cpd_mtp.decoding.noise``). Exactness
against Hugging Face greedy ``generate``: in float32 the tokens are identical (a flip would need
a top-2 tie within float32 rounding); in bf16 (or fp16) the trunk's hidden states are rounded to
that dtype and the verification forward runs other matrix shapes than one-token decoding, so the
two may differ where the top-2 next-token log-probabilities are within that rounding of each
other (the head itself computes its logits in float32, see ``CPDMTPHead.expert_log_probs``).

Batching (B > 1, left padding). Rows accept paths of different lengths. All rows share one
cache whose columns are *cache slots*: after verification each row's accepted path is gathered
behind the prefix, and the slots of a row's shorter path become *holes*, masked out of that
row's ``attention_mask``; ``cpd_mtp.decoding.cache.compact`` then right-aligns each row's real
slots. Each row keeps its own position counter (``position_ids`` = number of real tokens before
the token, as Hugging Face derives them from a left-padded mask), so every row sees exactly the
keys, values and positions of its own accepted sequence. Rows that finish (EOS or
``max_new_tokens``) are removed from the batch and the cache, so they cost nothing more.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from cpd_mtp.decoding.acceptance import Acceptance
from cpd_mtp.decoding.builder import CALIBRATED_DEPTH, Proposal, TreeBuilder
from cpd_mtp.decoding.cache import compact, decoding_cache, keep_slots
from cpd_mtp.decoding.calibration import AcceptanceCalibration
from cpd_mtp.decoding.cost import PROBE_SIZES, ForwardCost
from cpd_mtp.decoding.forward import feed_chain, feed_tree, tree_attention_support
from cpd_mtp.decoding.inputs import (
    check_inputs,
    check_warpers,
    is_int,
    reject_unsupported,
    resolve_special_tokens,
    warn_past_max_positions,
)
from cpd_mtp.decoding.noise import PositionNoise
from cpd_mtp.decoding.options import DraftOptions
from cpd_mtp.decoding.output import GenerationOutput, StreamCallback, TokenBuffer
from cpd_mtp.decoding.sampling import apply_warpers, build_warpers
from cpd_mtp.decoding.sources import ContextSource, CPSource, DraftContext, DraftSource
from cpd_mtp.decoding.stats import DraftCounter
from cpd_mtp.decoding.tree import verify
from cpd_mtp.ops.few_rows import few_row_linear, few_row_linears

__all__ = ["AUTO_MAX_NODES", "RowState", "SpeculativeDecoder", "build_tree_builder", "generate"]

Warp = Callable[[torch.Tensor], torch.Tensor]

# The most draft nodes an automatic tree may feed per row (a forward of 64 tokens), and the
# most tokens a timed probe forward feeds in all (rows x nodes).
AUTO_MAX_NODES = 63
MAX_PROBE_TOKENS = 4096
# Each model's measured forward cost by fed tokens, and its sources' acceptance counts, kept
# across calls.
_FORWARD_COSTS: weakref.WeakKeyDictionary[Any, ForwardCost] = weakref.WeakKeyDictionary()
_CALIBRATIONS: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


@dataclass
class RowState:
    """What one iteration hands to the next, for the b rows still generating.

    Attributes:
        rows: (b,) their indices in the batch.
        mask: (b, S) bool, each row's real cache slots.
        n_valid: (b,) each row's real cached tokens, the next position id.
        anchor: (b, d) hidden state at the last accepted position.
        pieces: the head's (log_w, log p_1) at the anchor (marginal mode), else None.
        pending: (b,) the token x_{t+1} chosen but not yet fed to the trunk.
    """

    rows: torch.Tensor
    mask: torch.Tensor
    n_valid: torch.Tensor
    anchor: torch.Tensor
    pieces: tuple[torch.Tensor, torch.Tensor] | None
    pending: torch.Tensor

    def select(self, index: torch.Tensor) -> None:
        """Keep the rows at ``index`` (of the b live rows), in place."""
        self.rows, self.mask, self.n_valid = self.rows[index], self.mask[index], self.n_valid[index]
        self.anchor, self.pending = self.anchor[index], self.pending[index]
        if self.pieces is not None:
            self.pieces = (self.pieces[0][index], self.pieces[1][index])


class SpeculativeDecoder:
    """The state of one self-speculative decoding call over a batch of B rows.

    Args:
        model: a ``CPDMTPForCausalLM`` (``trunk_hidden`` and a ``CPDMTPHead`` as ``head``).
        builder: where each step's draft tree comes from (its sources, calibration and cost).
        max_depth: the deepest draft per iteration (0: plain autoregressive decoding).
        buffer: receives the new tokens.
        trees: whether the model takes tree forwards (else every tree must be a chain).
        warp: the warping of every target and draft distribution; None for greedy decoding.
        noise: the coupled noise of sampling (``cpd_mtp.decoding.noise``); None when greedy.
        min_new_tokens: EOS is removed from the targets of a row's first ``min_new_tokens`` new
            tokens (Hugging Face's ``min_new_tokens``; drafts of EOS there are then rejected).
        prompt_mask: (B, T) bool, the prompt's real tokens (for the sources' history).
        capture_states: keep the trunk's final hidden state of every token fed (the prompt's
            and the accepted ones'), per row, for training a drafter on them
            (``GenerationOutput.states``).
        acceptance: which drafts verification accepts (``cpd_mtp.decoding.acceptance``);
            exact by default.
    """

    def __init__(
        self,
        model: Any,
        builder: TreeBuilder,
        max_depth: int,
        buffer: TokenBuffer,
        *,
        trees: bool = True,
        warp: Warp | None = None,
        noise: PositionNoise | None = None,
        min_new_tokens: int = 0,
        prompt_mask: torch.Tensor | None = None,
        capture_states: bool = False,
        acceptance: Acceptance | None = None,
    ) -> None:
        if (warp is None) != (noise is None):
            raise ValueError("sampling needs both warp and noise; greedy decoding neither")
        self.model = model
        self.builder = builder
        self.max_depth = max_depth
        self.buffer = buffer
        self.trees = trees
        self.warp = warp
        self.noise = noise
        self.min_new_tokens = min_new_tokens
        self.prompt_mask = prompt_mask
        self.acceptance = acceptance or Acceptance()
        self.counter = DraftCounter(
            buffer.counts.shape[0], max_depth, buffer.counts.device, self.acceptance.describe()
        )
        # Which sources are the CP head (the confident rule reads their draft probabilities).
        self.head_sources = torch.tensor(
            [isinstance(source, CPSource) for source in builder.sources],
            device=buffer.counts.device,
        )
        self.done = False
        batch = buffer.counts.shape[0]
        self.captured: list[list[torch.Tensor]] | None = (
            [[] for _ in range(batch)] if capture_states else None
        )

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Run the (B, T) prompt under its (B, T) bool mask and emit the first new token."""
        positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        hidden, self.cache = self.model.trunk_hidden(
            input_ids,
            attention_mask=mask.long(),
            position_ids=positions,
            cache=decoding_cache(self.model),
            use_cache=True,
        )
        self.counter.count_forward(rows)
        if self.captured is not None:
            for i in range(input_ids.shape[0]):
                self.captured[i].append(hidden[i][mask[i]])
        anchor = hidden[:, -1]  # (B, d)
        scores, pieces = self._next_token(anchor)
        index = self.buffer.counts[rows]  # new token 0 of each row
        target = self._target(scores, index)
        pending = torch.argmax(self._choice(target, rows, index), dim=-1)
        self.state = RowState(rows, mask, mask.sum(dim=1), anchor, pieces, pending)
        ones = torch.ones_like(pending)
        finished = self.buffer.emit(rows, pending[:, None], ones, target[:, None])
        self._drop(finished)

    def measure_cost(self, cost: ForwardCost) -> None:
        """Time forwards of the probe sizes after the current cache, then drop what they fed."""
        state = self.state
        live = state.rows.shape[0]

        def forward(size: int) -> None:
            tokens = state.pending[:, None].expand(live, size)
            hidden, self.cache = feed_chain(
                self.model, tokens, state.mask, state.n_valid, self.cache
            )
            self._next_token(hidden)
            self.cache.crop(-size)  # transformers 5 crops by a negative count

        # Sizes up to MAX_PROBE_TOKENS fed in all (a big batch needs no wide trees).
        sizes = tuple(s for s in PROBE_SIZES if s == 1 or s * live <= MAX_PROBE_TOKENS)
        cost.measure(forward, sizes)
        # Costs are kept by the tokens fed in all (rows x nodes).
        cost.seconds = {size * live: seconds for size, seconds in cost.seconds.items()}

    def step(self) -> None:
        """One iteration: draft a tree -> forward -> verify -> emit -> keep the path."""
        state = self.state
        rows, live = state.rows, state.rows.shape[0]
        remaining = self.buffer.remaining(rows)  # >= 1 for every live row
        counts = self.buffer.counts[rows]

        # Draft a tree under the kept token x_{t+1} (new token number counts - 1).
        context = DraftContext(
            anchor=state.anchor,
            root=state.pending,
            max_depth=min(self.max_depth, int(remaining.max()) - 1),
            history=self._history(rows),
            rows=rows,
            root_position=counts - 1,
            warp=self.warp,
            noise=self.noise,
            first=state.pieces,
        )
        proposal = self.builder.propose(context)
        tree = proposal.tree
        chain = tree.is_chain
        if not (chain or self.trees):
            raise RuntimeError("the draft sources proposed a tree for a model that takes chains")

        # One forward over every node: the verifier at each node is its children's target.
        start = time.perf_counter()
        before = self.cache.get_seq_length()
        if chain:
            hidden, self.cache = feed_chain(
                self.model, tree.tokens, state.mask, state.n_valid, self.cache
            )
        else:
            hidden, self.cache = feed_tree(self.model, tree, state.mask, state.n_valid, self.cache)
        scores, pieces = self._next_token(hidden)  # (b, N, V)
        if self.builder.cost is not None:
            self.builder.cost.record(live * tree.size, time.perf_counter() - start)
        self.counter.count_forward(rows, tree.size - 1)

        # Verify: accept a path, choose the token after it. Node u predicts new token number
        # counts + depth(u) of its row.
        index = counts[:, None] + tree.depth
        target = self._target(scores, index)
        choice = self._choice(target, rows, index)
        path = verify(tree, choice, self._acceptable(proposal, target, choice))
        self.builder.update(proposal, path)
        if self.captured is not None:  # the fed tokens that stay: the root and the drafts taken
            for i, row in enumerate(rows.tolist()):
                self.captured[row].append(hidden[i, path.nodes[i, : int(path.accepted[i]) + 1]])
        path_tokens = tree.tokens.gather(1, path.nodes)  # (b, D + 1), root first
        self.counter.count_verification(path, path_tokens, remaining, self.buffer.eos)

        # Emit the accepted drafts and the token after them (cut at EOS and the budget).
        accepted = path.accepted
        emitted = torch.cat([path_tokens[:, 1:], path_tokens.new_zeros(live, 1)], dim=1)
        emitted.scatter_(1, accepted[:, None], path.next_token[:, None])
        gather = path.nodes[..., None].expand(-1, -1, target.shape[-1])
        finished = self.buffer.emit(rows, emitted, accepted + 1, target.gather(1, gather))

        # Keep the prefix and the accepted path (root first); a shorter path leaves holes.
        longest = int(accepted.max())
        kept = torch.arange(longest + 1, device=accepted.device)[None] <= accepted[:, None]
        if chain:
            if tree.size - 1 > longest:
                self.cache.crop(-(tree.size - 1 - longest))
        else:
            keep_slots(self.cache, before, path.nodes)
        state.mask = torch.cat([state.mask, kept], dim=1)
        if bool((accepted < longest).any()) or not bool(state.mask[:, 0].any()):
            state.mask = compact(self.cache, state.mask)
        state.n_valid = state.n_valid + accepted + 1

        # The last accepted node is the next anchor; the chosen token waits to be fed.
        batch = torch.arange(live, device=accepted.device)
        last = path.nodes[batch, accepted]
        state.anchor = hidden[batch, last]  # (b, d)
        if pieces is not None:
            state.pieces = (pieces[0][batch, last], pieces[1][batch, last])
        state.pending = path.next_token
        self._drop(finished)

    def output(self, input_ids: torch.Tensor, start_time: float) -> GenerationOutput:
        """The sequences and statistics so far; ``start_time`` from ``time.perf_counter``."""
        stats = self.counter.finish(self.buffer.counts)
        if self.builder.cost is not None:
            stats.forward_cost = self.builder.cost.relative()
        out = GenerationOutput.from_stats(
            self.buffer.sequences(input_ids), stats, time.perf_counter() - start_time
        )
        if self.captured is not None:
            # A row's states: one per real prompt token and per new token but the last (never
            # fed); cut where the row ended (tokens after an EOS were fed but not emitted).
            out.states = []
            for row, parts in enumerate(self.captured):
                fed = torch.cat(parts) if parts else input_ids.new_zeros(0, 0).float()
                prompt = (
                    int(self.prompt_mask[row].sum())
                    if self.prompt_mask is not None
                    else (input_ids.shape[1])
                )
                out.states.append(fed[: prompt + max(int(self.buffer.counts[row]) - 1, 0)])
        return out

    def _history(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Each live row's prompt (without padding) and new tokens so far (ending with x_{t+1})."""
        prompt, counts, tokens = self.buffer.prompt, self.buffer.counts, self.buffer.tokens
        history = []
        for row in rows.tolist():
            real = prompt[row] if self.prompt_mask is None else prompt[row][self.prompt_mask[row]]
            history.append(torch.cat([real, tokens[row, : int(counts[row])]]))
        return history

    def _next_token(self, hidden: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """The next-token scores at every position of (..., d) ``hidden``, and the head's
        pieces there when the CP source can reuse them.

        ``base`` mode: the wrapped model's own logits (its lm_head, cast to float32 as HF
        ``generate`` does), no pieces: the CP source computes the head only at the anchor.
        ``marginal`` mode: the CP marginal, with (log_w, log_p_1) for the CP source.
        """
        head = self.model.head
        if head.config.next_token == "base":
            # ``head.base_logits`` in the few-row layout (equal up to float rounding).
            return few_row_linear(hidden, head.weight).float(), None
        marginal, log_w, log_p1 = head.marginal_and_pieces(hidden)
        return marginal, (log_w, log_p1)

    def _target(self, scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Greedy: the scores as they are (argmax); sampling: warped, normalised log-probs.

        ``scores`` (b, [k,] V) predict new tokens number ``index`` (b, [k]) of their rows; EOS is
        masked out of those before ``min_new_tokens`` first, as Hugging Face's min-length
        processors do before its warpers.
        """
        eos = self.buffer.eos
        if self.min_new_tokens and eos.numel() and int(index.min()) < self.min_new_tokens:
            early = (index < self.min_new_tokens)[..., None]  # (b, [k,] 1)
            is_eos = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            is_eos[eos] = True
            scores = scores.masked_fill(early & is_eos, -torch.inf)
        return scores if self.warp is None else self.warp(scores)

    def _choice(
        self, target: torch.Tensor, rows: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """What the verifier's choice is the argmax of: the target itself when greedy; when
        sampling, the target plus the coupled noise of each output position (a draw)."""
        if self.noise is None:
            return target
        positions = index if index.dim() == 2 else index[:, None]
        noise = self.noise(rows, positions).to(target.device)
        return target + (noise if index.dim() == 2 else noise[:, 0])

    def _acceptable(
        self, proposal: Proposal, target: torch.Tensor, choice: torch.Tensor
    ) -> torch.Tensor | None:
        """(b, N) the nodes a lossy rule accepts; None when exact (``verify``'s own match)."""
        rule = self.acceptance
        if not rule.lossy:
            return None
        tree = proposal.tree
        log_p = head_log_q = None
        if rule.rule == "typical":
            # Greedy targets are raw scores (normalised by the rule: the model's distribution at
            # temperature 1); sampled ones the warped log-probabilities.
            log_p = target
        else:
            is_head = self.head_sources[proposal.source]  # (b, N)
            head_log_q = torch.where(is_head, proposal.q.clamp(min=0).log(), -torch.inf)
        return rule.acceptable(tree.tokens, tree.parents, choice.argmax(-1), log_p, head_log_q)

    def _drop(self, finished: torch.Tensor) -> None:
        """Remove the (b,) finished rows from the state and the cache."""
        if not bool(finished.any()):
            return
        index = (~finished).nonzero().squeeze(1)
        if index.numel() == 0:
            self.done = True
            return
        self.cache.batch_select_indices(index)
        self.state.select(index)
        self.builder.select(index)


def build_tree_builder(
    model: Any,
    options: DraftOptions,
    drafter: DraftSource | Sequence[DraftSource] | None,
    trees: bool,
    cost: ForwardCost | None,
    sampling: bool = False,
) -> TreeBuilder:
    """The sources and the tree sizing of one call, from its options.

    Default sources: the CP head (``CPSource``, as deep as ``draft_positions``) and, when the
    options ask for them, context drafts (``ContextSource``). ``drafter``: the caller's own
    source(s) instead, each capped at ``draft_positions``. A model that takes no tree forward
    decodes with the best chain of the same sources.
    """
    chain = options.tree == "chain" or not trees
    if drafter is None:
        sources: list[DraftSource] = [CPSource(model.head, max_depth=options.positions)]
        if options.context:
            sources.append(ContextSource(num_tokens=options.context))
        caps: dict[int, int] = {}
    else:
        sources = _as_sources(drafter)
        caps = {i: options.positions for i in range(len(sources))}
        if options.positions is None:
            caps = {}
    max_nodes = options.tree if isinstance(options.tree, int) else AUTO_MAX_NODES
    if options.positions == 0:  # plain autoregressive decoding
        max_nodes = 0
    by_cost = cost if options.sized_by_cost and not chain else None
    return TreeBuilder(
        sources,
        max_nodes,
        cost=by_cost,
        chain=chain,
        depth_caps=caps,
        # A lossy rule's output depends on the tree, so its calibration starts afresh in each
        # call: with a fixed draft_tree the output is a function of the inputs and the seed.
        calibration=None
        if options.acceptance.lossy
        else _calibration(model, sampling, sources, caps),
    )


def _calibration(
    model: Any, sampling: bool, sources: Sequence[DraftSource], caps: dict[int, int]
) -> AcceptanceCalibration:
    """The acceptance counts of these sources on this model, kept across calls: what every
    earlier exact call verified (greedy and sampled apart: their q features differ)."""
    kept = _CALIBRATIONS.get(model)
    if kept is None:
        kept = {}
        _CALIBRATIONS[model] = kept
    key = (sampling, tuple(source.name for source in sources), tuple(sorted(caps.items())))
    if key not in kept:
        kept[key] = AcceptanceCalibration(sources=len(sources), max_depth=CALIBRATED_DEPTH)
    return kept[key]


def _as_sources(drafter: DraftSource | Sequence[DraftSource]) -> list[DraftSource]:
    return [drafter] if isinstance(drafter, DraftSource) else list(drafter)


def _forward_cost(model: Any) -> ForwardCost:
    costs = _FORWARD_COSTS.get(model)
    if costs is None:
        costs = ForwardCost()
        _FORWARD_COSTS[model] = costs
    return costs


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    draft_tree: int | str | None = None,
    context_drafts: bool | int | None = None,
    draft_positions: int | None = None,
    drafter: DraftSource | Sequence[DraftSource] | None = None,
    stream: StreamCallback | None = None,
    streamer: BaseStreamer | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    min_new_tokens: int = 0,
    warpers: LogitsProcessorList | None = None,
    capture_states: bool = False,
    acceptance: str | None = None,
    typical_epsilon: float | None = None,
    typical_delta: float | None = None,
    confidence: float | None = None,
    accept_verified: bool | None = None,
    **unsupported: Any,
) -> GenerationOutput:
    """Self-speculative decoding of a ``CPDMTPForCausalLM``.

    Args:
        model: a ``CPDMTPForCausalLM`` (anything with ``trunk_hidden`` and a ``CPDMTPHead`` as
            ``head``), in eval mode.
        input_ids: (B, T) prompt ids, left-padded when B > 1.
        max_new_tokens: most new tokens per row.
        do_sample: sample from the warped model distribution (coupled with the drafts, see
            ``cpd_mtp.decoding.noise``); False: greedy.
        temperature, top_k, top_p: warping applied identically to the target p and the drafts q
            (Hugging Face's logits warpers, see ``cpd_mtp.decoding.sampling.build_warpers``,
            which validates them); ignored when greedy.
        eos_token_id: one id or several; a row stops after emitting one of them. None: the
            model's ``generation_config.eos_token_id``, as in HF ``generate`` (a model without a
            generation config: its config's); ``[]``: no EOS, always ``max_new_tokens``.
        attention_mask: (B, T) 1 for real tokens, 0 for (left) padding.
        pad_token_id: fills rows after their EOS. None: the model's ``generation_config`` pad
            id (likewise), else the first EOS id, else 0.
        generator: random source for sampling: one number is drawn from it (from torch's global
            random state when None), and the output is a function of that number and the
            inputs alone, whatever the draft trees.
        draft_tree: the draft tree of each forward. ``"auto"`` (default, None): the CP head's
            tree and context drafts, sized per step to maximise expected tokens per second
            under the forward cost measured on this machine (timed once per model, then on
            every forward). An int T: the best T draft nodes (0: autoregressive decoding).
            ``"chain"``: one chain of the head's top drafts, no branching. A model whose
            attention takes no 4-D mask decodes with chains (one INFO line says why).
        context_drafts: prompt lookup (``ContextSource``): True, False, or an int, the
            longest continuation proposed (default 10; on unless ``draft_tree="chain"``).
        draft_positions: the deepest CP draft, 0 <= m <= n_future - 1 (default n_future - 1);
            0 is plain autoregressive decoding. With ``drafter``: the deepest draft.
        drafter: a draft source of your own (``cpd_mtp.decoding.sources.DraftSource``), or a
            list of them, used in place of the CP head and context drafts.
        stream: called after each forward with the newly accepted token ids of every row
            (a list of B lists, empty for rows with nothing new).
        streamer: a ``transformers`` streamer (``TextStreamer``, ``TextIteratorStreamer``, any
            ``BaseStreamer``), fed as Hugging Face ``generate`` feeds it: ``put`` the (B, T)
            prompt, then the new tokens as they are accepted (a (k,) chunk per forward when
            B = 1; (B,) columns when B > 1), then ``end``.
        stopping_criteria: a ``transformers`` ``StoppingCriteriaList`` (or a callable with its
            signature). It is called after every new token, on that row's sequence (1, T + k)
            and the token's target scores (1, V), and a row stops right after the token where it
            returns True; criteria that judge each row on its own (all of Hugging Face's) stop
            where Hugging Face's loop stops.
        min_new_tokens: EOS cannot end a row before this many new tokens (as in HF).
        warpers: a ``LogitsProcessorList`` of Hugging Face warpers used instead of
            ``temperature`` / ``top_k`` / ``top_p`` when sampling (``model.generate`` passes
            the ones it would apply). Only warpers that read the scores alone are served:
            ``Temperature``, ``TopK``, ``TopP``, ``MinP``, ``Typical``, ``Epsilon``, ``Eta``.
        capture_states: also return, per row, the trunk's final hidden state of every real
            prompt token and every new token but the last (``GenerationOutput.states``): what
            the decoding computed anyway, the inputs of a drafter trained on the model's own
            text, with no second pass.
        acceptance: ``"exact"`` (default, None): the original model's output. ``"typical"``
            (Medusa-2's typical acceptance) and ``"confident"`` (drafts the CP head is confident
            of, after ConfAdapt) are lossy: faster, but the text may differ from the original
            model's (``cpd_mtp.decoding.acceptance``; the output's ``acceptance`` and
            ``unverified_tokens`` say so). Their output depends on the draft tree: with an int
            ``draft_tree`` or ``"chain"`` it is a function of the inputs and the seed; with
            ``"auto"`` the tree's size follows the measured forward cost, so it may vary.
        typical_epsilon, typical_delta: ``"typical"`` accepts a draft whose verifier
            probability exceeds min(epsilon, delta * exp(-entropy)); each in (0, 1], default
            0.09 and 0.3.
        confidence: ``"confident"`` accepts a head draft whose own conditional probability is
            at least this, in (0, 1] (default 0.9; 1: exact decoding).
        accept_verified: ``"confident"`` also accepts drafts the verifier chooses (default
            True).

    Returns:
        ``GenerationOutput`` with ``sequences`` (B, T + L) and the statistics.

    Raises:
        ValueError: an argument out of its range or of the wrong type (prompt ids outside
            [0, V), a non-integer ``max_new_tokens``, a NaN temperature, ...), named; or an
            argument of Hugging Face ``generate`` this decoder does not serve exactly
            (``repetition_penalty``, ``num_beams``, ...): ``model.generate`` runs those
            through Hugging Face's own loop.
    """
    start_time = time.perf_counter()
    # Check every argument before any forward.
    reject_unsupported(unsupported)
    options = DraftOptions.parse(
        draft_tree,
        context_drafts,
        draft_positions,
        acceptance,
        typical_epsilon,
        typical_delta,
        confidence,
        accept_verified,
    )
    vocab_size = model.head.config.vocab_size
    mask = check_inputs(input_ids, attention_mask, max_new_tokens, vocab_size)
    if not is_int(min_new_tokens) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new_tokens!r}")
    warn_past_max_positions(model, input_ids.shape[1], max_new_tokens)
    warp = noise = None
    if do_sample:
        if warpers is None:
            warpers = build_warpers(temperature, top_k, top_p)
        check_warpers(warpers)
        warp = functools.partial(apply_warpers, warpers)
        noise = PositionNoise.from_generator(generator, vocab_size, input_ids.device)
    sample_ids = input_ids[0][mask[0]]
    if sample_ids.numel() < 6:
        sample_ids = torch.cat(
            [sample_ids, torch.zeros(6, dtype=torch.long, device=input_ids.device)]
        )
    trees = options.tree != "chain" and tree_attention_support(model, sample_ids)[0]
    cost = _forward_cost(model) if options.sized_by_cost and trees else None
    deepest = model.head.config.n_future - 1
    if drafter is not None:
        deepest = TreeBuilder(_as_sources(drafter), 0).max_depth
    if options.positions is not None and deepest is not None and options.positions > deepest:
        raise ValueError(
            f"draft_positions must be an int in [0, {deepest}], got {options.positions!r}"
        )
    builder = build_tree_builder(model, options, drafter, trees, cost, sampling=do_sample)
    if options.acceptance.rule == "confident" and not any(
        isinstance(source, CPSource) for source in builder.sources
    ):
        raise ValueError(
            "acceptance='confident' reads the CP head's own draft probabilities, and this "
            "call's drafter has no CPSource: use acceptance='typical' or the default sources"
        )
    max_depth = builder.max_depth if builder.max_depth is not None else AUTO_MAX_NODES
    if builder.cost is not None:  # no wider than what a probe may time
        builder.max_nodes = min(
            builder.max_nodes, max(MAX_PROBE_TOKENS // input_ids.shape[0] - 1, 0)
        )
    eos, pad_token_id = resolve_special_tokens(model, eos_token_id, pad_token_id, input_ids.device)
    buffer = TokenBuffer(
        input_ids.shape[0],
        max_new_tokens,
        pad_token_id,
        eos,
        stream,
        prompt=input_ids,
        stopping=stopping_criteria or None,
        streamer=streamer,
    )
    decoder = SpeculativeDecoder(
        model,
        builder,
        max_depth,
        buffer,
        trees=trees,
        warp=warp,
        noise=noise,
        min_new_tokens=min_new_tokens,
        prompt_mask=mask,
        capture_states=capture_states,
        acceptance=options.acceptance,
    )
    if streamer is not None:
        streamer.put(input_ids.cpu())  # the prompt first, as Hugging Face's generate does

    if max_new_tokens > 0:
        # The verification forwards feed a few tokens: on a CPU their linear layers run in the
        # layout that reads each weight at bandwidth (see ``cpd_mtp.ops.few_rows``).
        with few_row_linears(model):
            # The prompt's last position gives x_{t+1}; then one iteration per forward until
            # every row has emitted EOS or max_new_tokens.
            decoder.prefill(input_ids, mask)
            if cost is not None and not cost.measured and not decoder.done:
                decoder.measure_cost(cost)  # once per model: what a forward of N tokens costs
            while not decoder.done:
                decoder.step()
    buffer.close()
    return decoder.output(input_ids, start_time)
