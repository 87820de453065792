"""What decoding returns (``GenerationOutput``) and the buffer the new tokens are written to."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cpd_mtp.decoding.stats import DecodingStats

__all__ = ["GenerationOutput", "StreamCallback", "TokenBuffer", "format_rates", "json_rates"]

StreamCallback = Callable[[list[list[int]]], None]


def json_rates(rates: Sequence[float | None]) -> list[float | None]:
    """Acceptance rates for JSON: a position never verified (NaN or None) is None (null)."""
    return [None if r is None or r != r else float(r) for r in rates]


def format_rates(rates: Sequence[float | None], sep: str = " / ") -> str:
    """Acceptance rates for people: two decimals, ``-`` for a position never verified."""
    return sep.join("-" if r is None else f"{r:.2f}" for r in json_rates(rates))


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
        draft_positions: m, the deepest draft depth counted (a chain's length).
        proposed_counts: (m,) how many times draft depth j was verified (the accepted path
            reached depth j - 1 at a node with children, and the token lies within
            ``max_new_tokens`` and before EOS).
        accepted_counts: (m,) how many of those were accepted.
        acceptance_rate: (m,) ``accepted / proposed`` per depth, the conditional acceptance
            rate alpha_j (NaN where a depth was never verified).
        tree_sizes: draft nodes fed per forward -> how many forwards fed that many.
        accepted_depths: (m + 1,) how many iterations accepted 0, 1, ..., m drafts.
        forward_cost: fed tokens -> measured cost of such a forward against one token, for
            runs whose tree size follows the cost (``draft_tree="auto"``); else empty.
        expected_tokens_per_step: 1 + sum_k prod_{j<=k} alpha_j, tokens per iteration implied by
            the rates (positions never verified count as 0).
        wall_time_s: wall-clock seconds of the whole call.
        acceptance: the acceptance rule: ``"exact"``, or the lossy rule and its thresholds
            (``cpd_mtp.decoding.acceptance``).
        unverified_tokens: new tokens a lossy rule accepted against the verifier's choice; 0
            when exact.
        states: with ``capture_states``: per row, the (P_i + L_i - 1, d) trunk hidden states of
            its P_i real prompt tokens and its L_i new tokens but the last, in order; else None.
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
    tree_sizes: dict[int, int] = field(default_factory=dict)
    accepted_depths: list[int] = field(default_factory=list)
    forward_cost: dict[int, float] = field(default_factory=dict)
    acceptance: str = "exact"
    unverified_tokens: int = 0
    states: list[torch.Tensor] | None = None

    @classmethod
    def from_stats(
        cls, sequences: torch.Tensor, stats: DecodingStats, wall_time_s: float
    ) -> GenerationOutput:
        """The output of a run: its (B, T + L) sequences and its counts."""
        return cls(
            sequences=sequences,
            forwards=stats.forwards,
            iterations=max(stats.forwards - 1, 0),
            row_forwards=stats.row_forwards,
            new_tokens=stats.new_tokens,
            new_tokens_per_row=stats.new_tokens_per_row,
            tokens_per_forward=stats.tokens_per_forward,
            draft_positions=stats.draft_positions,
            proposed_counts=stats.proposed_counts,
            accepted_counts=stats.accepted_counts,
            acceptance_rate=stats.acceptance_rate,
            expected_tokens_per_step=stats.expected_tokens_per_step,
            wall_time_s=wall_time_s,
            tree_sizes=dict(stats.tree_sizes),
            accepted_depths=list(stats.accepted_depths),
            forward_cost=dict(stats.forward_cost),
            acceptance=stats.acceptance,
            unverified_tokens=stats.unverified_tokens,
        )

    @property
    def stats(self) -> DecodingStats:
        """The counts behind the statistics (to combine runs)."""
        return DecodingStats(
            draft_positions=self.draft_positions,
            forwards=self.forwards,
            row_forwards=list(self.row_forwards),
            new_tokens_per_row=list(self.new_tokens_per_row),
            proposed_counts=list(self.proposed_counts),
            accepted_counts=list(self.accepted_counts),
            tree_sizes=dict(self.tree_sizes),
            accepted_depths=list(self.accepted_depths),
            forward_cost=dict(self.forward_cost),
            acceptance=self.acceptance,
            unverified_tokens=self.unverified_tokens,
        )

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
            "acceptance_rate": json_rates(self.acceptance_rate),
            "expected_tokens_per_step": self.expected_tokens_per_step,
            "wall_time_s": self.wall_time_s,
            "tree_sizes": {str(k): v for k, v in self.tree_sizes.items()},
            "accepted_depths": self.accepted_depths,
            "forward_cost": {str(k): v for k, v in self.forward_cost.items()},
            "acceptance": self.acceptance,
            "unverified_tokens": self.unverified_tokens,
        }


class TokenBuffer:
    """The new tokens of B rows, cut at EOS, at ``max_new_tokens`` and by stopping criteria.

    Attributes:
        tokens: (B, max_new_tokens) new ids, ``pad_token_id`` after each row's end.
        counts: (B,) new tokens written per row.
        finished: (B,) bool, the row has ended (EOS, budget or a stopping criterion).

    Args:
        batch, max_new_tokens, pad_token_id: the shape and the filler of ``tokens``.
        eos: (k,) EOS ids; a row ends after emitting one.
        stream: called after each ``emit`` with every row's new ids (a list of B lists).
        prompt: (B, T) prompt ids, the start of what ``stopping`` sees.
        stopping: Hugging Face ``StoppingCriteriaList`` (or any callable of the same
            signature), called after each new token of a row on that row's sequence so far,
            (1, T + k), with that token's target scores (1, V) or None; a true result ends the
            row after that token. A row-wise criterion thus stops at the token where Hugging
            Face's loop stops.
        streamer: a ``transformers`` ``BaseStreamer``; ``put`` receives the new tokens in order,
            as soon as they are settled: a (k,) chunk when B = 1, and (B,) columns (finished
            rows padded) when B > 1, as Hugging Face's loop puts them. ``close`` calls ``end``.
    """

    def __init__(
        self,
        batch: int,
        max_new_tokens: int,
        pad_token_id: int,
        eos: torch.Tensor,
        stream: StreamCallback | None = None,
        *,
        prompt: torch.Tensor | None = None,
        stopping: Callable[..., Any] | None = None,
        streamer: Any | None = None,
    ) -> None:
        device = eos.device
        if stopping is not None and prompt is None:
            raise ValueError("TokenBuffer needs the prompt to evaluate stopping criteria")
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.stream = stream
        self.prompt = prompt
        self.stopping = stopping
        self.streamer = streamer
        self.tokens = torch.full(
            (batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device
        )
        self.counts = torch.zeros(batch, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.streamed = 0  # columns already handed to the streamer

    def remaining(self, rows: torch.Tensor) -> torch.Tensor:
        """(b,) new tokens the ``rows`` may still emit."""
        return self.max_new_tokens - self.counts[rows]

    def emit(
        self,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        counts: torch.Tensor,
        scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append ``tokens[i, :counts[i]]`` to row ``rows[i]``, cut after EOS, at the budget and
        after a token that meets a stopping criterion.

        Args:
            rows: (b,) row indices into the batch.
            tokens: (b, k) candidate tokens.
            counts: (b,) how many of them each row accepted.
            scores: (b, k, V) the target scores each token was chosen from, for the stopping
                criteria; optional.

        Returns:
            (b,) bool: the row is finished.
        """
        take = torch.minimum(counts, self.remaining(rows))
        cols = torch.arange(tokens.shape[1], device=tokens.device)
        is_eos = torch.isin(tokens, self.eos) & (cols[None] < take[:, None])
        has_eos = is_eos.any(dim=1)
        take = torch.where(has_eos, is_eos.long().argmax(dim=1) + 1, take)
        stopped = torch.zeros_like(has_eos)
        if self.stopping is not None:
            take, stopped = self._stop(rows, tokens, take, scores)
        for j in range(tokens.shape[1]):
            sel = j < take
            if bool(sel.any()):
                self.tokens[rows[sel], self.counts[rows[sel]] + j] = tokens[sel, j]
        self.counts[rows] += take
        finished = has_eos | stopped | (self.counts[rows] >= self.max_new_tokens)
        self.finished[rows] |= finished
        if self.stream is not None:
            new: list[list[int]] = [[] for _ in range(self.counts.shape[0])]
            for i, row in enumerate(rows.tolist()):
                new[row] = tokens[i, : int(take[i])].tolist()
            self.stream(new)
        if self.streamer is not None:
            self._put_settled()
        return finished

    def _stop(
        self,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        take: torch.Tensor,
        scores: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut each row after the first candidate token that meets a stopping criterion.

        Token by token, on the row's own sequence, as Hugging Face's loop checks its criteria
        after each token. Returns the new (b,) ``take`` and the (b,) bool rows stopped here.
        """
        take = take.clone()
        stopped = torch.zeros(take.shape[0], dtype=torch.bool, device=take.device)
        for i, row in enumerate(rows.tolist()):
            done = self.tokens[row, : int(self.counts[row])]
            sequence = torch.cat([self.prompt[row], done, tokens[i, : int(take[i])]])
            start = self.prompt.shape[1] + done.shape[0]
            for j in range(int(take[i])):
                row_scores = scores[i, j][None] if scores is not None else None
                if bool(
                    torch.as_tensor(
                        self.stopping(sequence[None, : start + j + 1], row_scores)
                    ).any()
                ):
                    take[i], stopped[i] = j + 1, True
                    break
        return take, stopped

    def _put_settled(self) -> None:
        """Hand the streamer the columns every unfinished row has reached."""
        live = ~self.finished
        ready = int(self.counts[live].min()) if bool(live.any()) else int(self.counts.max())
        if ready <= self.streamed:
            return
        if self.tokens.shape[0] == 1:
            self.streamer.put(self.tokens[0, self.streamed : ready].cpu())
        else:
            for j in range(self.streamed, ready):
                self.streamer.put(self.tokens[:, j].cpu())
        self.streamed = ready

    def close(self) -> None:
        """Hand the streamer what is left and call its ``end``."""
        if self.streamer is not None:
            self.finished[:] = True
            self._put_settled()
            self.streamer.end()

    def sequences(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) prompt -> (B, T + L) prompt and new tokens, L the longest continuation."""
        length = int(self.counts.max()) if self.counts.numel() else 0
        return torch.cat([input_ids, self.tokens[:, :length]], dim=1)
