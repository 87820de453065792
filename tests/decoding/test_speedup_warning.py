"""``cpd_mtp.decoding.measure``: the speedup summary and the warning for a slower head."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cpd_mtp.decoding.measure import slower_warning, summarise_speedup


def measured(ratios: list[float]) -> dict:
    return {"greedy": {"tokens_per_forward": 1.1, "speedup": summarise_speedup(ratios)}}


@given(st.lists(st.floats(0.2, 5.0), min_size=1, max_size=20))
def test_a_warning_exactly_when_the_median_speedup_is_below_one(ratios):
    median = sorted(ratios)[len(ratios) // 2] if len(ratios) % 2 else None
    warning = slower_warning(measured(ratios))
    assert (warning is not None) == (summarise_speedup(ratios)["median"] < 1.0)
    if median is not None:
        assert summarise_speedup(ratios)["median"] == median
    if warning is not None:
        assert (
            warning.startswith("warning: this head makes decoding SLOWER") and "\n" not in warning
        )
        assert "--distill generated" in warning and "speculative=False" in warning
