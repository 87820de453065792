"""What a verification forward over N fed tokens costs on this machine, measured.

A draft tree of T nodes is worth its extra accepted tokens divided by the extra time of feeding
T + 1 tokens instead of one. That time depends on the machine: on a GPU a 64-token forward costs
about what a 1-token one does; on a CPU the cost grows with N, and not smoothly (the BLAS picks
other kernels at other row counts). ``ForwardCost`` holds the measured seconds of a forward per
fed size: first from a few timed forwards (``measure``), then refined by every timed forward
of decoding (``record``). Between measured sizes it interpolates linearly.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

__all__ = ["PROBE_SIZES", "ForwardCost"]

# Fed sizes timed when a model is first decoded with an automatic tree.
PROBE_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


class ForwardCost:
    """Seconds per verification forward, by the number of tokens fed per row.

    Args:
        smoothing: weight of a new measurement in the running estimate of its size.
    """

    def __init__(self, smoothing: float = 0.2) -> None:
        self.smoothing = smoothing
        self.seconds: dict[int, float] = {}

    @property
    def measured(self) -> bool:
        return bool(self.seconds)

    def record(self, fed: int, seconds: float) -> None:
        """One forward over ``fed`` tokens per row took ``seconds``."""
        old = self.seconds.get(fed)
        if old is None:
            self.seconds[fed] = seconds
        else:  # a running estimate, so a shared, noisy machine does not pin one reading
            self.seconds[fed] = (1 - self.smoothing) * old + self.smoothing * seconds

    def measure(self, forward: Callable[[int], None], sizes: tuple[int, ...] = PROBE_SIZES) -> None:
        """Time ``forward(n)`` once per size (after one untimed warm-up) and record it."""
        forward(sizes[0])
        for size in sizes:
            start = time.perf_counter()
            forward(size)
            self.seconds[size] = time.perf_counter() - start

    def __call__(self, fed: int) -> float:
        """Estimated seconds of a forward over ``fed`` tokens (1 when nothing is measured)."""
        if not self.seconds:
            return 1.0
        sizes = sorted(self.seconds)
        if fed in self.seconds:
            return self.seconds[fed]
        if fed <= sizes[0]:
            return self.seconds[sizes[0]]
        if fed >= sizes[-1]:  # beyond the largest: grow in proportion
            return self.seconds[sizes[-1]] * fed / sizes[-1]
        i = bisect.bisect_left(sizes, fed)
        lo, hi = sizes[i - 1], sizes[i]
        weight = (fed - lo) / (hi - lo)
        return (1 - weight) * self.seconds[lo] + weight * self.seconds[hi]

    def relative(self) -> dict[int, float]:
        """Each measured size's cost against one fed token (the statistics' table)."""
        base = self(1)
        return {size: self.seconds[size] / base for size in sorted(self.seconds)}
