"""Progress for people: a tqdm bar on a terminal, plain lines in a log.

``progress(total=..., desc=..., unit=..., disable=...)`` is a drop-in for ``tqdm(...)`` with
those arguments. When the stream (stderr by default) is a terminal it *is* a tqdm bar. When it
is not (a log file, a pipe, CI), a redrawn bar would write carriage returns and ANSI codes into
the log, so it is a :class:`PlainProgress` instead: the same methods, one plain line every few
percent (5 % by default) and one at the end, e.g.::

    train: 45/300 step (15%) 12.4 s, 3.63 step/s, eta 70 s, loss=3.214, tok_s=1,930

tqdm is imported only for a terminal, so this module needs the standard library alone.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

# Without a known total, a plain line at most this often (seconds).
UNKNOWN_TOTAL_INTERVAL_S = 30.0


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PlainProgress:
    """A tqdm look-alike that prints a line every ``every`` percent of ``total``, no redraws.

    It has tqdm's ``update``, ``set_postfix``, ``set_postfix_str``, ``set_description``,
    ``write``, ``refresh``, ``close``, ``n``, ``total``, iteration over ``iterable`` and the
    context-manager protocol. A disabled one prints nothing at all (``write`` still prints).
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        total: float | None = None,
        desc: str | None = None,
        unit: str = "it",
        disable: bool = False,
        initial: float = 0,
        every: float = 5.0,
        file: IO[str] | None = None,
    ) -> None:
        if not every > 0:
            raise ValueError(f"every must be > 0 (percent), got {every!r}")
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable = iterable
        self.total = total
        self.desc = desc or ""
        self.unit = unit
        self.disable = disable
        self.n = initial
        self.every = every
        self.file = file
        self.postfix = ""
        self._initial = initial
        self._start = self._last_time = time.monotonic()
        self._printed_n: float | None = None
        self._bucket = self._bucket_of(initial)
        self._closed = False

    # ------------------------------------------------------------------ tqdm's interface
    def update(self, n: float = 1) -> None:
        """Advance by ``n``; print a line when a new multiple of ``every`` percent is reached."""
        self.n += n
        if self.disable:
            return
        bucket = self._bucket_of(self.n)
        if self.total:
            if bucket > self._bucket:
                self._bucket = bucket
                self._print_line()
        elif time.monotonic() - self._last_time >= UNKNOWN_TOTAL_INTERVAL_S:
            self._print_line()

    def set_postfix(
        self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any
    ) -> None:
        """Shown at the end of the next line, ``key=value`` separated by commas (like tqdm)."""
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={_format_value(v)}" for k, v in values.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """Nothing to redraw: lines are printed as the count crosses a mark."""

    def write(self, s: str, file: IO[str] | None = None, end: str = "\n") -> None:
        """A message of its own line (tqdm's ``bar.write``); printed even when disabled."""
        stream = file or self._stream()
        stream.write(s + end)
        stream.flush()

    def close(self) -> None:
        """The last line (unless the last mark already showed this count); idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.disable and self._printed_n != self.n and self.n != self._initial:
            self._print_line()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress object wraps no iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    # ------------------------------------------------------------------ the line
    def _stream(self) -> IO[str]:
        return self.file if self.file is not None else sys.stderr

    def _bucket_of(self, n: float) -> int:
        if not self.total:
            return 0
        return math.floor(100.0 * n / self.total / self.every + 1e-9)

    def format_line(self) -> str:
        """``desc: n/total unit (pct%) elapsed, rate, eta, postfix`` as plain ASCII text."""
        elapsed = time.monotonic() - self._start
        done = self.n - self._initial
        count = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        parts = [f"{count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        stats = [_format_seconds(elapsed)]
        if elapsed > 0 and done > 0:
            rate = done / elapsed
            stats.append(f"{rate:.3g} {self.unit}/s")
            if self.total and self.n < self.total:
                stats.append(f"eta {_format_seconds((self.total - self.n) / rate)}")
        tail = ", ".join(stats + ([self.postfix] if self.postfix else []))
        head = f"{self.desc}: " if self.desc else ""
        return f"{head}{parts[0]} {tail}"

    def _print_line(self) -> None:
        self._printed_n = self.n
        self._last_time = time.monotonic()
        stream = self._stream()
        stream.write(self.format_line() + "\n")
        stream.flush()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str | None = None,
    unit: str = "it",
    disable: bool = False,
    initial: float = 0,
    every: float = 5.0,
    file: IO[str] | None = None,
    **tqdm_kwargs: Any,
) -> Any:
    """A tqdm bar when ``file`` (stderr by default) is a terminal, else a :class:`PlainProgress`.

    Args:
        iterable: optional, iterated over like ``tqdm(iterable)``.
        total: as tqdm's: the count at 100 %.
        desc: as tqdm's: the label.
        unit: as tqdm's: what is counted.
        disable: as tqdm's: show nothing.
        initial: as tqdm's: the count to start from.
        every: the plain form prints a line each time this many more percent are done.
        file: the stream written to (tqdm's ``file``); None is ``sys.stderr``.
        tqdm_kwargs: passed to tqdm on a terminal (``leave``, ``dynamic_ncols``, ...).
    """
    stream = file if file is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not disable and isatty is not None and isatty():
        from tqdm import tqdm

        tqdm_kwargs.setdefault("dynamic_ncols", True)
        return tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            file=stream,
            **tqdm_kwargs,
        )
    return PlainProgress(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        initial=initial,
        every=every,
        file=file,
    )
