"""The draft vocabulary against collections.Counter."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpd_mtp.training.draft_vocab import most_frequent_ids, token_counts


@settings(max_examples=50, deadline=None)
@given(
    chunks=st.lists(st.lists(st.integers(0, 19), max_size=30), min_size=1, max_size=4),
    k=st.integers(1, 20),
)
def test_most_frequent_ids_match_a_counter(chunks, k):
    counts = token_counts([np.array(c, dtype=np.int64) for c in chunks], vocab_size=20)
    counter = Counter(t for c in chunks for t in c)
    assert counts.tolist() == [counter.get(i, 0) for i in range(20)]
    ids = most_frequent_ids(counts, k)
    expected = sorted(sorted(range(20), key=lambda i: (-counter.get(i, 0), i))[:k])
    assert ids.tolist() == expected
    assert ids.dtype == torch.int64


def test_tensors_and_bad_input():
    counts = token_counts([torch.tensor([[3, 3, 1]]), np.array([1, 3], dtype=np.uint16)], 5)
    assert counts.tolist() == [0, 2, 0, 3, 0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_counts([np.array([5])], 5)
    with pytest.raises(ValueError, match="draft vocabulary size"):
        most_frequent_ids(counts, 0)
    with pytest.raises(ValueError, match="draft vocabulary size"):
        most_frequent_ids(counts, 6)
