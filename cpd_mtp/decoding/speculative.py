"""Self-speculative decoding with the CP-MTP head as its own drafter.

One trunk forward per iteration (``SpeculativeDecoder.step``), over a Hugging Face
``DynamicCache``:

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

Batching (B > 1, left padding). Rows accept different numbers of drafts. All rows share one
cache whose columns are *cache slots*: after verification the cache is cropped to the longest
accepted prefix in the batch, and the slots of a row's rejected drafts inside it become *holes*,
masked out of that row's ``attention_mask``; ``cpd_mtp.decoding.cache.compact`` then
right-aligns each row's real slots. Each row keeps its own position counter (``position_ids`` =
number of real tokens before the token, as Hugging Face derives them from a left-padded mask),
so every row sees exactly the keys, values and positions of its own accepted sequence. Rows that
finish (EOS or ``max_new_tokens``) are removed from the batch and the cache
(``batch_select_indices``), so they cost nothing more.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from cpd_mtp.decoding.cache import compact, decoding_cache
from cpd_mtp.decoding.drafters import CPDrafter, Drafter, propose
from cpd_mtp.decoding.inputs import (
    check_inputs,
    check_warpers,
    is_int,
    reject_unsupported,
    resolve_special_tokens,
    warn_past_max_positions,
)
from cpd_mtp.decoding.output import GenerationOutput, StreamCallback, TokenBuffer
from cpd_mtp.decoding.sampling import apply_warpers, build_warpers, sample, verify
from cpd_mtp.decoding.stats import DraftCounter
from cpd_mtp.ops.few_rows import few_row_linear, few_row_linears

__all__ = ["SpeculativeDecoder", "generate"]

Warp = Callable[[torch.Tensor], torch.Tensor]


class SpeculativeDecoder:
    """The state of one self-speculative decoding call over a batch of B rows.

    Holds what one iteration hands to the next, for the b rows still generating: the trunk's
    ``cache``, the (b, S) attention ``mask`` over its slots, ``n_valid`` (b,) the next position
    id of each row, ``rows`` (b,) their indices in the batch, the ``anchor`` (b, d) hidden state
    at the last accepted position and the head's pieces there, and the ``pending`` (b,) token
    x_{t+1} already chosen but not yet fed to the trunk.

    Args:
        model: a ``CPDMTPForCausalLM`` (``trunk_hidden`` and a ``CPDMTPHead`` as ``head``).
        drafter: where drafts come from.
        draft_positions: m, drafts per iteration.
        buffer: receives the new tokens.
        warp: the warping of every target and draft distribution; None for greedy decoding.
        generator: random source for sampling.
        min_new_tokens: EOS is removed from the targets of a row's first ``min_new_tokens`` new
            tokens (Hugging Face's ``min_new_tokens``; drafts of EOS there are then rejected).
    """

    def __init__(
        self,
        model: Any,
        drafter: Drafter,
        draft_positions: int,
        buffer: TokenBuffer,
        *,
        warp: Warp | None,
        generator: torch.Generator | None = None,
        min_new_tokens: int = 0,
    ) -> None:
        self.model = model
        self.drafter = drafter
        self.draft_positions = draft_positions
        self.buffer = buffer
        self.warp = warp
        self.generator = generator
        self.min_new_tokens = min_new_tokens
        self.counter = DraftCounter(buffer.counts.shape[0], draft_positions, buffer.counts.device)
        self.done = False

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Run the (B, T) prompt under its (B, T) bool mask and emit the first new token."""
        positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)
        self.rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        hidden, self.cache = self.model.trunk_hidden(
            input_ids,
            attention_mask=mask.long(),
            position_ids=positions,
            cache=decoding_cache(self.model),
            use_cache=True,
        )
        self.counter.count_forward(self.rows)
        self.mask = mask
        self.n_valid = mask.sum(dim=1)  # real tokens in each row's cache = next position id
        self.anchor = hidden[:, -1]  # (B, d)
        scores, self.pieces = self._next_token(self.anchor)
        target = self._target(scores, self.buffer.counts[self.rows])  # new token 0 of each row
        self.pending = self._choose(target)
        ones = torch.ones_like(self.pending)
        finished = self.buffer.emit(self.rows, self.pending[:, None], ones, target[:, None])
        self._drop(finished)

    def step(self) -> None:
        """One iteration: draft -> forward -> verify -> emit -> crop / compact."""
        rows, live = self.rows, self.rows.shape[0]
        remaining = self.buffer.remaining(rows)  # >= 1 for every live row
        m_now = min(self.draft_positions, int(remaining.max()) - 1)

        # Draft x_{t+2..t+m+1} from the anchor, given the kept token x_{t+1}.
        drafts, draft_log_q = propose(
            self.drafter,
            self.anchor,
            self.pending,
            m_now,
            warp=self.warp,
            generator=self.generator,
            first=self.pieces,
        )

        # One forward over [x_{t+1}, drafts]: the marginal at each fed position is the target
        # of the token after it.
        fed = torch.cat([self.pending[:, None], drafts], dim=1)  # (b, m_now + 1)
        step = torch.arange(m_now + 1, device=fed.device)
        hidden, self.cache = self.model.trunk_hidden(
            fed,
            attention_mask=torch.cat([self.mask, self.mask.new_ones(live, m_now + 1)], 1).long(),
            position_ids=self.n_valid[:, None] + step[None],
            cache=self.cache,
            use_cache=True,
        )
        self.counter.count_forward(rows)
        scores, pieces = self._next_token(hidden)

        # Verify: accept a prefix of the drafts, choose the correction / bonus token after it.
        # Fed position j predicts new token counts + j (the pending token is counts - 1).
        target = self._target(scores, self.buffer.counts[rows][:, None] + step[None])
        accepted, next_token = verify(
            drafts,
            target,
            draft_log_q,
            greedy=self.warp is None,
            generator=self.generator,
        )
        self.counter.count_verification(drafts, accepted, remaining, self.buffer.eos)

        # Emit the accepted drafts and the token after them (cut at EOS and the budget).
        tokens = torch.cat([drafts, drafts.new_zeros(live, 1)], dim=1)
        tokens.scatter_(1, accepted[:, None], next_token[:, None])
        finished = self.buffer.emit(rows, tokens, accepted + 1, target)

        # Keep the accepted slots: crop to the longest accepted prefix, mask the holes, then
        # right-align each row's real slots (slot distance = position distance).
        longest = int(accepted.max())
        if m_now > longest:
            self.cache.crop(-(m_now - longest))
        self.mask = torch.cat([self.mask, step[None, : longest + 1] <= accepted[:, None]], dim=1)
        if bool((accepted < longest).any()) or not bool(self.mask[:, 0].any()):
            self.mask = compact(self.cache, self.mask)
        self.n_valid = self.n_valid + accepted + 1

        # The last accepted position is the next anchor; the chosen token waits to be fed.
        index = torch.arange(live, device=fed.device)
        self.anchor = hidden[index, accepted]  # (b, d)
        if pieces is not None:
            self.pieces = (pieces[0][index, accepted], pieces[1][index, accepted])
        self.pending = next_token
        self._drop(finished)

    def output(self, input_ids: torch.Tensor, start_time: float) -> GenerationOutput:
        """The sequences and statistics so far; ``start_time`` from ``time.perf_counter``."""
        stats = self.counter.finish(self.buffer.counts)
        return GenerationOutput.from_stats(
            self.buffer.sequences(input_ids), stats, time.perf_counter() - start_time
        )

    def _next_token(self, hidden: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """The next-token scores at every position of (..., d) ``hidden``, and the head's
        pieces there when the drafter can reuse them.

        ``base`` mode: the wrapped model's own logits (its lm_head, cast to float32 as HF
        ``generate`` does), no pieces: the drafter computes the head only at the anchor.
        ``marginal`` mode: the CP marginal, with (log_w, log p_1) for the drafter.
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

    def _choose(self, target: torch.Tensor) -> torch.Tensor:
        if self.warp is None:
            return torch.argmax(target, dim=-1)
        return sample(target, self.generator)

    def _drop(self, finished: torch.Tensor) -> None:
        """Remove the (b,) finished rows from the state and the cache."""
        if not bool(finished.any()):
            return
        index = (~finished).nonzero().squeeze(1)
        if index.numel() == 0:
            self.done = True
            return
        self.cache.batch_select_indices(index)
        self.rows, self.mask, self.n_valid = self.rows[index], self.mask[index], self.n_valid[index]
        self.anchor, self.pending = self.anchor[index], self.pending[index]
        if self.pieces is not None:
            self.pieces = (self.pieces[0][index], self.pieces[1][index])


def _check_draft_positions(drafter: Drafter, draft_positions: int | None) -> int:
    limit = drafter.max_drafts
    m = draft_positions if draft_positions is not None else (limit if limit is not None else 0)
    if not is_int(m) or m < 0 or (limit is not None and m > limit):
        raise ValueError(f"draft_positions must be an int in [0, {limit}], got {m!r}")
    return m


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
    streamer: BaseStreamer | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    min_new_tokens: int = 0,
    warpers: LogitsProcessorList | None = None,
    **unsupported: Any,
) -> GenerationOutput:
    """Self-speculative decoding of a ``CPDMTPForCausalLM``.

    Args:
        model: a ``CPDMTPForCausalLM`` (anything with ``trunk_hidden`` and a ``CPDMTPHead`` as
            ``head``), in eval mode.
        input_ids: (B, T) prompt ids, left-padded when B > 1.
        max_new_tokens: most new tokens per row.
        do_sample: rejection sampling from the warped marginal; False: greedy.
        temperature, top_k, top_p: warping applied identically to the target p and the drafts q
            (Hugging Face's logits warpers, see ``cpd_mtp.decoding.sampling.build_warpers``,
            which validates them); ignored when greedy.
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
    mask = check_inputs(input_ids, attention_mask, max_new_tokens, model.head.config.vocab_size)
    if not is_int(min_new_tokens) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new_tokens!r}")
    warn_past_max_positions(model, input_ids.shape[1], max_new_tokens)
    drafter = drafter if drafter is not None else CPDrafter(model.head)
    m = _check_draft_positions(drafter, draft_positions)
    warp = None
    if do_sample:
        if warpers is None:
            warpers = build_warpers(temperature, top_k, top_p)
        check_warpers(warpers)
        warp = functools.partial(apply_warpers, warpers)
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
        model, drafter, m, buffer, warp=warp, generator=generator, min_new_tokens=min_new_tokens
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
            while not decoder.done:
                decoder.step()
    buffer.close()
    return decoder.output(input_ids, start_time)
