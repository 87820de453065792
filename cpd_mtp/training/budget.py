"""A retrofit's wall-clock budget (``run.minutes``): a bound on the whole command.

The budget starts when the run does; loading counts. Making data (the model's own answers and
their states, or trunk states of corpus blocks) runs until ``data_share`` of it has passed:
no batch starts after that, and the one running stops there. Training gets the time up to the
end less the reserves for the export and the end-of-run measurement (``measure_share``): its
steps are first sized by timing the head's forward and backward on a real batch, re-planned
from the first real steps, and the step that ends past the training deadline is the last. The
measurement stops starting prompts at the end. The plan (examples, steps) is stored in every
checkpoint, so a resumed run trains on the same data for the same steps whatever the clock says.
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
    """``minutes`` of wall clock from ``start`` (a ``clock()`` value; ``time.monotonic`` by
    default, a test gives its own)."""

    minutes: float
    data_share: float
    start: float
    measure_share: float = 0.0
    clock: Callable[[], float] = time.monotonic

    @property
    def seconds(self) -> float:
        return 60.0 * self.minutes

    @property
    def end(self) -> float:
        return self.start + self.seconds

    @property
    def data_deadline(self) -> float:
        """The ``clock()`` after which no new data is made."""
        return self.start + self.data_share * self.seconds

    @property
    def measure_deadline(self) -> float:
        """When the end-of-run measurement must start: its share of the budget is left."""
        return self.end - self.measure_share * self.seconds

    @property
    def train_deadline(self) -> float:
        """The last step ends by then: the export and the measurement fit after it."""
        return self.measure_deadline - EXPORT_RESERVE_S

    def left(self) -> float:
        """Seconds of the budget still unspent (negative when overrun)."""
        return self.end - self.clock()

    def used_minutes(self) -> float:
        return (self.clock() - self.start) / 60.0


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


# A head needs at least this many optimizer steps, and this many target tokens, to draft
# better than chance (the retrofit study's shortest useful runs on SmolLM2: 100+ steps over
# 10,000+ tokens); a budget that gives fewer is warned about, naming what would.
MIN_USEFUL_STEPS = 60
MIN_USEFUL_TOKENS = 5_000


def minutes_for_a_useful_head(
    setup_s: float,
    tokens_per_s: float,
    step_s: float,
    data_share: float,
    measure_share: float,
) -> float:
    """The budget, in minutes rounded up to a half, that would fit ``MIN_USEFUL_TOKENS`` of data
    after ``setup_s`` of loading, and ``MIN_USEFUL_STEPS`` steps after the data and before the
    export and measurement reserves."""
    data_s = setup_s + MIN_USEFUL_TOKENS / max(tokens_per_s, 1e-9)
    train_s = MIN_USEFUL_STEPS * STEP_OVERHEAD * step_s + EXPORT_RESERVE_S
    seconds = max(data_s / data_share, train_s / max(1.0 - data_share - measure_share, 1e-3))
    return math.ceil(seconds / 30.0) / 2.0
