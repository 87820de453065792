"""The synthetic correlated task: rank > 1 reaches the known optimum, rank 1 cannot."""

from __future__ import annotations

import argparse
import math

from cpd_mtp.apps.synthetic import train


def test_rank_beats_independent_heads_on_correlated_futures():
    args = argparse.Namespace(
        steps=150, n_future=3, modes=8, vocab=64, dim=32, batch=256, lr=1e-2, seed=0
    )
    tail = slice(-20, None)
    rank1, rank4 = (sum(c[tail]) / 20 for c in (train(1, args), train(4, args)))
    # Optimum: ln 2 (one hidden coin); independent heads cannot go below n·ln 2.
    assert rank4 < math.log(2) + 0.1
    assert rank1 > 3 * math.log(2) - 0.05
