"""Self-speculative decoding with the CP-MTP head as its own drafter.

One trunk forward per iteration, over a Hugging Face ``DynamicCache``:

1. At the last accepted position t the marginal gives x_{t+1}; it is always kept.
2. The head at t drafts x_{t+2..t+m+1} from the CP *conditionals* given what is already chosen:
   pi_a ∝ w_a prod_{s<=k} p_{s,a}(x_{t+s}) and q_{k+1} = sum_a pi_a p_{k+1,a}
   (``CPDMTPHead.conditional``), one token after the other (greedy: argmax; sampling: a draw).
3. The next forward feeds [x_{t+1}, drafts]. The marginal at each fed position is the target p_j
   of the next token: drafts are verified against it (``cpd_mtp.decoding.sampling.verify``: greedy
   equality or rejection sampling), and it gives the correction / bonus token. The cache is
   cropped to the accepted tokens, and the head at the new last accepted position drafts again.

Greedy output equals autoregressive greedy decoding of the marginal token for token; sampled
output is distributed exactly as autoregressive sampling of the (warped) marginal. Exactness
against Hugging Face greedy ``generate``: in float32 the tokens are identical (a flip would need
a top-2 tie within float32 rounding); in bf16 (or fp16) the trunk's hidden states are rounded to
that dtype and the verification forward runs other matrix shapes than one-token decoding, so the
two may differ where the top-2 next-token log-probabilities are within that rounding of each
other (the head itself computes its logits in float32, see ``CPDMTPHead.expert_log_probs``).

The cache is a ``DynamicCache`` whose layers all keep the full history, also for sliding-window
trunks (Mistral, Qwen2, Gemma): the model config still applies the window in the attention
mask, but a sliding cache layer would have dropped the keys that cropping rejected drafts must
bring back.

Batching (B > 1, left padding). Rows accept different numbers of drafts. All rows share one
cache whose columns are *cache slots*: after verification the cache is cropped to the longest
accepted prefix in the batch, and the slots of a row's rejected drafts inside it become *holes*,
masked out of that row's ``attention_mask``. The cache is then compacted: within each row the
masked slots (left padding and holes) are moved to the left and the accepted tokens kept in
order, right-aligned, as in Hugging Face's own left-padded decoding; columns masked in every
row are dropped. So slot distance equals position distance in every row, which the
sliding-window mask (computed on slots) needs. Each row keeps its own position counter
(``position_ids`` = number of real tokens before the token, as Hugging Face derives them from a
left-padded mask), so every row sees exactly the keys, values and positions of its own accepted
sequence. Rows that finish (EOS or ``max_new_tokens``) are removed from the batch and the cache
(``batch_select_indices``), so they cost nothing more.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cpd_mtp.decoding.sampling import check_warping, sample, verify, warp_log_probs
from cpd_mtp.head import CPDMTPHead

__all__ = [
    "CPDrafter",
    "Drafter",
    "GenerationOutput",
    "UniformDrafter",
    "autoregressive_generate",
    "compare_decoding",
    "generate",
    "left_pad",
]

StreamCallback = Callable[[list[list[int]]], None]


# ----------------------------------------------------------------------------- drafters


@runtime_checkable
class Drafter(Protocol):
    """Proposes draft distributions from the hidden state at the last accepted position.

    ``max_drafts`` is the most drafts per step the drafter can give (None: unbounded).
    ``start(hidden (B, d), num_drafts)`` returns any per-step state; ``next(state, chosen (B, k))``
    returns (B, V) normalised log-probabilities of token x_{t+k+1} given the k tokens
    x_{t+1..t+k} already chosen (k = 1 .. num_drafts; x_{t+1} is the always-kept token).
    """

    max_drafts: int | None

    def start(self, hidden: torch.Tensor, num_drafts: int) -> Any: ...

    def next(self, state: Any, chosen: torch.Tensor) -> torch.Tensor: ...


class CPDrafter:
    """The CP head's own conditionals: the default drafter.

    ``start`` computes log w (B, r) and log p_{s,a} (B, num_drafts + 1, r, V) at the anchor;
    ``next`` is ``CPDMTPHead.conditional``: the posterior over experts updated by each chosen
    token, then the mixture of the next offset's expert distributions.
    """

    def __init__(self, head: CPDMTPHead) -> None:
        self.head = head
        self.max_drafts = head.config.n_future - 1

    @torch.no_grad()
    def start(
        self,
        hidden: torch.Tensor,
        num_drafts: int,
        first: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) -> (log_w (B, r), log_p (B, num_drafts + 1, r, V)).

        ``first``: (log_w (B, r), log p_{1,a} (B, r, V)) already computed at ``hidden`` (the
        decoder has them from the marginal); only offsets 2.. are then computed here.
        """
        if first is None:
            log_w = self.head.log_gate(hidden)
            return log_w, self.head.expert_log_probs(hidden, slice(0, num_drafts + 1))
        log_w, log_p1 = first
        if num_drafts == 0:
            return log_w, log_p1[:, None]
        rest = self.head.expert_log_probs(hidden, slice(1, num_drafts + 1))
        return log_w, torch.cat([log_p1[:, None].to(rest.dtype), rest], dim=1)

    def next(self, state: tuple[torch.Tensor, torch.Tensor], chosen: torch.Tensor) -> torch.Tensor:
        """chosen (B, k) -> log q_{k+1} (B, V)."""
        log_w, log_p = state
        return CPDMTPHead.conditional(log_w, log_p, chosen)[1]


class UniformDrafter:
    """A deliberately uninformed drafter: q is uniform over the vocabulary.

    Decoding with it stays exact (the verification step corrects any q); it only accepts less.
    """

    def __init__(self, vocab_size: int, max_drafts: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.max_drafts = max_drafts

    def start(self, hidden: torch.Tensor, num_drafts: int) -> torch.Tensor:
        """(B, d) -> (B, V) uniform log q, the same for every offset."""
        value = -math.log(self.vocab_size)
        return torch.full((hidden.shape[0], self.vocab_size), value, device=hidden.device)

    def next(self, state: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return state


# ----------------------------------------------------------------------------- output


@dataclass
class GenerationOutput:
    """Generated sequences and decoding statistics.

    Attributes:
        sequences: (B, T + L) prompt followed by the new tokens; L is the longest continuation in
            the batch, rows that stopped earlier (EOS) are padded with ``pad_token_id`` after it,
            as in Hugging Face ``generate``.
        forwards: trunk forwards (batched calls), the prefill included: 1 + ``iterations``.
        iterations: speculative iterations (forwards after the prefill).
        row_forwards: (B,) forwards during which each row was still generating.
        new_tokens: new tokens over all rows (up to and including EOS).
        new_tokens_per_row: (B,) new tokens per row.
        tokens_per_forward: sum(new_tokens_per_row) / sum(row_forwards); with B = 1 it is
            ``new_tokens / forwards``. Autoregressive decoding gives 1.
        draft_positions: m, drafts proposed per iteration (at most n - 1).
        proposed_counts: (m,) how many times draft position j was verified (every draft before
            it in its iteration accepted, and its token within ``max_new_tokens`` and before EOS).
        accepted_counts: (m,) how many of those were accepted.
        acceptance_rate: (m,) ``accepted / proposed`` per position, the conditional acceptance
            rate alpha_j (NaN where a position was never verified).
        expected_tokens_per_step: 1 + sum_k prod_{j<=k} alpha_j, tokens per iteration implied by
            the rates (positions never verified count as 0).
        wall_time_s: wall-clock seconds of the whole call.
    """

    sequences: torch.Tensor
    forwards: int
    iterations: int
    row_forwards: list[int]
    new_tokens: int
    new_tokens_per_row: list[int]
    tokens_per_forward: float
    draft_positions: int
    proposed_counts: list[int] = field(default_factory=list)
    accepted_counts: list[int] = field(default_factory=list)
    acceptance_rate: list[float] = field(default_factory=list)
    expected_tokens_per_step: float = 1.0
    wall_time_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The statistics as a JSON-friendly dict (no tensors; NaN rates as None)."""
        return {
            "forwards": self.forwards,
            "iterations": self.iterations,
            "new_tokens": self.new_tokens,
            "tokens_per_forward": self.tokens_per_forward,
            "draft_positions": self.draft_positions,
            "proposed_counts": self.proposed_counts,
            "accepted_counts": self.accepted_counts,
            "acceptance_rate": [None if r != r else r for r in self.acceptance_rate],
            "expected_tokens_per_step": self.expected_tokens_per_step,
            "wall_time_s": self.wall_time_s,
        }


# ----------------------------------------------------------------------------- helpers


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor:
    if eos_token_id is None:
        ids: list[int] = []
    elif isinstance(eos_token_id, int):
        ids = [eos_token_id]
    else:
        ids = [int(i) for i in eos_token_id]
    return torch.tensor(ids, dtype=torch.long, device=device)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Validate the prompt; returns the (B, T) bool attention mask."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            f"input_ids must be a (B, T) int64 tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one prompt token")
    if not _is_int(max_new_tokens):
        raise ValueError(
            f"max_new_tokens must be an int, got {max_new_tokens!r} ({type(max_new_tokens).__name__})"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if vocab_size is not None and input_ids.numel():
        bad = (input_ids < 0) | (input_ids >= vocab_size)
        if bool(bad.any()):
            raise ValueError(
                f"input_ids holds {int(input_ids[bad][0])}, outside the vocabulary [0, {vocab_size})"
            )
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=input_ids.device).bool()
    if not bool(mask[:, -1].all()):
        raise ValueError("generate needs left padding: the last prompt column must be real tokens")
    return mask


def _special_token_ids(
    model: Any, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None
) -> tuple[int | list[int] | None, int | None]:
    """EOS and pad ids as Hugging Face ``generate`` resolves them: the arguments, else the
    model's ``generation_config`` (which HF ``generate`` reads alone, so a None there stays
    None); a model without one falls back to its config, then the wrapped LM's text config."""
    sources = [getattr(model, "generation_config", None)]
    if sources[0] is None:
        config = getattr(model, "config", None)
        sources = [config]
        if config is not None and hasattr(config, "get_text_config"):
            sources.append(config.get_text_config(decoder=True))

    def first(name: str) -> Any:
        for source in sources:
            value = getattr(source, name, None) if source is not None else None
            if value is not None:
                return value
        return None

    if eos_token_id is None:
        eos_token_id = first("eos_token_id")
    if pad_token_id is None:
        pad_token_id = first("pad_token_id")
    return eos_token_id, pad_token_id


def _decoding_cache(model: Any) -> DynamicCache | None:
    """A ``DynamicCache`` for the model's trunk whose attention layers keep the whole history.

    ``DynamicCache(config=...)`` builds sliding-window layers for sliding-window trunks; those
    drop keys older than the window, which cropping rejected drafts cannot restore. Full layers
    keep them; the sliding window is still applied by the trunk's attention mask (built from
    its config). Other layer types (e.g. linear attention) are kept. None when the model has no
    trunk config (the trunk then builds its own cache).
    """
    config = getattr(getattr(model, "trunk", None), "config", None)
    if config is None:
        return None
    cache = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            cache.layers[i] = DynamicLayer()
    return cache


def _compact(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Right-align every row's real slots in the cache, in place; returns the new mask.

    Args:
        cache: the trunk's cache; each attention layer holds keys / values of shape
            (B, heads, S, head_dim) with S cache slots.
        mask: (B, S) bool, True for a row's real (accepted) slots.

    Returns:
        (B, S') mask after moving, in each row, the masked slots (padding, holes) to the left
        (a stable partition: real slots keep their order) and dropping the S - S' leading
        columns that are masked in every row.
    """
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # masked (0) first
    mask = mask.gather(1, order)
    drop = int((~mask).sum(dim=1).min())
    order, mask = order[:, drop:], mask[:, drop:]
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.numel() == 0:
            continue
        if keys.shape[2] != order.shape[1] + drop:
            raise RuntimeError(
                f"cache layer {type(layer).__name__} holds {keys.shape[2]} slots, the attention "
                f"mask {order.shape[1] + drop}: this cache type is not supported for batched "
                "speculative decoding"
            )
        index = order[:, None, :, None].to(keys.device)
        layer.keys = keys.gather(2, index.expand(-1, keys.shape[1], -1, keys.shape[3]))
        layer.values = values.gather(2, index.expand(-1, values.shape[1], -1, values.shape[3]))
    return mask


def _marginal(
    head: CPDMTPHead, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head's next-token marginal, keeping its pieces for the drafter.

    Same computation as ``CPDMTPHead.marginal_log_probs``: (..., d) -> marginal (..., V),
    log_w (..., r) and log p_{1,a} (..., r, V).
    """
    log_w = head.log_gate(hidden)
    log_p1 = head.expert_log_probs(hidden, slice(0, 1))[..., 0, :, :]
    return torch.logsumexp(log_w[..., None] + log_p1, dim=-2), log_w, log_p1


def _make_drafts(
    drafter: Drafter,
    anchor: torch.Tensor,
    first: torch.Tensor,
    num_drafts: int,
    greedy: bool,
    warp: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator | None,
    vocab_size: int,
    first_pieces: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drafts x_{t+2..t+m+1} one by one from the drafter's conditionals.

    Args:
        anchor: (b, d) hidden state at the last accepted position t.
        first: (b,) the kept token x_{t+1}.
        first_pieces: for a ``CPDrafter``, (log_w (b, r), log p_1 (b, r, V)) at the anchor.

    Returns:
        drafts (b, m); when sampling, the (b, m, V) warped log q each draft was drawn from.
    """
    batch = first.shape[0]
    if num_drafts == 0:
        empty_q = None if greedy else anchor.new_zeros(batch, 0, vocab_size, dtype=torch.float32)
        return first.new_zeros(batch, 0), empty_q
    if isinstance(drafter, CPDrafter) and first_pieces is not None:
        state = drafter.start(anchor, num_drafts, first=first_pieces)
    else:
        state = drafter.start(anchor, num_drafts)
    chosen = first[:, None]
    log_qs = []
    for _ in range(num_drafts):
        log_q = drafter.next(state, chosen)  # (b, V)
        if greedy:
            token = torch.argmax(log_q, dim=-1)
        else:
            log_q = warp(log_q)
            token = sample(log_q, generator)
            log_qs.append(log_q)
        chosen = torch.cat([chosen, token[:, None]], dim=1)
    return chosen[:, 1:], (None if greedy else torch.stack(log_qs, dim=1))


# ----------------------------------------------------------------------------- decoding


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
    draft_positions: int | None = None,
    drafter: Drafter | None = None,
    stream: StreamCallback | None = None,
) -> GenerationOutput:
    """Self-speculative decoding of a ``CPDMTPForCausalLM``.

    Args:
        model: a ``CPDMTPForCausalLM`` (anything with ``trunk_hidden`` and a ``CPDMTPHead`` as
            ``head``), in eval mode.
        input_ids: (B, T) prompt ids, left-padded when B > 1.
        max_new_tokens: most new tokens per row.
        do_sample: rejection sampling from the warped marginal; False: greedy.
        temperature, top_k, top_p: warping applied identically to the target p and the drafts q
            (``cpd_mtp.decoding.sampling.warp_log_probs``, which validates them); ignored when greedy.
        eos_token_id: one id or several; a row stops after emitting one of them. None: the
            model's ``generation_config.eos_token_id``, as in HF ``generate`` (a model without a
            generation config: its config's); ``[]``: no EOS, always ``max_new_tokens``.
        attention_mask: (B, T) 1 for real tokens, 0 for (left) padding.
        pad_token_id: fills rows after their EOS. None: the model's ``generation_config`` pad
            id (likewise), else the first EOS id, else 0.
        generator: random source for sampling (on the model's device).
        draft_positions: drafts per iteration m, 0 <= m <= ``drafter.max_drafts``
            (default: ``n_future - 1``); 0 is plain autoregressive decoding.
        drafter: where drafts come from (default ``CPDrafter(model.head)``).
        stream: called after each forward with the newly accepted token ids of every row
            (a list of B lists, empty for rows with nothing new).

    Returns:
        ``GenerationOutput`` with ``sequences`` (B, T + L) and the statistics.

    Raises:
        ValueError: an argument out of its range or of the wrong type (prompt ids outside
            [0, V), a non-integer ``max_new_tokens``, a NaN temperature, ...), named.
    """
    start_time = time.perf_counter()
    head = model.head
    vocab = head.config.vocab_size
    mask = _check_inputs(input_ids, attention_mask, max_new_tokens, vocab)
    device = input_ids.device
    batch = input_ids.shape[0]
    drafter = drafter if drafter is not None else CPDrafter(head)
    limit = drafter.max_drafts
    m = draft_positions if draft_positions is not None else (limit if limit is not None else 0)
    if not _is_int(m) or m < 0 or (limit is not None and m > limit):
        raise ValueError(f"draft_positions must be an int in [0, {limit}], got {m!r}")
    eos_token_id, pad_token_id = _special_token_ids(model, eos_token_id, pad_token_id)
    eos = _eos_tensor(eos_token_id, device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos.numel() else 0
    greedy = not do_sample
    if do_sample:
        check_warping(temperature, top_k, top_p)

    def warp(log_probs: torch.Tensor) -> torch.Tensor:
        return log_probs if greedy else warp_log_probs(log_probs, temperature, top_k, top_p)

    out = torch.full((batch, max(max_new_tokens, 0)), pad_token_id, dtype=torch.long, device=device)
    n_out = torch.zeros(batch, dtype=torch.long, device=device)
    row_forwards = torch.zeros(batch, dtype=torch.long, device=device)
    proposed = torch.zeros(m, dtype=torch.long, device=device)
    accepted_total = torch.zeros(m, dtype=torch.long, device=device)
    forwards = 0

    def emit(rows: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Append tokens[i, :counts[i]] to row rows[i], cut at EOS / budget; returns finished."""
        budget = max_new_tokens - n_out[rows]
        take = torch.minimum(counts, budget)
        cols = torch.arange(tokens.shape[1], device=device)
        is_eos = torch.isin(tokens, eos) & (cols[None] < take[:, None])
        has_eos = is_eos.any(dim=1)
        take = torch.where(has_eos, is_eos.long().argmax(dim=1) + 1, take)
        for j in range(tokens.shape[1]):
            sel = j < take
            if bool(sel.any()):
                out[rows[sel], n_out[rows[sel]] + j] = tokens[sel, j]
        n_out[rows] += take
        if stream is not None:
            new: list[list[int]] = [[] for _ in range(batch)]
            for i, row in enumerate(rows.tolist()):
                new[row] = tokens[i, : int(take[i])].tolist()
            stream(new)
        return has_eos | (n_out[rows] >= max_new_tokens)

    if max_new_tokens == 0:
        return _finish(input_ids, out, n_out, row_forwards, 0, m, proposed, accepted_total,
                       start_time)  # fmt: skip

    # ---- prefill: the prompt; its last position gives x_{t+1} and the first drafts.
    positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)
    hidden, cache = model.trunk_hidden(
        input_ids,
        attention_mask=mask.long(),
        position_ids=positions,
        past_key_values=_decoding_cache(model),
        use_cache=True,
    )
    forwards += 1
    row_forwards += 1
    rows = torch.arange(batch, device=device)
    n_valid = mask.sum(dim=1)  # real tokens in each row's cache = the next position id
    anchor = hidden[:, -1]  # (B, d)
    marginal, log_w, log_p1 = _marginal(head, anchor)
    pieces = (log_w, log_p1)  # the head's pieces at the anchor, reused for the drafts
    target = warp(marginal)  # (B, V)
    pending = torch.argmax(target, dim=-1) if greedy else sample(target, generator)
    finished = emit(rows, pending[:, None], torch.ones_like(pending))

    while True:
        keep = ~finished
        if not bool(keep.all()):
            index = keep.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            cache.batch_select_indices(index)
            rows, mask, n_valid = rows[index], mask[index], n_valid[index]
            anchor, pending = anchor[index], pending[index]
            pieces = (pieces[0][index], pieces[1][index])
        remaining = max_new_tokens - n_out[rows]  # >= 1 for every live row
        m_now = min(m, int(remaining.max()) - 1)
        drafts, draft_log_q = _make_drafts(
            drafter, anchor, pending, m_now, greedy, warp, generator, vocab, pieces
        )

        # ---- one forward over [x_{t+1}, drafts] for every live row.
        fed = torch.cat([pending[:, None], drafts], dim=1)  # (b, m_now + 1)
        live = rows.shape[0]
        step = torch.arange(m_now + 1, device=device)
        full_mask = torch.cat([mask, mask.new_ones(live, m_now + 1)], dim=1)
        hidden, cache = model.trunk_hidden(
            fed,
            attention_mask=full_mask.long(),
            position_ids=n_valid[:, None] + step[None],
            past_key_values=cache,
            use_cache=True,
        )
        forwards += 1
        row_forwards[rows] += 1
        marginal, log_w, log_p1 = _marginal(head, hidden)
        target = warp(marginal)  # (b, m_now + 1, V)
        accepted, next_token = verify(
            drafts, target, draft_log_q, greedy=greedy, generator=generator
        )

        # ---- statistics: draft j was verified iff all drafts before it were accepted; count it
        # only when its token lies within the budget and after no accepted EOS.
        if m_now > 0:
            cols = step[:m_now]
            eos_before = (
                torch.cumsum(torch.isin(drafts, eos).long(), dim=1) - torch.isin(drafts, eos).long()
            )
            counted = (
                (cols[None] <= accepted[:, None])
                & (cols[None] < remaining[:, None])
                & (eos_before == 0)
            )
            proposed[:m_now] += counted.sum(dim=0)
            accepted_total[:m_now] += (counted & (cols[None] < accepted[:, None])).sum(dim=0)

        tokens = torch.cat([drafts, drafts.new_zeros(live, 1)], dim=1)
        tokens.scatter_(1, accepted[:, None], next_token[:, None])
        finished = emit(rows, tokens, accepted + 1)

        # ---- keep the accepted slots: crop to the longest accepted prefix, mask the holes,
        # then right-align each row's real slots (slot distance = position distance).
        longest = int(accepted.max())
        if m_now - longest > 0:
            cache.crop(-(m_now - longest))
        mask = torch.cat([mask, step[None, : longest + 1] <= accepted[:, None]], dim=1)
        if bool((accepted < longest).any()) or not bool(mask[:, 0].any()):
            mask = _compact(cache, mask)
        n_valid = n_valid + accepted + 1
        rows_now = torch.arange(live, device=device)
        anchor = hidden[rows_now, accepted]  # (b, d)
        pieces = (log_w[rows_now, accepted], log_p1[rows_now, accepted])
        pending = next_token

    return _finish(input_ids, out, n_out, row_forwards, forwards, m, proposed, accepted_total,
                   start_time)  # fmt: skip


def _finish(
    input_ids: torch.Tensor,
    out: torch.Tensor,
    n_out: torch.Tensor,
    row_forwards: torch.Tensor,
    forwards: int,
    m: int,
    proposed: torch.Tensor,
    accepted: torch.Tensor,
    start_time: float,
) -> GenerationOutput:
    length = int(n_out.max()) if n_out.numel() else 0
    sequences = torch.cat([input_ids, out[:, :length]], dim=1)
    proposed_list, accepted_list = proposed.tolist(), accepted.tolist()
    rates = [a / p if p else float("nan") for a, p in zip(accepted_list, proposed_list)]
    expected, prod = 1.0, 1.0
    for rate in rates:
        prod *= rate if rate == rate else 0.0
        expected += prod
    total_rows = int(row_forwards.sum())
    new_tokens = int(n_out.sum())
    return GenerationOutput(
        sequences=sequences,
        forwards=forwards,
        iterations=max(forwards - 1, 0),
        row_forwards=row_forwards.tolist(),
        new_tokens=new_tokens,
        new_tokens_per_row=n_out.tolist(),
        tokens_per_forward=new_tokens / total_rows if total_rows else 0.0,
        draft_positions=m,
        proposed_counts=proposed_list,
        accepted_counts=accepted_list,
        acceptance_rate=rates,
        expected_tokens_per_step=expected,
        wall_time_s=time.perf_counter() - start_time,
    )


@torch.no_grad()
def autoregressive_generate(
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
) -> GenerationOutput:
    """The baseline: Hugging Face ``model.generate`` (one forward per token) on the same model.

    Takes the arguments of :func:`generate` (sampling draws from torch's global RNG: seed it
    with ``torch.manual_seed``) and returns the same ``GenerationOutput``, with
    ``tokens_per_forward`` 1 and no drafts. ``min_new_tokens`` is 0 and no other logits
    processor is applied, whatever ``model.generation_config`` holds.
    """
    start_time = time.perf_counter()
    mask = _check_inputs(input_ids, attention_mask, max_new_tokens, model.head.config.vocab_size)
    if do_sample:
        check_warping(temperature, top_k, top_p)
    eos_token_id, pad_token_id = _special_token_ids(model, eos_token_id, pad_token_id)
    eos = _eos_tensor(eos_token_id, input_ids.device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos.numel() else 0
    kwargs: dict[str, Any] = {
        "attention_mask": mask.long(),
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": 0,
        "do_sample": do_sample,
        "num_beams": 1,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos.tolist() or None,
        "repetition_penalty": 1.0,
    }
    if do_sample:
        kwargs |= {
            "temperature": temperature,
            "top_k": top_k if top_k is not None else 0,
            "top_p": top_p if top_p is not None else 1.0,
        }
    sequences = model.generate(input_ids, **kwargs)
    new = sequences[:, input_ids.shape[1] :]
    batch = input_ids.shape[0]
    if eos.numel():
        is_eos = torch.isin(new, eos)
        has = is_eos.any(dim=1)
        per_row = torch.where(
            has, is_eos.long().argmax(dim=1) + 1, new.new_full((batch,), new.shape[1])
        )
    else:
        per_row = new.new_full((batch,), new.shape[1])
    forwards = int(new.shape[1])
    new_tokens = int(per_row.sum())
    return GenerationOutput(
        sequences=sequences,
        forwards=forwards,
        iterations=max(forwards - 1, 0),
        row_forwards=per_row.tolist(),
        new_tokens=new_tokens,
        new_tokens_per_row=per_row.tolist(),
        tokens_per_forward=1.0 if new_tokens else 0.0,
        draft_positions=0,
        expected_tokens_per_step=1.0,
        wall_time_s=time.perf_counter() - start_time,
    )


# ----------------------------------------------------------------------------- comparison


def left_pad(
    prompts: Sequence[torch.Tensor], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D prompts into (B, T) ids and a (B, T) attention mask (1 = real token)."""
    width = max(int(p.numel()) for p in prompts)
    device = prompts[0].device
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        length = int(prompt.numel())
        ids[i, width - length :] = prompt.reshape(-1)
        mask[i, width - length :] = 1
    return ids, mask


def compare_decoding(
    model: Any,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    *,
    batch_size: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Self-speculative vs autoregressive (HF ``generate``) decoding of the same prompts.

    One *run* decodes every prompt, ``batch_size`` at a time (left-padded), once with
    :func:`generate` and once with :func:`autoregressive_generate`; runs of the two alternate,
    after ``warmup`` untimed ones. Call it with the model in eval mode.

    Args:
        prompts: 1-D token-id tensors on the model's device.
        repeats: timed runs of each decoder.
        seed: sampling seed of run i is ``seed + i`` (the speculative decoder's generator and
            torch's global RNG for HF ``generate``).

    Returns:
        A dict: ``spec_time_s`` and ``ar_time_s`` (per-run seconds), ``new_tokens`` (per
        speculative run; AR decodes the same count unless EOS differs), ``ar_new_tokens``,
        ``tokens_per_forward`` (per run), ``proposed_counts`` / ``accepted_counts`` /
        ``acceptance_rate`` (summed over the timed runs), ``expected_tokens_per_step``,
        ``speedup`` (median AR time / median speculative time) and, when greedy,
        ``identical`` (whether every run gave the same ids as HF ``generate``).
    """
    device = prompts[0].device
    batches = [
        left_pad(prompts[i : i + batch_size], pad_token_id)
        for i in range(0, len(prompts), batch_size)
    ]
    options = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id)  # fmt: skip
    cuda = device.type == "cuda"

    def timed(fn: Callable[[], list[GenerationOutput]]) -> tuple[float, list[GenerationOutput]]:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        outputs = fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, outputs

    def spec_run(run: int) -> list[GenerationOutput]:
        gen = torch.Generator(device=device).manual_seed(seed + run)
        return [generate(model, ids, max_new_tokens, attention_mask=mask, generator=gen, **options)
                for ids, mask in batches]  # fmt: skip

    def ar_run(run: int) -> list[GenerationOutput]:
        torch.manual_seed(seed + run)
        return [autoregressive_generate(model, ids, max_new_tokens, attention_mask=mask, **options)
                for ids, mask in batches]  # fmt: skip

    for i in range(warmup):
        spec_run(-1 - i)
        ar_run(-1 - i)
    result: dict[str, Any] = {"spec_time_s": [], "ar_time_s": [], "new_tokens": [],
                              "ar_new_tokens": [], "tokens_per_forward": []}  # fmt: skip
    proposed: list[int] = []
    accepted: list[int] = []
    identical = True
    for run in range(repeats):
        spec_s, spec = timed(lambda run=run: spec_run(run))
        ar_s, ar = timed(lambda run=run: ar_run(run))
        result["spec_time_s"].append(spec_s)
        result["ar_time_s"].append(ar_s)
        result["new_tokens"].append(sum(o.new_tokens for o in spec))
        result["ar_new_tokens"].append(sum(o.new_tokens for o in ar))
        row_forwards = sum(sum(o.row_forwards) for o in spec)
        result["tokens_per_forward"].append(result["new_tokens"][-1] / max(row_forwards, 1))
        for out in spec:
            if not proposed:
                proposed, accepted = [0] * out.draft_positions, [0] * out.draft_positions
            proposed = [a + b for a, b in zip(proposed, out.proposed_counts)]
            accepted = [a + b for a, b in zip(accepted, out.accepted_counts)]
        if not do_sample:
            identical &= all(torch.equal(s.sequences, a.sequences) for s, a in zip(spec, ar))
    rates = [a / p if p else float("nan") for a, p in zip(accepted, proposed)]
    expected, prod = 1.0, 1.0
    for rate in rates:
        prod *= rate if rate == rate else 0.0
        expected += prod
    median = sorted(result["spec_time_s"])[len(result["spec_time_s"]) // 2]
    ar_median = sorted(result["ar_time_s"])[len(result["ar_time_s"]) // 2]
    result |= {
        "proposed_counts": proposed,
        "accepted_counts": accepted,
        "acceptance_rate": rates,
        "expected_tokens_per_step": expected,
        "speedup": ar_median / median,
    }
    if not do_sample:
        result["identical"] = identical
    return result
