"""Progress for people: plain lines every few percent in a log, a tqdm bar on a terminal."""

from __future__ import annotations

import io
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tqdm import tqdm

from cpd_mtp.utils.progress import PlainProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text  # no redraws, no ANSI codes
    return text.splitlines()


def test_a_log_gets_a_plain_line_every_five_percent_and_at_the_end():
    log = io.StringIO()
    with progress(total=200, desc="train", unit="step", file=log) as bar:
        for step in range(200):
            bar.set_postfix(loss=f"{1 / (step + 1):.3f}", tok_s="1,930")  # shown by this update
            bar.update(1)
    out = lines(log)
    assert len(out) == 20  # 5 %, 10 %, ..., 100 %: the close adds nothing new
    assert [line.split()[1] for line in out] == [f"{10 * k}/200" for k in range(1, 21)]
    assert out[0].startswith("train: 10/200 step (5%)") and "loss=0.100, tok_s=1,930" in out[0]
    assert "eta" not in out[-1] and "(100%)" in out[-1]


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(1, 500),
    initial=st.integers(0, 50),
    steps=st.lists(st.integers(1, 40), max_size=60),
    every=st.sampled_from([1.0, 5.0, 12.5, 50.0]),
)
def test_lines_are_exactly_the_crossed_marks_plus_the_end(total, initial, steps, every):
    # The reference: walk the counts and note each new multiple of `every` percent reached.
    log = io.StringIO()
    bar = progress(total=total, initial=initial, every=every, unit="b", file=log)
    n, marks, want = initial, math.floor(100 * initial / total / every + 1e-9), []
    for k in steps:
        bar.update(k)
        n += k
        if math.floor(100 * n / total / every + 1e-9) > marks:
            marks = math.floor(100 * n / total / every + 1e-9)
            want.append(n)
    bar.close()
    if n != initial and (not want or want[-1] != n):
        want.append(n)  # the end, unless the last mark already showed it
    assert [int(line.split()[0].split("/")[0]) for line in lines(log)] == want


def test_disabled_prints_nothing_but_write_still_writes():
    log = io.StringIO()
    bar = progress(total=10, disable=True, file=log)
    bar.update(10)
    bar.close()
    assert log.getvalue() == ""
    bar.write("step 10: val 1.0")
    assert lines(log) == ["step 10: val 1.0"]


def test_iterating_and_an_unknown_total():
    log = io.StringIO()
    assert list(progress(range(40), desc="rank 4", file=log)) == list(range(40))
    out = lines(log)
    assert len(out) == 20 and out[-1].startswith("rank 4: 40/40 it (100%)")
    log = io.StringIO()
    with progress(desc="blocks", unit="block", file=log) as bar:
        bar.update(7)
    assert lines(log)[-1].startswith("blocks: 7 block ")  # no total: one line at the end


def test_a_terminal_gets_a_tqdm_bar():
    term = Terminal()
    bar = progress(total=5, desc="train", unit="step", file=term, leave=True)
    assert isinstance(bar, tqdm)
    bar.update(5)
    bar.close()
    assert "train" in term.getvalue() and "5/5" in term.getvalue()
    assert isinstance(progress(total=5, file=io.StringIO()), PlainProgress)


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="every must be > 0"):
        progress(total=5, every=0, file=io.StringIO())
