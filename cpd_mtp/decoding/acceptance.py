"""Which drafts verification accepts: exactly the verifier's choices, or a lossy rule.

Every rule decides, for each draft node u of a tree (``cpd_mtp.decoding.tree``), whether u is
*acceptable* given its parent; verification then keeps the longest path of acceptable nodes
from the root and appends the verifier's own choice after it. Let p be the verifier's
distribution at u's parent (greedy: the model's softmax at temperature 1; sampling: the warped
distribution the call samples from) and c its choice there (greedy: the argmax; sampling: the
coupled draw, ``cpd_mtp.decoding.noise``).

- ``"exact"`` (the default): u is acceptable iff its token is c. At most one sibling is, so the
  output is the original model's: greedy tokens equal autoregressive greedy decoding, sampled
  ones are distributed as autoregressive sampling.
- ``"typical"`` (Medusa-2's typical acceptance, Cai et al. 2024): u is also acceptable when
  p(token) > min(epsilon, delta * exp(-H(p))), H the entropy of p. A confident verifier
  (low H) accepts only likely tokens, a flat one accepts more.
- ``"confident"`` (confidence-adaptive decoding, after Kirchenbauer et al. 2026's ConfAdapt):
  a node the CP head drafted is acceptable when the head's own conditional probability of its
  token given its path is at least tau, whatever the verifier says; with ``accept_verified``
  (the default) any node whose token is c is acceptable too. tau = 1 accepts nothing on
  confidence alone, so ``confidence=1`` is exact decoding.

The lossy rules change the output: a draft accepted against the verifier's choice is a token the
original model would not have produced there (greedy) or not with its own probability
(sampling). ``DecodingStats.unverified_tokens`` counts them, and the output records the rule.
Never use a lossy rule where the original model's output is needed (evaluation, distillation
targets, anything compared with the original).

Among several acceptable children, verification takes the one on the longest acceptable path
(ties: the first in tree order), as Medusa takes the candidate with the longest accepted prefix.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ACCEPTANCE_RULES", "Acceptance"]

ACCEPTANCE_RULES = ("exact", "typical", "confident")


@dataclass(frozen=True)
class Acceptance:
    """A validated acceptance rule (module docstring).

    Attributes:
        rule: ``"exact"``, ``"typical"`` or ``"confident"``.
        typical_epsilon: epsilon of ``"typical"``, in (0, 1]: the hard cap of the threshold
            (Medusa's ``posterior_threshold``, default 0.09).
        typical_delta: delta of ``"typical"``, in (0, 1]: the entropy-scaled threshold's
            factor (Medusa's ``posterior_alpha``, default 0.3).
        confidence: tau of ``"confident"``, in (0, 1] (default 0.9).
        accept_verified: ``"confident"`` also accepts the verifier's own choices (default True).
    """

    rule: str = "exact"
    typical_epsilon: float = 0.09
    typical_delta: float = 0.3
    confidence: float = 0.9
    accept_verified: bool = True

    @classmethod
    def parse(
        cls,
        acceptance: Any = None,
        typical_epsilon: Any = None,
        typical_delta: Any = None,
        confidence: Any = None,
        accept_verified: Any = None,
    ) -> Acceptance:
        """The rule of one call, or a one-line ``ValueError`` naming the bad option.

        None takes the default. A threshold of a rule the call does not use is refused, so a
        forgotten ``acceptance=`` is never silently exact decoding.
        """
        rule = "exact" if acceptance is None else acceptance
        if rule not in ACCEPTANCE_RULES:
            raise ValueError(
                f"acceptance must be one of {', '.join(map(repr, ACCEPTANCE_RULES))}, "
                f"got {acceptance!r}"
            )
        given = {
            "typical_epsilon": (typical_epsilon, "typical"),
            "typical_delta": (typical_delta, "typical"),
            "confidence": (confidence, "confident"),
            "accept_verified": (accept_verified, "confident"),
        }
        for name, (value, owner) in given.items():
            if value is not None and rule != owner:
                raise ValueError(
                    f"{name} applies to acceptance={owner!r} only; this call's acceptance is "
                    f"{rule!r}"
                )
        values = {}
        for name in ("typical_epsilon", "typical_delta", "confidence"):
            value = given[name][0]
            if value is None:
                continue
            if (
                not isinstance(value, numbers.Real)
                or isinstance(value, bool)
                or not (0.0 < float(value) <= 1.0)
            ):
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
            values[name] = float(value)
        if accept_verified is not None:
            if not isinstance(accept_verified, bool):
                raise ValueError(f"accept_verified must be True or False, got {accept_verified!r}")
            values["accept_verified"] = accept_verified
        return cls(rule=rule, **values)

    @property
    def lossy(self) -> bool:
        """Whether the output may differ from the original model's."""
        return self.rule == "typical" or (self.rule == "confident" and self.confidence < 1.0)

    def describe(self) -> str:
        """The rule and its thresholds in one short string (for statistics and logs)."""
        if self.rule == "typical":
            return f"typical(epsilon={self.typical_epsilon:g}, delta={self.typical_delta:g})"
        if self.rule == "confident":
            verified = ", accept_verified" if self.accept_verified else ""
            return f"confident(tau={self.confidence:g}{verified})"
        return "exact"

    def acceptable(
        self,
        tokens: torch.Tensor,
        parents: torch.Tensor,
        choice: torch.Tensor,
        log_p: torch.Tensor | None = None,
        head_log_q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(b, N) bool: which nodes this rule accepts given their parent (root: True).

        Args:
            tokens: (b, N) node tokens.
            parents: (b, N) parent indices (-1 for the root).
            choice: (b, N) the verifier's choice after each node.
            log_p: (b, N, V) the verifier's log-probabilities (or logits: they are normalised
                here) after each node (``"typical"`` only).
            head_log_q: (b, N) log of the CP head's conditional probability of each node's
                token, -inf where the head did not draft it (``"confident"`` only).
        """
        parent = parents.clamp(min=0)
        exact = tokens == choice.gather(1, parent)
        if self.rule == "typical":
            if log_p is None:
                raise ValueError("the typical rule needs the verifier's log-probabilities")
            ok = exact | self._typical(tokens, parent, log_p)
        elif self.rule == "confident" and self.confidence < 1.0:
            if head_log_q is None:
                raise ValueError("the confident rule needs the head's draft probabilities")
            ok = head_log_q >= math.log(self.confidence)
            if self.accept_verified:
                ok = ok | exact
        else:
            ok = exact
        ok = ok.clone()
        ok[:, 0] = True
        return ok

    def _typical(
        self, tokens: torch.Tensor, parent: torch.Tensor, scores: torch.Tensor
    ) -> torch.Tensor:
        """(b, N) p(token) > min(epsilon, delta e^-H) at each node's parent; only the nodes
        that have children are normalised (a (V,) softmax each, the step's main cost)."""
        b, n, vocab = scores.shape
        has_child = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
        has_child.scatter_(1, parent[:, 1:], True)
        where = has_child.nonzero(as_tuple=True)
        dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        rows = scores[where].to(dtype)  # (k, V)
        rows_log_z = torch.logsumexp(rows, dim=-1)  # (k,)
        p = torch.exp(rows - rows_log_z[:, None])
        entropy = -torch.special.xlogy(p, p).sum(-1)  # 0 log 0 = 0
        threshold = torch.full((b, n), -1.0, dtype=dtype, device=scores.device)
        threshold[where] = torch.clamp(
            self.typical_delta * torch.exp(-entropy), max=self.typical_epsilon
        )
        # p of each node's token at its parent: the raw score less the parent's log Z.
        log_z = torch.zeros(b, n, dtype=dtype, device=scores.device)
        log_z[where] = rows_log_z
        raw = scores.flatten(1).gather(1, parent * vocab + tokens).to(dtype)  # (b, N)
        p_token = torch.exp(raw - log_z.gather(1, parent))
        return p_token > threshold.gather(1, parent)
