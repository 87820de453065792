"""Drafters: where the speculative decoder's proposals come from.

A drafter starts at the hidden state of the last accepted position t and then gives, one token
after the other, the distribution of x_{t+k+1} given the k tokens x_{t+1..t+k} already chosen
(x_{t+1} is the always-kept token from the marginal). ``propose`` turns a drafter's
distributions into drafts: argmax when greedy, a draw from the warped distribution when
sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from cpd_mtp.decoding.sampling import sample
from cpd_mtp.head import CPDMTPHead

__all__ = ["CPDrafter", "Drafter", "HeadPieces", "UniformDrafter", "propose"]

# (log_w (B, r), log p_{1,a} (B, r, V)): the head's next-token pieces at the anchor.
HeadPieces = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class Drafter(Protocol):
    """Proposes draft distributions from the hidden state at the last accepted position.

    ``max_drafts`` is the most drafts per step the drafter can give (None: unbounded).
    ``start(hidden (B, d), num_drafts, first=None)`` returns any per-step state; ``first`` is
    the head's (log_w (B, r), log p_{1,a} (B, r, V)) at ``hidden`` (the decoder has them from
    the marginal), which a drafter may use or ignore. ``next(state, chosen (B, k))`` returns
    (B, V) normalised log-probabilities of token x_{t+k+1} given the k tokens x_{t+1..t+k}
    already chosen (k = 1 .. num_drafts).
    """

    max_drafts: int | None

    def start(
        self, hidden: torch.Tensor, num_drafts: int, first: HeadPieces | None = None
    ) -> Any: ...

    def next(self, state: Any, chosen: torch.Tensor) -> torch.Tensor: ...


class CPDrafter:
    """The CP head's own conditionals: the default drafter.

    ``start`` gives log w (B, r) and log p_{s,a} (B, num_drafts + 1, r, V) at the anchor;
    ``next`` is ``CPDMTPHead.conditional``: the posterior over experts updated by each chosen
    token, then the mixture of the next offset's expert distributions.
    """

    def __init__(self, head: CPDMTPHead) -> None:
        self.head = head
        self.max_drafts = head.config.n_future - 1
        # With a draft vocabulary the experts' distributions live on its K ids: chosen tokens
        # are looked up there, and each q is put back on the full vocabulary (0 elsewhere).
        self.draft_ids = head.draft_ids
        self.vocab_size = head.config.vocab_size
        self.position = None
        self.unembedding = None
        if self.draft_ids is not None:
            self.position = head.draft_position(torch.arange(self.vocab_size))
            # W_U is frozen while decoding: gather its K draft rows once, not per iteration.
            self.unembedding = head._expert_unembedding().detach()

    @torch.no_grad()
    def start(
        self, hidden: torch.Tensor, num_drafts: int, first: HeadPieces | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) -> (log_w (B, r), log_p (B, num_drafts + 1, r, V)).

        ``first``: (log_w, log p_{1,a}) already computed at ``hidden`` (marginal mode, where
        the decoder has them from the marginal); only offsets 2.. are then computed here.
        Without it (base mode) every offset comes from one product of the n'·r expert rows with
        W_U's rows (the K draft rows with a draft vocabulary): W_U is read once.
        """
        if first is None:  # base mode: every offset from one product with W_U's (draft) rows
            return self.head.log_gate(hidden), self.head.expert_log_probs(
                hidden, slice(0, num_drafts + 1), self.unembedding
            )
        log_w, log_p1 = first
        if num_drafts == 0:
            return log_w, log_p1[:, None]
        rest = self.head.expert_log_probs(hidden, slice(1, num_drafts + 1))
        return log_w, torch.cat([log_p1[:, None].to(rest.dtype), rest], dim=1)

    def next(self, state: tuple[torch.Tensor, torch.Tensor], chosen: torch.Tensor) -> torch.Tensor:
        """chosen (B, k) -> log q_{k+1} (B, V)."""
        log_w, log_p = state
        if self.position is None:
            return CPDMTPHead.conditional(log_w, log_p, chosen)[1]
        position = self.position.to(chosen.device)[chosen]  # (B, k), -1 outside the draft ids
        log_q = CPDMTPHead.conditional(log_w, log_p, position, known=position >= 0)[1]
        full = log_q.new_full((log_q.shape[0], self.vocab_size), float("-inf"))
        return full.index_copy_(1, self.draft_ids.to(log_q.device), log_q)


class UniformDrafter:
    """A deliberately uninformed drafter: q is uniform over the vocabulary.

    Decoding with it stays exact (the verification step corrects any q); it only accepts less.
    """

    def __init__(self, vocab_size: int, max_drafts: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.max_drafts = max_drafts

    def start(
        self, hidden: torch.Tensor, num_drafts: int, first: HeadPieces | None = None
    ) -> torch.Tensor:
        """(B, d) -> (B, V) uniform log q, the same for every offset."""
        value = -math.log(self.vocab_size)
        return torch.full((hidden.shape[0], self.vocab_size), value, device=hidden.device)

    def next(self, state: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return state


def propose(
    drafter: Drafter,
    anchor: torch.Tensor,
    first_token: torch.Tensor,
    num_drafts: int,
    *,
    warp: Callable[[torch.Tensor], torch.Tensor] | None,
    generator: torch.Generator | None = None,
    first: HeadPieces | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft x_{t+2..t+m+1} one by one from the drafter's conditionals.

    Args:
        drafter: the source of the draft distributions.
        anchor: (B, d) hidden state at the last accepted position t.
        first_token: (B,) the kept token x_{t+1}.
        num_drafts: m >= 0.
        warp: None for greedy drafts (argmax); else the warping of the target, applied to each
            q before drawing from it.
        generator: random source for sampling.
        first: the head's (log_w, log p_1) at the anchor, passed on to ``drafter.start``.

    Returns:
        drafts (B, m) int64; when sampling, the (B, m, V) warped log q each draft was drawn
        from (None when greedy).
    """
    greedy = warp is None
    chosen = first_token[:, None]  # (B, 1 + k)
    log_qs: list[torch.Tensor] = []
    if num_drafts > 0:
        state = drafter.start(anchor, num_drafts, first=first)
        for _ in range(num_drafts):
            log_q = drafter.next(state, chosen)  # (B, V)
            if greedy:
                token = torch.argmax(log_q, dim=-1)
            else:
                log_q = warp(log_q)
                token = sample(log_q, generator)
                log_qs.append(log_q)
            chosen = torch.cat([chosen, token[:, None]], dim=1)
    if greedy:
        return chosen[:, 1:], None
    if not log_qs:  # m = 0: verification reads no q
        return chosen[:, 1:], anchor.new_zeros(anchor.shape[0], 0, 0, dtype=torch.float32)
    return chosen[:, 1:], torch.stack(log_qs, dim=1)
