"""How often drafts are accepted, learned while decoding: the scores that choose a tree's nodes.

A tree is worth the drafts it gets accepted, so its nodes are chosen by the probability that the
verifier accepts them. A drafter's own probability q of a token is a guess at that; this module
corrects the guess with what verification has shown so far. For each (source, depth) pair (the
CP head's drafts at offset 2, 3, ...; context drafts) the q values are split into bins, and each
bin keeps the counts of its drafts that were tested (their parent was accepted) and accepted.
The calibrated probability of a bin is a Beta posterior mean whose prior mean is the bin's own q
(so an unseen bin trusts the drafter) and whose prior weight is ``prior_weight`` drafts.
"""

from __future__ import annotations

import torch

__all__ = ["AcceptanceCalibration"]


class AcceptanceCalibration:
    """Calibrated acceptance probabilities per (source, depth, q bin), updated online.

    Args:
        sources: number of draft sources (0: the CP head, 1: context drafts, ...).
        max_depth: deepest depth tracked; deeper drafts share the last depth's bins.
        bins: q bins per (source, depth), equal width on sqrt(q) (finer near 0, where most
            drafts of a wide tree lie).
        prior_weight: drafts' worth of trust in the drafter's own q.
        device: where the counts live.
    """

    def __init__(
        self,
        sources: int,
        max_depth: int,
        bins: int = 12,
        prior_weight: float = 8.0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.bins = bins
        self.max_depth = max(max_depth, 1)
        self.prior_weight = prior_weight
        shape = (sources, self.max_depth, bins)
        self.tested = torch.zeros(shape, dtype=torch.float64, device=device)
        self.accepted = torch.zeros(shape, dtype=torch.float64, device=device)
        # Per source, smoothed over the steps it was asked: seconds spent asking it (proposal
        # and merge), and expected tokens its kept nodes add per step (their scores' sum).
        self.asked = [0] * sources
        self.seconds = [0.0] * sources
        self.gain = [0.0] * sources
        edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=device)
        self.centre = ((edges[:-1] + edges[1:]) / 2) ** 2  # the q at each bin's middle

    def _index(
        self, source: torch.Tensor, depth: torch.Tensor, q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = (depth.clamp(min=1, max=self.max_depth) - 1).long()
        b = (q.clamp(0, 1).to(torch.float64).sqrt() * self.bins).long().clamp(max=self.bins - 1)
        return source.long(), d, b

    def __call__(self, source: torch.Tensor, depth: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Calibrated acceptance probability of drafts (any shape; depth >= 1), float32."""
        s, d, b = self._index(source, depth.to(self.tested.device), q.to(self.tested.device))
        tested, accepted = self.tested[s, d, b], self.accepted[s, d, b]
        prior = self.centre[b]
        value = (accepted + self.prior_weight * prior) / (tested + self.prior_weight)
        return value.to(torch.float32).to(q.device)

    def record_source(
        self, source: int, seconds: float, gain: float, smoothing: float = 0.1
    ) -> None:
        """One step that asked ``source``: the seconds it took and the tokens it added."""
        if self.asked[source] == 0:
            self.seconds[source], self.gain[source] = seconds, gain
        else:
            self.seconds[source] += smoothing * (seconds - self.seconds[source])
            self.gain[source] += smoothing * (gain - self.gain[source])
        self.asked[source] += 1

    def update(
        self, source: torch.Tensor, depth: torch.Tensor, q: torch.Tensor, accepted: torch.Tensor
    ) -> None:
        """Count tested drafts (flat tensors of equal length) and whether each was accepted."""
        if source.numel() == 0:
            return
        device = self.tested.device
        s, d, b = self._index(source.to(device), depth.to(device), q.to(device))
        flat = (s * self.max_depth + d) * self.bins + b
        ones = torch.ones_like(flat, dtype=torch.float64)
        self.tested.view(-1).index_add_(0, flat, ones)
        self.accepted.view(-1).index_add_(0, flat, accepted.to(device, torch.float64))
