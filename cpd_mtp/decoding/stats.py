"""Decoding statistics: tokens per forward and the drafts' acceptance, counted once.

``DraftCounter`` counts on the device during one speculative run (no host sync per step);
``DecodingStats`` holds the plain numbers of one run or of several (``DecodingStats.combine``),
and derives the rates from them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

__all__ = ["DecodingStats", "DraftCounter", "acceptance_rates", "expected_tokens_per_step"]


def acceptance_rates(proposed: list[int], accepted: list[int]) -> list[float]:
    """alpha_j = accepted_j / proposed_j per draft position (NaN where never proposed)."""
    return [a / p if p else math.nan for a, p in zip(accepted, proposed)]


def expected_tokens_per_step(rates: list[float]) -> float:
    """1 + sum_k prod_{j<=k} alpha_j: tokens per iteration implied by the rates.

    A position never verified (NaN rate) counts as 0, and so do all after it.
    """
    expected, prod = 1.0, 1.0
    for rate in rates:
        prod *= 0.0 if math.isnan(rate) else rate
        expected += prod
    return expected


@dataclass
class DecodingStats:
    """The counts of a decoding run (or of several runs, combined).

    Attributes:
        draft_positions: m, drafts proposed per iteration.
        forwards: trunk forwards (batched calls), the prefill included.
        row_forwards: (B,) forwards during which each row was still generating.
        new_tokens_per_row: (B,) new tokens per row (up to and including EOS).
        proposed_counts: (m,) how many times draft position j was verified.
        accepted_counts: (m,) how many of those were accepted.
    """

    draft_positions: int = 0
    forwards: int = 0
    row_forwards: list[int] = field(default_factory=list)
    new_tokens_per_row: list[int] = field(default_factory=list)
    proposed_counts: list[int] = field(default_factory=list)
    accepted_counts: list[int] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(self.new_tokens_per_row)

    @property
    def tokens_per_forward(self) -> float:
        """New tokens over row-forwards (B = 1: ``new_tokens / forwards``); 0 without any."""
        total = sum(self.row_forwards)
        return self.new_tokens / total if total else 0.0

    @property
    def acceptance_rate(self) -> list[float]:
        return acceptance_rates(self.proposed_counts, self.accepted_counts)

    @property
    def expected_tokens_per_step(self) -> float:
        return expected_tokens_per_step(self.acceptance_rate)

    @classmethod
    def combine(cls, parts: Iterable[DecodingStats]) -> DecodingStats:
        """The counts of several runs together: rows concatenated, counts summed."""
        total = cls()
        for part in parts:
            m = max(total.draft_positions, part.draft_positions)
            total.proposed_counts = _add(total.proposed_counts, part.proposed_counts, m)
            total.accepted_counts = _add(total.accepted_counts, part.accepted_counts, m)
            total.draft_positions = m
            total.forwards += part.forwards
            total.row_forwards += part.row_forwards
            total.new_tokens_per_row += part.new_tokens_per_row
        return total


def _add(a: list[int], b: list[int], length: int) -> list[int]:
    a, b = a + [0] * (length - len(a)), b + [0] * (length - len(b))
    return [x + y for x, y in zip(a, b)]


class DraftCounter:
    """Device-side counters of one speculative run over a batch of B rows with m drafts."""

    def __init__(self, batch: int, draft_positions: int, device: torch.device) -> None:
        self.draft_positions = draft_positions
        self.forwards = 0
        self.row_forwards = torch.zeros(batch, dtype=torch.long, device=device)
        self.proposed = torch.zeros(draft_positions, dtype=torch.long, device=device)
        self.accepted = torch.zeros(draft_positions, dtype=torch.long, device=device)

    def count_forward(self, rows: torch.Tensor) -> None:
        """One trunk forward over the (b,) live ``rows``."""
        self.forwards += 1
        self.row_forwards[rows] += 1

    def count_verification(
        self,
        drafts: torch.Tensor,
        accepted: torch.Tensor,
        remaining: torch.Tensor,
        eos: torch.Tensor,
    ) -> None:
        """Count which drafts were verified and accepted in one iteration.

        Draft j was verified iff all drafts before it were accepted (j <= accepted); it counts
        only when its token lies within the row's budget (j < remaining: the kept token takes
        one) and no accepted EOS precedes it.

        Args:
            drafts: (b, m') drafted ids, m' <= m.
            accepted: (b,) accepted drafts per row.
            remaining: (b,) new tokens each row may still emit, the kept token included.
            eos: (k,) EOS ids.
        """
        m_now = drafts.shape[1]
        if m_now == 0:
            return
        cols = torch.arange(m_now, device=drafts.device)[None]  # (1, m')
        is_eos = torch.isin(drafts, eos).long()
        eos_before = torch.cumsum(is_eos, dim=1) - is_eos
        counted = (cols <= accepted[:, None]) & (cols < remaining[:, None]) & (eos_before == 0)
        self.proposed[:m_now] += counted.sum(dim=0)
        self.accepted[:m_now] += (counted & (cols < accepted[:, None])).sum(dim=0)

    def finish(self, new_tokens_per_row: torch.Tensor) -> DecodingStats:
        """The plain counts, given the (B,) new tokens per row."""
        return DecodingStats(
            draft_positions=self.draft_positions,
            forwards=self.forwards,
            row_forwards=self.row_forwards.tolist(),
            new_tokens_per_row=new_tokens_per_row.tolist(),
            proposed_counts=self.proposed.tolist(),
            accepted_counts=self.accepted.tolist(),
        )
