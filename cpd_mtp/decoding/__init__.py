"""Decoding: exact self-speculative decoding with the CP head as drafter, and its baseline.

The parts, each in its own module:

- ``speculative``: ``generate`` and the ``SpeculativeDecoder`` state with one ``step``
  (draft a tree -> forward -> verify -> emit -> keep the path).
- ``drafters``: the ``Drafter`` protocol, ``CPDrafter`` (the head's conditionals as a tree),
  ``ContextDrafter`` (prompt lookup), ``TreeDrafter`` (both, sized by the forward's cost) and
  ``UniformDrafter``.
- ``tree``: draft trees, their attention mask, greedy and rejection-sampling verification;
  ``forward``: the step's trunk forward; ``calibration``, ``cost``: what sizes the trees.
- ``sampling``: warping through Hugging Face's logits warpers, ``sample`` and ``verify``.
- ``stats``: the counts and rates of a run (``DecodingStats``), ``output``: ``GenerationOutput``.
- ``cache``: the full-history cache and its compaction for batches.
- ``inputs``, ``padding``: argument checks, EOS / pad defaults, left padding.
- ``baseline``: ``autoregressive_generate``, Hugging Face ``generate`` on the same model.

Needs the ``hf`` extra (transformers).
"""

from cpd_mtp.utils.extras import require

require("transformers", "cpd_mtp.decoding")

from cpd_mtp.decoding.baseline import autoregressive_generate  # noqa: E402
from cpd_mtp.decoding.drafters import (  # noqa: E402
    ContextDrafter,
    CPDrafter,
    Drafter,
    TreeDrafter,
    UniformDrafter,
)
from cpd_mtp.decoding.output import GenerationOutput  # noqa: E402
from cpd_mtp.decoding.padding import left_pad  # noqa: E402
from cpd_mtp.decoding.sampling import (  # noqa: E402
    build_warpers,
    check_warping,
    sample,
    verify,
    warp_log_probs,
)
from cpd_mtp.decoding.speculative import SpeculativeDecoder, generate  # noqa: E402
from cpd_mtp.decoding.stats import DecodingStats  # noqa: E402

__all__ = [
    "CPDrafter",
    "ContextDrafter",
    "DecodingStats",
    "Drafter",
    "GenerationOutput",
    "SpeculativeDecoder",
    "TreeDrafter",
    "UniformDrafter",
    "autoregressive_generate",
    "build_warpers",
    "check_warping",
    "generate",
    "left_pad",
    "sample",
    "verify",
    "warp_log_probs",
]
