"""Decoding statistics: tokens per forward and the drafts' acceptance, counted once.

``DraftCounter`` counts on the device during one speculative run (no host sync per step);
``DecodingStats`` holds the plain numbers of one run or of several (``DecodingStats.combine``),
and derives the rates from them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

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
        proposed_counts: (m,) how many times draft depth j was verified.
        accepted_counts: (m,) how many of those were accepted.
        tree_sizes: draft nodes fed per forward -> number of such forwards.
        accepted_depths: (m + 1,) how many iterations accepted 0, 1, ..., m drafts.
        forward_cost: fed tokens -> measured cost of such a forward against one token (runs
            with an automatic tree size), else empty.
        acceptance: the acceptance rule (``Acceptance.describe``: ``"exact"`` unless lossy).
        unverified_tokens: new tokens a lossy rule accepted against the verifier's choice (the
            original model would not have emitted them there); 0 for exact decoding.
    """

    draft_positions: int = 0
    forwards: int = 0
    row_forwards: list[int] = field(default_factory=list)
    new_tokens_per_row: list[int] = field(default_factory=list)
    proposed_counts: list[int] = field(default_factory=list)
    accepted_counts: list[int] = field(default_factory=list)
    tree_sizes: dict[int, int] = field(default_factory=dict)
    accepted_depths: list[int] = field(default_factory=list)
    forward_cost: dict[int, float] = field(default_factory=dict)
    acceptance: str = "exact"
    unverified_tokens: int = 0

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
        rules: list[str] = []
        for part in parts:
            m = max(total.draft_positions, part.draft_positions)
            total.proposed_counts = _add(total.proposed_counts, part.proposed_counts, m)
            total.accepted_counts = _add(total.accepted_counts, part.accepted_counts, m)
            total.draft_positions = m
            total.forwards += part.forwards
            total.row_forwards += part.row_forwards
            total.new_tokens_per_row += part.new_tokens_per_row
            for size, count in part.tree_sizes.items():
                total.tree_sizes[size] = total.tree_sizes.get(size, 0) + count
            depths = max(len(total.accepted_depths), len(part.accepted_depths))
            total.accepted_depths = _add(total.accepted_depths, part.accepted_depths, depths)
            total.forward_cost = dict(part.forward_cost or total.forward_cost)
            total.unverified_tokens += part.unverified_tokens
            rules.append(part.acceptance)
        # Runs of different rules combined: every rule named, in order.
        total.acceptance = " + ".join(dict.fromkeys(rules)) or "exact"
        return total


def _add(a: list[int], b: list[int], length: int) -> list[int]:
    a, b = a + [0] * (length - len(a)), b + [0] * (length - len(b))
    return [x + y for x, y in zip(a, b)]


class DraftCounter:
    """Device-side counters of one speculative run over a batch of B rows.

    Acceptance is counted per depth of the draft tree (a chain's depth is its draft position);
    the counts grow with the deepest depth verified.
    """

    def __init__(
        self, batch: int, draft_positions: int, device: torch.device, acceptance: str = "exact"
    ) -> None:
        self.acceptance = acceptance
        self.unverified = torch.zeros((), dtype=torch.long, device=device)
        self.draft_positions = draft_positions
        self.forwards = 0
        self.row_forwards = torch.zeros(batch, dtype=torch.long, device=device)
        self.proposed = torch.zeros(draft_positions, dtype=torch.long, device=device)
        self.accepted = torch.zeros(draft_positions, dtype=torch.long, device=device)
        self.tree_sizes: dict[int, int] = {}
        self.accepted_depths = torch.zeros(draft_positions + 1, dtype=torch.long, device=device)

    def count_forward(self, rows: torch.Tensor, draft_nodes: int | None = None) -> None:
        """One trunk forward over the (b,) live ``rows``, feeding ``draft_nodes`` drafts per
        row (None for the prefill)."""
        self.forwards += 1
        self.row_forwards[rows] += 1
        if draft_nodes is not None:
            self.tree_sizes[draft_nodes] = self.tree_sizes.get(draft_nodes, 0) + 1

    def _grow(self, depth: int) -> None:
        if depth > self.proposed.shape[0]:
            extra = depth - self.proposed.shape[0]
            self.proposed = torch.cat([self.proposed, self.proposed.new_zeros(extra)])
            self.accepted = torch.cat([self.accepted, self.accepted.new_zeros(extra)])
            self.accepted_depths = torch.cat(
                [self.accepted_depths, self.accepted_depths.new_zeros(extra)]
            )
            self.draft_positions = depth

    def count_verification(
        self, path: Any, path_tokens: torch.Tensor, remaining: torch.Tensor, eos: torch.Tensor
    ) -> None:
        """Count which depths were verified and accepted in one iteration.

        Depth j was verified iff the accepted path reached depth j - 1 at a node with children
        (``path.tried``); it counts only when its token lies within the row's budget
        (j < remaining: the kept token takes one) and no accepted EOS precedes it.

        Args:
            path: the ``cpd_mtp.decoding.tree.TreePath`` of the iteration.
            path_tokens: (b, D + 1) tokens of the accepted paths, root first.
            remaining: (b,) new tokens each row may still emit, the kept token included.
            eos: (k,) EOS ids.
        """
        tried = path.tried
        depth = tried.shape[1]
        if depth == 0:
            self.accepted_depths[0] += path.accepted.numel()
            return
        self._grow(depth)
        cols = torch.arange(depth, device=tried.device)[None]  # (1, D): depth - 1
        # EOS among the accepted drafts before depth j + 1 (columns past a row's path are
        # never tried, so what the padding holds there does not count).
        is_eos = torch.isin(path_tokens[:, 1:], eos).long()
        is_eos = torch.nn.functional.pad(is_eos, (0, depth + 1 - is_eos.shape[1]))
        eos_before = (torch.cumsum(is_eos, dim=1) - is_eos)[:, :depth]  # (b, D)
        counted = tried & (cols < remaining[:, None])
        counted = counted & (eos_before == 0)
        self.proposed[:depth] += counted.sum(dim=0)
        taken = counted & (cols < path.accepted[:, None])
        self.accepted[:depth] += taken.sum(dim=0)
        if path.unverified is not None and path.unverified.shape[1]:
            lossy = torch.nn.functional.pad(path.unverified, (0, depth - path.unverified.shape[1]))
            self.unverified += (taken & lossy).sum()
        self.accepted_depths.index_add_(0, path.accepted, torch.ones_like(path.accepted))

    def finish(self, new_tokens_per_row: torch.Tensor) -> DecodingStats:
        """The plain counts, given the (B,) new tokens per row."""
        return DecodingStats(
            draft_positions=self.draft_positions,
            forwards=self.forwards,
            row_forwards=self.row_forwards.tolist(),
            new_tokens_per_row=new_tokens_per_row.tolist(),
            proposed_counts=self.proposed.tolist(),
            accepted_counts=self.accepted.tolist(),
            tree_sizes=dict(sorted(self.tree_sizes.items())),
            accepted_depths=self.accepted_depths.tolist(),
            acceptance=self.acceptance,
            unverified_tokens=int(self.unverified),
        )
