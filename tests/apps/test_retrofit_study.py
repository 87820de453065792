"""The retrofit study and its measurement, on a tiny stand-in for a pretrained model.

References: the plan against the full grid it must cover (each configuration once per seed, no
configuration first on average), the summaries against values computed by hand, the
measurement's ``identical`` against a model that really differs, and an end-to-end study whose
rerun must train nothing.
"""

from __future__ import annotations

import copy
import json
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cpd_mtp.apps import retrofit_study
from cpd_mtp.apps.retrofit_study import aggregate, plan, verdict
from cpd_mtp.decoding.measure import measure_retrofit, summarise_speedup


@given(
    ranks=st.lists(st.integers(1, 8), min_size=1, max_size=4, unique=True),
    distills=st.lists(st.sampled_from(["none", "generated", "kl"]), min_size=1, unique=True),
    seeds=st.lists(st.integers(0, 9), min_size=2, max_size=4, unique=True),
    conditioned=st.sampled_from([[False], [True], [False, True]]),
)
def test_the_plan_runs_every_configuration_once_per_seed_and_none_first_on_average(
    ranks, distills, seeds, conditioned
):
    order = plan(ranks, distills, seeds, conditioned)
    expected = {(s, d, r, c) for s in seeds for d in distills for r in ranks for c in conditioned}
    assert len(order) == len(expected) and set(order) == expected
    # Over an even number of seeds each configuration's mean position within its seed's
    # block is the same: a drift over the study hits every configuration alike.
    if len(seeds) % 2 == 0:
        size = len(ranks) * len(distills) * len(conditioned)
        mean_slot = {
            (d, r, c): statistics.fmean(
                order.index((s, d, r, c)) - seeds.index(s) * size for s in seeds
            )
            for d in distills
            for r in ranks
            for c in conditioned
        }
        assert len(set(mean_slot.values())) == 1


def _record(distill, rank, seed, tpf, speed=1.0, accept=(0.5, 0.2, None)):
    return {
        "name": f"r{rank}-{distill}-s{seed}",
        "distill": distill,
        "rank": rank,
        "seed": seed,
        "train_tokens_per_s": 100.0 * rank,
        "greedy": {
            "tokens_per_forward": tpf,
            "acceptance_per_position": list(accept),
            "identical": True,
            "speedup": {"median": speed},
        },
    }


def test_summaries_and_the_verdict_match_hand_computed_values():
    runs = [
        _record("none", 1, 0, 1.2),
        _record("none", 1, 1, 1.4),
        _record("none", 4, 0, 1.6, accept=(0.6, 0.3, 0.1)),
        _record("none", 4, 1, 1.8, accept=(0.8, None, 0.2)),
    ]
    rows = aggregate(runs)
    assert [(r["distill"], r["rank"]) for r in rows] == [("none", 1), ("none", 4)]
    assert rows[1]["greedy_tpf"] == pytest.approx({"mean": 1.7, "min": 1.6, "max": 1.8})
    assert rows[1]["greedy_acceptance"] == pytest.approx([0.7, 0.3, 0.15])
    assert rows[0]["greedy_acceptance"][2] is None
    result = verdict(rows)
    assert (result["best"]["rank"], result["runner_up"]["rank"]) == (4, 1)
    assert result["margin"] == pytest.approx(0.4)
    assert result["seed_half_range"] == pytest.approx(0.1)
    assert result["beyond_seed_spread"]
    assert result["rank_gain_by_distill"]["none"]["gain"] == pytest.approx(0.4)


def test_a_speedup_spread_wider_than_a_quarter_of_its_median_is_not_trusted():
    assert summarise_speedup([1.0, 1.05, 1.1, 0.95, 1.0])["trusted"]
    assert not summarise_speedup([0.5, 1.0, 1.5, 2.0, 1.0])["trusted"]


@pytest.fixture(scope="module")
def tiny_retrofit(tiny_pretrained_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_pretrained_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_pretrained_folder)
    model = CPDMTPForCausalLM.from_causal_lm(
        copy.deepcopy(original), n_future=3, rank=2, next_token="base"
    ).eval()
    prompts = [tokenizer(t, return_tensors="pt").input_ids[0] for t in ("def f(x):", "import os")]
    return model, original, prompts


def test_the_measurement_sees_identical_tokens_only_where_they_are(tiny_retrofit):
    model, original, prompts = tiny_retrofit
    result = measure_retrofit(model, original, prompts, 12, temperature=0.7)
    greedy = result["greedy"]
    assert greedy["identical"], "base mode decodes exactly the original model's greedy tokens"
    assert greedy["new_tokens"] == 24 and greedy["speedup"]["n"] == 2
    assert 1.0 <= greedy["tokens_per_forward"] <= 3.0
    assert result["sampled"]["new_tokens"] == 24
    # Another model as "original": its greedy tokens differ, and the measurement says so.
    other = copy.deepcopy(original)
    with torch.no_grad():
        other.lm_head.weight.add_(torch.randn_like(other.lm_head.weight))
    assert not measure_retrofit(model, other, prompts, 12, temperature=None)["greedy"]["identical"]


@pytest.mark.slow
def test_a_study_writes_its_results_and_a_rerun_trains_nothing(
    tiny_pretrained_folder, tmp_path, monkeypatch, capsys
):
    flags = [
        "--model", str(tiny_pretrained_folder), "--ranks", "1", "2", "--distill", "none",
        "--seeds", "0", "1", "--n-future", "3", "--tokens", "256", "--draft-vocab", "64",
        "--block-size", "32", "--max-files", "120", "--prompts", "2", "--new-tokens", "8",
        "--epochs", "1", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
        "--minutes", "0", "--conditioned", "no",
    ]  # fmt: skip
    retrofit_study.main(flags)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(run["name"] for run in results["runs"]) == [
        "r1-none-s0", "r1-none-s1", "r2-none-s0", "r2-none-s1"
    ]  # fmt: skip
    assert all(run["greedy"]["identical"] for run in results["runs"])
    assert (tmp_path / "out" / "table.md").read_text().count("| none |") == 2
    assert (tmp_path / "out" / "tokens_per_forward_vs_rank.png").stat().st_size > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a finished configuration was trained again")

    monkeypatch.setattr(retrofit_study, "train_and_measure", no_training)
    retrofit_study.main(flags)
    assert "4 configurations done" in capsys.readouterr().out


def test_a_quick_study_refuses_to_write_into_docs(tiny_pretrained_folder):
    with pytest.raises(SystemExit):
        retrofit_study.main(
            ["--quick", "--model", str(tiny_pretrained_folder), "--out", "docs/retrofit_study"]
        )


def test_heads_of_a_budgeted_study_share_one_seeds_data_and_its_minutes(
    tiny_pretrained_folder, tmp_path
):
    flags = [
        "--model", str(tiny_pretrained_folder), "--ranks", "1", "2", "--distill", "generated",
        "--seeds", "0", "--n-future", "3", "--tokens", "512", "--draft-vocab", "64",
        "--block-size", "32", "--max-files", "120", "--prompts", "2", "--new-tokens", "8",
        "--minutes", "0.1", "--conditioned", "no", "yes", "--no-plots",
        "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    retrofit_study.main(flags)
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert len(runs) == 4 and {r["conditioned"] for r in runs} == {False, True}
    first = runs[0]["data"]
    for run in runs[1:]:  # the first head made the data; every other head trained on it
        assert run["data"]["blocks"] == first["blocks"]
        assert run["data"]["seconds"] >= first["seconds"]  # charged the first head's minutes
    for run in runs:
        assert run["chain"]["greedy"]["identical"] and run["greedy"]["identical"]
        assert 0.0 <= run["first_draft"]["top1"] <= run["first_draft"]["top5"] <= 1.0
