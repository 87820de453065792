"""Token selection for decoding: warping and sampling.

Everything here works on *normalised log-probabilities* (the CP head's marginal and conditionals
are already normalised) and returns normalised log-probabilities, with ``-inf`` for tokens a
warper removed.

Warping is Hugging Face's own: a ``transformers.LogitsProcessorList`` of
``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper``, in the order
``generate(do_sample=True)`` applies them: temperature, then top-k (ties with the k-th value are
kept), then top-p (the smallest set of most likely tokens whose mass exceeds ``top_p``; at least
one token). The arguments are validated here first, so that a bad one is a ``ValueError`` naming
it (HF's own checks accept a NaN ``top_p`` and reject an int temperature).

The speculative decoder's verification is ``cpd_mtp.decoding.tree.verify`` (greedy, and sampling
through the coupled noise of ``cpd_mtp.decoding.noise``).
"""

from __future__ import annotations

import math
import numbers

import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

__all__ = [
    "apply_warpers",
    "build_warpers",
    "check_warping",
    "inverse_cdf",
    "sample",
    "warp_log_probs",
]


def build_warpers(
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> LogitsProcessorList:
    """The HF logits warpers for these arguments, validated (``check_warping``).

    Warpers that would change nothing (temperature 1, top_k None or 0, top_p None or 1) are
    left out, as ``generate`` does.
    """
    check_warping(temperature, top_k, top_p)
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        warpers.append(TopKLogitsWarper(int(top_k)))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(top_p)))
    return warpers


def apply_warpers(warpers: LogitsProcessorList, log_probs: torch.Tensor) -> torch.Tensor:
    """Apply ``warpers`` to log-probabilities and renormalise.

    Args:
        warpers: from ``build_warpers``.
        log_probs: (..., V) log-probabilities (or logits: only differences matter).

    Returns:
        (..., V) float32 (float64 for float64) normalised log-probabilities; ``-inf`` for
        removed tokens.
    """
    dtype = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    scores = log_probs.to(dtype)
    if warpers:
        # HF's processors take (batch, V) scores (top-p scatters along dim 1).
        flat = scores.reshape(-1, scores.shape[-1])
        scores = warpers(None, flat).reshape(scores.shape)
    return torch.log_softmax(scores, dim=-1)


def warp_log_probs(
    log_probs: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Temperature, top-k and top-p applied to log-probabilities, renormalised.

    Args:
        log_probs: (..., V) log-probabilities (or logits: only differences matter).
        temperature: a finite number > 0; 1 leaves the distribution unchanged.
        top_k: an int >= 0; keep the tokens whose value is at least the k-th largest (None or 0:
            all).
        top_p: in (0, 1]; keep the most likely tokens until their mass exceeds ``top_p``,
            i.e. drop a token when the total mass of the tokens *less or equally* likely than it
            (in the sort order) is at most ``1 - top_p`` (None or 1: all).

    Returns:
        (..., V) float32 (float64 for float64) normalised log-probabilities of the warped
        distribution; ``-inf`` for removed tokens. At least one token always remains.

    Raises:
        ValueError: a warping argument out of range, NaN or of the wrong type
            (``check_warping``).
    """
    return apply_warpers(build_warpers(temperature, top_k, top_p), log_probs)


def check_warping(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a ``ValueError`` naming the argument unless the warping arguments make sense.

    ``temperature``: a finite real > 0. ``top_k``: None or an int >= 0. ``top_p``: None or a
    real in (0, 1]. NaN, infinities and bools are rejected (a NaN temperature would otherwise
    turn every score into NaN, and a NaN top_p would skip the nucleus filter silently).
    """
    if not _is_real(temperature) or not (0.0 < float(temperature) < math.inf):
        raise ValueError(
            f"temperature must be a finite number > 0 (use greedy decoding for 0), got {temperature!r}"
        )
    if top_k is not None and (
        not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0
    ):
        raise ValueError(f"top_k must be None or an int >= 0 (0: no top-k), got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not (0.0 < float(top_p) <= 1.0)):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def sample(log_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from normalised log-probabilities.

    Args:
        log_probs: (B, V) normalised log-probabilities (``-inf`` allowed).
        generator: the random source (its device must be ``log_probs``'s).

    Returns:
        (B,) int64 token ids.
    """
    return inverse_cdf(log_probs.exp(), generator)


def inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) non-negative weights (not necessarily normalised) -> (B,) draws.

    Inverse-CDF sampling in float64: the first token whose cumulative weight exceeds
    u · total, u ~ U[0, 1). A token of weight 0 is never drawn (its cumulative weight equals
    its predecessor's). Cheaper than ``torch.multinomial`` on CPU for a few rows.
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=torch.float64)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return index.squeeze(-1).clamp(max=cdf.shape[-1] - 1)
