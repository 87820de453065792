"""The draft vocabulary: the K most frequent token ids of the head's training tokens.

Drafting and head training over a subset D of K ids (after FR-Spec, Zhao et al. 2025) cost
O(K) instead of O(V) per expert row; the verifier keeps decoding exact whatever D is. The ids
are returned sorted, so the position of an id inside D does not depend on ties in the counts.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


def token_counts(arrays: Iterable[np.ndarray | torch.Tensor], vocab_size: int) -> np.ndarray:
    """How often each id in [0, vocab_size) occurs in the arrays: (V,) int64.

    Raises:
        ValueError: an id outside [0, vocab_size).
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for array in arrays:
        ids = array.cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
        ids = ids.reshape(-1).astype(np.int64, copy=False)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = ids[(ids < 0) | (ids >= vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {vocab_size})")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def most_frequent_ids(counts: np.ndarray, k: int) -> torch.Tensor:
    """The ``k`` most frequent ids, ties broken by the smaller id, returned sorted: (K,) int64.

    Args:
        counts: (V,) occurrence counts (``token_counts``).
        k: the draft vocabulary size, 1 <= k <= V.
    """
    vocab = int(counts.shape[0])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"the draft vocabulary size must be an int in [1, {vocab}], got {k!r}")
    # A stable sort of -count keeps the smaller id first among equal counts.
    order = np.argsort(-counts, kind="stable")[:k]
    return torch.from_numpy(np.sort(order)).to(torch.int64)
