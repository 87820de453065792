"""``cpd-mtp retrofit --minutes M``: a wall-clock budget sizes the data and the steps.

The budget's arithmetic is checked against its definition; the runs use the tiny random Llama
of ``test_retrofit.py``. The clock-dependent decisions (how many blocks, how many steps fit)
are replaced by fixed answers where a test needs them, so each check is exact: the plan is
stored with every checkpoint, and a resumed run trains on the checkpoint's plan, whatever
the clock says then, to the same weights as a straight run.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_retrofit import assert_same_run, config, metrics

from cpd_mtp.training import retrofit as retrofit_module
from cpd_mtp.training.budget import (
    STEP_OVERHEAD,
    blocks_that_fit,
    seconds_per_call,
    steps_that_fit,
)
from cpd_mtp.training.checkpoint import read_record, resume_tag
from cpd_mtp.training.config import check_retrofit_config, load_retrofit_config
from cpd_mtp.training.retrofit import RetrofitTrainer, retrofit


@given(
    seconds=st.floats(0.0, 1e4),
    step=st.floats(1e-3, 100.0),
    reserve=st.floats(0.0, 100.0),
)
def test_the_steps_that_fit_are_the_most_that_fit(seconds, step, reserve):
    steps = steps_that_fit(seconds, step, reserve)
    assert steps >= 1
    if steps > 1:  # the budget holds them, and not one more
        assert steps * STEP_OVERHEAD * step + reserve <= seconds * (1 + 1e-9)
    assert (steps + 1) * STEP_OVERHEAD * step + reserve > seconds


@given(
    typical=st.floats(1e-3, 10.0),
    warmup_slowdown=st.lists(st.floats(1.0, 100.0), min_size=2, max_size=2),
    timed_slowdown=st.lists(st.floats(1.0, 10.0), min_size=2, max_size=2),
)
def test_a_step_is_timed_by_its_typical_call_not_its_slow_first_ones(
    typical, warmup_slowdown, timed_slowdown
):
    """As the budget calls it (the defaults): after the warm-up calls, two slow timed calls
    (the machine waking up after other work) leave the answer at the typical call's time; the
    old mean over the first calls after one warm-up would not."""
    slow = [typical * factor for factor in warmup_slowdown + timed_slowdown]
    durations = slow + [typical] * 3
    clock = {"now": 0.0}
    calls = iter(durations)

    def work() -> None:
        clock["now"] += next(calls)

    seconds = seconds_per_call(work, clock=lambda: clock["now"])
    assert seconds == pytest.approx(typical)
    assert next(calls, None) is None  # every call made: two warm-ups, then five timed ones


@given(seconds=st.floats(0.0, 1e4), per_block=st.floats(1e-4, 10.0), most=st.integers(1, 10**6))
def test_the_blocks_that_fit(seconds, per_block, most):
    count = blocks_that_fit(seconds, per_block, most)
    assert 1 <= count <= most
    if count > 1:  # they fit in the time, and (below the cap) one more would not
        assert count * per_block <= seconds * (1 + 1e-9)
    if count < most:
        assert (count + 1) * per_block > seconds


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"run.minutes": 0.0}, "run.minutes (--minutes) must be a finite number > 0"),
        ({"run.minutes": 2.0, "run.steps": 10}, "run.steps (--steps) and run.minutes"),
        ({"run.minutes": 2.0, "run.data_share": 1.0}, "run.data_share must lie in (0, 1)"),
    ],
)
def test_a_bad_budget_is_refused_in_one_line(settings, message):
    cfg = load_retrofit_config({"model.path": "m", "run.out_dir": "o", **settings})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_retrofit_config(cfg)


def _budget_config(model, out, **overrides):
    return config(
        model, out, run__minutes=5.0, run__steps=None, data__distill="kl", run__save_every=3,
        run__eval_every=3, **overrides,
    )  # fmt: skip


def _fix_the_clock(monkeypatch, blocks: int, steps: int) -> None:
    """What fits in the budget, fixed: ``blocks`` training blocks and ``steps`` steps."""
    monkeypatch.setattr(retrofit_module, "blocks_that_fit", lambda *a: blocks)
    monkeypatch.setattr(retrofit_module, "steps_that_fit", lambda *a: steps)


def test_a_resume_trains_on_the_checkpoints_plan_whatever_the_clock_says(
    tiny_pretrained_folder, tmp_path, monkeypatch
):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    with monkeypatch.context() as patch:
        _fix_the_clock(patch, blocks=5, steps=6)
        trainer = RetrofitTrainer(_budget_config(tiny_pretrained_folder, straight))
        try:
            assert len(trainer.train_data) == 5 and trainer.resolved.run.steps == 6
            trainer.train()
        finally:
            trainer.close()
        retrofit(_budget_config(tiny_pretrained_folder, killed), stop_after=3)
    record = read_record(straight / "checkpoints", resume_tag(straight / "checkpoints"))
    assert record["budget"] == {"examples": 5, "steps": 6}
    with monkeypatch.context() as patch:
        _fix_the_clock(patch, blocks=9, steps=20)  # a different clock: ignored on resume
        retrofit(_budget_config(tiny_pretrained_folder, killed, run__resume=True))
    assert_same_run(straight, killed, steps=6)


def test_a_budget_spent_before_any_data_is_a_one_line_error(tiny_pretrained_folder, tmp_path):
    from cpd_mtp.cli import main

    argv = ["retrofit", "--model", str(tiny_pretrained_folder), "--out", str(tmp_path / "run")]
    argv += ["--minutes", "0.00001", "--max-files", "12", "--block-size", "32", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    text = str(exit_info.value.code)
    assert "is spent before any data is made" in text and "give at least" in text
    assert "\n" not in text


class FastClock:
    """A clock that runs ``speed`` times faster than real time: the budget's decisions (data,
    steps, the training deadline, the measurement) all read it."""

    def __init__(self, speed: float) -> None:
        self.speed, self.start = speed, time.monotonic()

    def __call__(self) -> float:
        return self.start + self.speed * (time.monotonic() - self.start)


@pytest.mark.slow
def test_minutes_bound_the_whole_command_on_a_clock_we_control(tiny_pretrained_folder, tmp_path):
    """With a clock 20x faster than real time, a 3-minute budget (9 real seconds): the data
    stops at its share, training stops at its deadline although far more steps were planned
    than fit, and the export and the measurement end within 10 % of the budget."""
    clock = FastClock(20.0)
    cfg = config(
        tiny_pretrained_folder, tmp_path / "run", run__minutes=3.0, run__steps=None,
        data__distill="generated", data__new_tokens=24, data__prompt_tokens=8,
        data__tokens=10**6, run__merged=False, run__measure_prompts=1, run__measure_tokens=8,
        run__eval_every=10**6, run__save_every=10**6, data__val_fraction=0.25,
    )  # fmt: skip
    trainer = RetrofitTrainer(cfg, clock=clock)
    try:
        data_end = trainer.budget.data_deadline
        assert trainer.train_data.examples.cut or clock() >= data_end - 5
        trainer.train()
    finally:
        trainer.close()
    assert trainer.used_minutes <= 1.1 * cfg.run.minutes
    records = metrics(tmp_path / "run")
    assert records[-1]["step"] == trainer.step  # stopped where the deadline fell, exported there
    assert (tmp_path / "run" / "final").is_dir() and trainer.measurement is not None
