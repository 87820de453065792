"""The retrofit study (``cpd_mtp.apps.retrofit_study``): configurations at equal minutes, a
rerun that trains nothing, the table shows the trusted flags, and the arguments are checked."""

from __future__ import annotations

import json

import pytest

from cpd_mtp.apps import retrofit_study


def fake_run(name: str, minutes: float, median: float, trusted: bool) -> dict:
    speed = {"median": median, "p20": median - 0.1, "p80": median + 0.1, "n": 4, "trusted": trusted}
    decoders = {
        n: {"tokens_per_forward": t} for n, t in (("default", 2.0), ("context", 1.5), ("cp", 1.2))
    }
    summary = {"decoders": decoders, "vs_best_zero_training": speed}
    return {"name": name, "minutes": minutes, "seed": 0, "target_tokens": 1000, "steps": 50,
            "kinds": {"chat": summary, "code": summary}}  # fmt: skip


def test_the_table_shows_every_run_and_its_trusted_flag(tmp_path):
    runs = [fake_run("default", 3, 1.2, True), fake_run("default", 6, 1.4, False)]
    text = retrofit_study.table(runs)
    assert text.count("\n") == 4 and "2.00 / 1.50 / 1.20" in text
    assert "1.20x [1.10, 1.30] |" in text and "1.40x [1.30, 1.50] (untrusted)" in text
    retrofit_study.plot(runs, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--configs", "nope"], "--configs: unknown"),
        (["--minutes", "0"], "every budget must be > 0"),
        (["--quick", "--out", "docs/x"], "never writes into docs"),
        (["novalue"], "is not key=value"),
        (["data.nope=1"], "data.nope"),
    ],
)
def test_bad_arguments_are_one_line_errors(tiny_pretrained_folder, flags, message, capsys):
    with pytest.raises(SystemExit):
        retrofit_study.main(["--model", str(tiny_pretrained_folder), *flags])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_heads_share_their_data_and_minutes_and_a_rerun_trains_nothing(
    tiny_pretrained_folder, tmp_path, monkeypatch, capsys
):
    flags = [
        "--model", str(tiny_pretrained_folder), "--configs", "default,rank1", "--minutes", "0.4",
        "--prompts", "1", "--new-tokens", "6", "--repeats", "1", "--no-progress",
        "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
        "data.max_files=60", "data.tokens=800", "head.draft_vocab_size=64", "head.n_future=3",
        "data.block_size=32", "data.new_tokens=24",
    ]  # fmt: skip
    retrofit_study.main(flags)
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["default", "rank1"]
    first, second = runs[0]["data"], runs[1]["data"]
    assert second["examples"] == first["examples"]  # the second head trained on the first's data
    assert second["seconds"] >= 0 and runs[1]["examples"] == runs[0]["examples"]
    for run in runs:
        for summary in run["kinds"].values():
            assert all(d["identical"] for d in summary["decoders"].values())
    assert (tmp_path / "out" / "table.md").read_text().count("| default |") == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(retrofit_study, "one_run", no_training)
    retrofit_study.main(flags)
    assert "2 runs done already" in capsys.readouterr().out
