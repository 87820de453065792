"""Summaries of repeated measurements: the median and the 20th-80th percentile spread."""

from __future__ import annotations

import statistics

__all__ = ["percentiles"]


def percentiles(values: list[float]) -> dict[str, float]:
    """p20, p50 and p80 (linear interpolation) of a list of numbers, and their count."""
    if len(values) == 1:
        return {"p20": values[0], "p50": values[0], "p80": values[0], "n": 1}
    q = statistics.quantiles(values, n=10, method="inclusive")
    return {"p20": q[1], "p50": statistics.median(values), "p80": q[7], "n": len(values)}
