"""A retrofit's wall-clock budget (``run.minutes``): how much data to make, how many steps to train.

The budget starts when the run does. Making data (the model's own continuations, or trunk
states of corpus blocks) may run until ``data_share`` of it has passed; training gets what is
left once the states are cached, sized by timing the head's own forward and backward on real
batches before the first step. The plan is stored in every checkpoint, so a resumed run trains
on the same data for the same number of steps whatever the clock says then.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

# The optimizer step, the batch gather, logging and the loop's bookkeeping on top of the timed
# forward + backward: on a 2-core CPU (SmolLM2, r = 2) the loop's mean step was 1.15x the
# median timed call (0.398 s against 0.345 s).
STEP_OVERHEAD = 1.15
# Seconds kept for the checkpoint and the export after the last step.
EXPORT_RESERVE_S = 5.0


@dataclass
class TimeBudget:
    """``minutes`` of wall clock from ``start`` (a ``time.monotonic()`` value)."""

    minutes: float
    data_share: float
    start: float

    @property
    def seconds(self) -> float:
        return 60.0 * self.minutes

    @property
    def data_deadline(self) -> float:
        """The ``time.monotonic()`` after which no new data is made."""
        return self.start + self.data_share * self.seconds

    def left(self) -> float:
        """Seconds of the budget still unspent (negative when overrun)."""
        return self.start + self.seconds - time.monotonic()

    def used_minutes(self) -> float:
        return (time.monotonic() - self.start) / 60.0


def seconds_per_call(
    work: Callable[[], object],
    repeats: int = 5,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds per call of ``work``: ``warmup`` calls, then the median of ``repeats`` timed calls.

    The first calls after other work run slow (fresh allocations, thread pools waking up): on a
    2-core CPU the second and third calls of a head's step took 1.3x the later ones, so a mean
    over them planned too few steps. The median ignores a minority of such calls.
    """
    for _ in range(warmup):
        work()
    seconds = []
    for _ in range(repeats):
        start = clock()
        work()
        seconds.append(clock() - start)
    return statistics.median(seconds)


def steps_that_fit(seconds: float, step_seconds: float, reserve_seconds: float) -> int:
    """Optimizer steps of ``step_seconds`` that fit in ``seconds`` after ``reserve_seconds``;
    at least one (a budget spent on data still trains, and says so)."""
    if step_seconds <= 0 or not math.isfinite(step_seconds):
        raise ValueError(f"step_seconds must be a finite number > 0, got {step_seconds}")
    return max(1, int((seconds - reserve_seconds) / (STEP_OVERHEAD * step_seconds)))


def blocks_that_fit(seconds: float, seconds_per_block: float, at_most: int) -> int:
    """How many blocks of ``seconds_per_block`` each fit in ``seconds``: 1 to ``at_most``."""
    if seconds_per_block <= 0:
        return at_most
    return max(1, min(at_most, int(seconds / seconds_per_block)))
