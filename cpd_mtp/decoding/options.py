"""The speculative decoder's own options, parsed once for every entry point.

``cpd_mtp.generate``, ``model.generate`` (and its ``generation_config``) and ``cpd-mtp
generate`` take the same three options; :meth:`DraftOptions.parse` checks them before any
other work, whichever path the call then takes (Hugging Face's own loop included), so a typo
is an error, never silently ignored.

- ``draft_tree``: ``"auto"`` (the default, ``None``): the tree sized per step to maximise
  expected tokens per second under the forward cost measured on this machine; ``"chain"``:
  one chain of the head's top drafts; an int T >= 0: the best T draft nodes (0: plain
  autoregressive decoding).
- ``context_drafts``: prompt-lookup branches: True, False, or an int >= 1, the longest
  continuation proposed; None: on (10 tokens) unless ``draft_tree="chain"``.
- ``draft_positions``: the deepest draft of the model's own head, 0 <= m <= n_future - 1
  (checked against the head where the model is known); None: the head's full depth.
- ``acceptance`` (``"exact"``, ``"typical"``, ``"confident"``) and its thresholds
  ``typical_epsilon``, ``typical_delta``, ``confidence``, ``accept_verified``: which drafts
  verification accepts (``cpd_mtp.decoding.acceptance``); the lossy rules need drafts, so
  they refuse ``draft_tree=0`` and ``draft_positions=0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cpd_mtp.decoding.acceptance import Acceptance
from cpd_mtp.decoding.inputs import is_int

__all__ = ["ACCEPTANCE_OPTIONS", "DEFAULT_CONTEXT_TOKENS", "DraftOptions"]

# The acceptance rule's options, in ``Acceptance.parse``'s order.
ACCEPTANCE_OPTIONS = (
    "acceptance",
    "typical_epsilon",
    "typical_delta",
    "confidence",
    "accept_verified",
)

# The longest prompt-lookup continuation proposed by default (HF's prompt_lookup_num_tokens).
DEFAULT_CONTEXT_TOKENS = 10


@dataclass(frozen=True)
class DraftOptions:
    """Validated decoding options (see the module docstring for each).

    Attributes:
        tree: ``"auto"``, ``"chain"`` or the most draft nodes per forward.
        context: the longest context-draft chain; 0 for none.
        positions: the deepest draft of the head; None for its full depth.
        acceptance: which drafts verification accepts (exact unless a lossy rule is asked).
    """

    tree: str | int = "auto"
    context: int = DEFAULT_CONTEXT_TOKENS
    positions: int | None = None
    acceptance: Acceptance = field(default_factory=Acceptance)

    @classmethod
    def parse(
        cls,
        draft_tree: Any = None,
        context_drafts: Any = None,
        draft_positions: Any = None,
        acceptance: Any = None,
        typical_epsilon: Any = None,
        typical_delta: Any = None,
        confidence: Any = None,
        accept_verified: Any = None,
    ) -> DraftOptions:
        """The options of one call, or a ``ValueError`` of one line naming the bad one."""
        if draft_tree is None:
            draft_tree = "auto"
        if isinstance(draft_tree, str):
            if draft_tree not in ("auto", "chain"):
                raise ValueError(
                    "draft_tree must be 'auto', 'chain' or an int >= 0 (most draft nodes), "
                    f"got {draft_tree!r}"
                )
        elif not is_int(draft_tree) or draft_tree < 0:
            raise ValueError(
                "draft_tree must be 'auto', 'chain' or an int >= 0 (most draft nodes), "
                f"got {draft_tree!r}"
            )
        else:
            draft_tree = int(draft_tree)
        if context_drafts is None:
            context = 0 if draft_tree == "chain" else DEFAULT_CONTEXT_TOKENS
        elif isinstance(context_drafts, bool):
            context = DEFAULT_CONTEXT_TOKENS if context_drafts else 0
        elif is_int(context_drafts) and context_drafts >= 1:
            context = int(context_drafts)
        else:
            raise ValueError(
                f"context_drafts must be True, False, None or an int >= 1, got {context_drafts!r}"
            )
        if draft_positions is not None and (not is_int(draft_positions) or draft_positions < 0):
            raise ValueError(f"draft_positions must be an int >= 0, got {draft_positions!r}")
        rule = Acceptance.parse(
            acceptance, typical_epsilon, typical_delta, confidence, accept_verified
        )
        if rule.rule != "exact" and (draft_tree == 0 or draft_positions == 0):
            which = "draft_tree=0" if draft_tree == 0 else "draft_positions=0"
            raise ValueError(
                f"acceptance={rule.rule!r} decides which drafts to accept, but {which} feeds "
                "none: drop one of the two"
            )
        return cls(
            tree=draft_tree,
            context=context,
            positions=None if draft_positions is None else int(draft_positions),
            acceptance=rule,
        )

    @property
    def sized_by_cost(self) -> bool:
        """Whether each step's tree is sized by the measured forward cost."""
        return self.tree == "auto"
