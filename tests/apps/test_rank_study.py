"""The rank study harness on a tiny budget: one short configuration end to end, schema, plots."""

from __future__ import annotations

import json
import math

import pytest

from cpd_mtp.apps import rank_study


def fake_run(name, seed, joint, tpf, rank, n_future=4):
    weights = {f"expert_usage/{a}": 1.0 / rank for a in range(rank)}
    heads = {f"head_nll/{s}": joint + s for s in range(1, n_future + 1)}
    acceptance = [0.5] * (n_future - 1)
    decode = {"tokens_per_forward": tpf, "acceptance": acceptance, "speedup": 1.5}
    return {
        "name": name,
        "seed": seed,
        "step_time_s": 0.2 * (1 + seed),
        "val": {
            "joint_nll_per_target": joint,
            "next_token_nll": joint - 0.1,
            "gate_entropy": 0.5,
            **weights,
            **heads,
        },
        "decode": {"greedy": decode, "sample": decode},
    }


def test_aggregate_mean_and_spread_by_hand():
    runs = [
        fake_run("ntp", 0, 3.0, 1.0, 1, 1),
        fake_run("n4_r4", 0, 2.0, 2.0, 4),
        fake_run("n4_r4", 1, 2.5, 3.0, 4),
    ]
    rows = {r["name"]: r for r in rank_study.aggregate(runs)}
    row = rows["n4_r4"]
    assert row["seeds"] == 2
    assert row["joint_nll_per_target"]["mean"] == pytest.approx(2.25)
    assert row["joint_nll_per_target"]["std"] == pytest.approx(math.sqrt(0.125))  # sample std
    assert row["greedy_tokens_per_forward"]["mean"] == pytest.approx(2.5)
    assert row["usage_entropy"]["mean"] == pytest.approx(math.log(4))  # uniform usage
    # step time vs ntp: (0.2/0.2 + 0.4/0.2) / 2
    assert row["step_time_vs_ntp"]["mean"] == pytest.approx(1.5)
    assert len(row["greedy_acceptance"]) == 3 and len(rows["ntp"]["greedy_acceptance"]) == 0


def test_finetune_runs_reuse_the_frozen_trunk_of_ntp(tmp_path):
    spec = next(s for s in rank_study.PLAN if s.name == "ft_r8")
    overrides = rank_study.train_overrides(spec, 2, rank_study.SIZES["tiny"], tmp_path)
    base = rank_study.run_dir(tmp_path, rank_study.PLAN[0], 2) / "final"
    assert f"trunk.init_from={base}" in overrides and "trunk.freeze_trunk=true" in overrides
    assert "head.rank=8" in overrides and "run.seed=2" in overrides


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    payload = rank_study.run_study(
        "tiny", tmp_path, tmp_path / "runs", seeds=1, only=["n4_r2"], log=lambda *_: None
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["device"] and saved["versions"]["torch"] and saved["size"] == "tiny"
    assert [r["name"] for r in saved["summary"]] == ["ntp", "n4_r2"]
    for run in saved["runs"]:
        assert math.isfinite(run["val"]["joint_nll_per_target"]) and run["step_time_s"] > 0
        greedy = run["decode"]["greedy"]
        assert greedy["tokens_per_forward"] >= 1.0 and greedy["speedup"] > 0
    ntp, r2 = saved["runs"]
    assert ntp["decode"]["greedy"]["tokens_per_forward"] == 1.0  # n = 1 drafts nothing
    assert len(r2["decode"]["greedy"]["acceptance"]) == 3
    assert "| n4_r2 | 4 | 2 | switch |" in (tmp_path / "table.md").read_text()
    for name in ("joint_nll_vs_rank", "tokens_per_forward_vs_rank", "acceptance_by_position"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert payload["wall_time_s"] > 0


def _no_training(*args, **kwargs):
    raise AssertionError("a bad call must not train")


@pytest.mark.parametrize("seeds", ["-1", "0", "two"])
def test_bad_seed_counts_are_usage_errors_and_keep_published_results(
    tmp_path, monkeypatch, capsys, seeds
):
    out = tmp_path / "study"
    out.mkdir()
    published = out / "results.json"
    published.write_text('{"published": true}\n')
    monkeypatch.setattr(rank_study, "train_one", _no_training)
    with pytest.raises(SystemExit) as exit_info:
        rank_study.main(
            [
                "--size",
                "tiny",
                "--seeds",
                seeds,
                "--out",
                str(out),
                "--runs",
                str(tmp_path / "runs"),
            ]
        )
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--seeds" in errors[0]
    assert published.read_text() == '{"published": true}\n'
    assert [p.name for p in out.iterdir()] == ["results.json"]


@pytest.mark.parametrize("seeds", [-1, 0])
def test_run_study_rejects_bad_seeds_before_writing(tmp_path, monkeypatch, seeds):
    monkeypatch.setattr(rank_study, "train_one", _no_training)
    with pytest.raises(ValueError, match="seeds"):
        rank_study.run_study("tiny", tmp_path / "study", tmp_path / "runs", seeds=seeds)
    assert not (tmp_path / "study").exists()


def test_a_study_with_no_runs_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "study"
    out.mkdir()
    (out / "results.json").write_text("published\n")
    monkeypatch.setattr(rank_study, "PLAN", [])
    with pytest.raises(RuntimeError, match="no runs"):
        rank_study.run_study("tiny", out, tmp_path / "runs", seeds=1, log=lambda *_: None)
    assert (out / "results.json").read_text() == "published\n"
    assert [p.name for p in out.iterdir()] == ["results.json"]
