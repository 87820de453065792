"""Decoding: exact self-speculative decoding with the CP head as drafter, and its baseline.

The parts, each in its own module:

- ``speculative``: ``generate`` and the ``SpeculativeDecoder`` state with one ``step``
  (draft a tree -> forward -> verify -> emit -> keep the path).
- ``sources``: the ``DraftSource`` protocol and its sources: ``CPSource`` (the head's
  conditionals as a tree), ``ContextSource`` (prompt lookup), ``UniformSource`` (tests).
- ``builder``: ``TreeBuilder``, one tree from any sources, scored by per-source calibrated
  acceptance and sized by the forward's measured cost.
- ``tree``: draft trees, their attention mask, the one verifier (``verify``); ``forward``: the
  step's trunk forward; ``calibration``, ``cost``: what sizes the trees.
- ``noise``: the coupled noise that makes sampled output a function of the seed alone.
- ``options``: ``draft_tree``, ``context_drafts``, ``draft_positions``, parsed once.
- ``sampling``: warping through Hugging Face's logits warpers, ``sample``.
- ``stats``: the counts and rates of a run (``DecodingStats``), ``output``: ``GenerationOutput``.
- ``cache``: the full-history cache and its compaction for batches.
- ``inputs``, ``padding``: argument checks, EOS / pad defaults, left padding.
- ``baseline``: ``autoregressive_generate``, Hugging Face ``generate`` on the same model.

Needs the ``hf`` extra (transformers).
"""

from cpd_mtp.utils.extras import require

require("transformers", "cpd_mtp.decoding")

from cpd_mtp.decoding.baseline import autoregressive_generate  # noqa: E402
from cpd_mtp.decoding.builder import TreeBuilder  # noqa: E402
from cpd_mtp.decoding.output import GenerationOutput  # noqa: E402
from cpd_mtp.decoding.padding import left_pad  # noqa: E402
from cpd_mtp.decoding.sampling import (  # noqa: E402
    build_warpers,
    check_warping,
    sample,
    warp_log_probs,
)
from cpd_mtp.decoding.sources import (  # noqa: E402
    Candidates,
    ContextSource,
    CPSource,
    DraftContext,
    DraftSource,
    SourceLimit,
    UniformSource,
)
from cpd_mtp.decoding.speculative import SpeculativeDecoder, generate  # noqa: E402
from cpd_mtp.decoding.stats import DecodingStats  # noqa: E402

__all__ = [
    "CPSource",
    "Candidates",
    "ContextSource",
    "DecodingStats",
    "DraftContext",
    "DraftSource",
    "GenerationOutput",
    "SourceLimit",
    "SpeculativeDecoder",
    "TreeBuilder",
    "UniformSource",
    "autoregressive_generate",
    "build_warpers",
    "check_warping",
    "generate",
    "left_pad",
    "sample",
    "warp_log_probs",
]
