"""What decoding returns (``GenerationOutput``) and the buffer the new tokens are written to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cpd_mtp.decoding.stats import DecodingStats

__all__ = ["GenerationOutput", "StreamCallback", "TokenBuffer"]

StreamCallback = Callable[[list[list[int]]], None]


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
            "acceptance_rate": [None if r != r else r for r in self.acceptance_rate],
            "expected_tokens_per_step": self.expected_tokens_per_step,
            "wall_time_s": self.wall_time_s,
        }


class TokenBuffer:
    """The new tokens of B rows, cut at EOS and at ``max_new_tokens``.

    Attributes:
        tokens: (B, max_new_tokens) new ids, ``pad_token_id`` after each row's end.
        counts: (B,) new tokens written per row.
    """

    def __init__(
        self,
        batch: int,
        max_new_tokens: int,
        pad_token_id: int,
        eos: torch.Tensor,
        stream: StreamCallback | None = None,
    ) -> None:
        device = eos.device
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.stream = stream
        self.tokens = torch.full(
            (batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device
        )
        self.counts = torch.zeros(batch, dtype=torch.long, device=device)

    def remaining(self, rows: torch.Tensor) -> torch.Tensor:
        """(b,) new tokens the ``rows`` may still emit."""
        return self.max_new_tokens - self.counts[rows]

    def emit(self, rows: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Append ``tokens[i, :counts[i]]`` to row ``rows[i]``, cut after EOS and at the budget.

        Args:
            rows: (b,) row indices into the batch.
            tokens: (b, k) candidate tokens.
            counts: (b,) how many of them each row accepted.

        Returns:
            (b,) bool: the row is finished (emitted EOS or reached ``max_new_tokens``).
        """
        take = torch.minimum(counts, self.remaining(rows))
        cols = torch.arange(tokens.shape[1], device=tokens.device)
        is_eos = torch.isin(tokens, self.eos) & (cols[None] < take[:, None])
        has_eos = is_eos.any(dim=1)
        take = torch.where(has_eos, is_eos.long().argmax(dim=1) + 1, take)
        for j in range(tokens.shape[1]):
            sel = j < take
            if bool(sel.any()):
                self.tokens[rows[sel], self.counts[rows[sel]] + j] = tokens[sel, j]
        self.counts[rows] += take
        if self.stream is not None:
            new: list[list[int]] = [[] for _ in range(self.counts.shape[0])]
            for i, row in enumerate(rows.tolist()):
                new[row] = tokens[i, : int(take[i])].tolist()
            self.stream(new)
        return has_eos | (self.counts[rows] >= self.max_new_tokens)

    def sequences(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) prompt -> (B, T + L) prompt and new tokens, L the longest continuation."""
        length = int(self.counts.max()) if self.counts.numel() else 0
        return torch.cat([input_ids, self.tokens[:, :length]], dim=1)
