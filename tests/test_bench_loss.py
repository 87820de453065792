"""The loss benchmark harness end to end on tiny shapes: JSON schema, ratios, plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_loss
import harness


def test_percentiles_against_sorted_list():
    stats = harness.percentiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (
        stats["p50"] == 3.0
        and stats["p20"] == pytest.approx(1.8)
        and stats["p80"] == pytest.approx(4.2)
    )


def test_quick_benchmark_writes_json_and_plot(tmp_path):
    out = tmp_path / "loss.json"
    bench_loss.main(["--cases", "32,2,2,300,16", "--repeats", "2", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["device"] and payload["versions"]["torch"]
    rows = {r["impl"]: r for r in payload["results"]}
    assert set(rows) == {"reference", "chunked"}
    for row in rows.values():
        assert "error" not in row, row
        assert 0 < row["time_s"]["p20"] <= row["time_s"]["p50"] <= row["time_s"]["p80"]
        assert row["peak_extra_bytes"] >= 0
    assert rows["reference"]["time_ratio_vs_reference"] == 1.0
    assert rows["chunked"]["time_ratio_vs_reference"] == pytest.approx(
        rows["chunked"]["time_s"]["p50"] / rows["reference"]["time_s"]["p50"]
    )
    assert out.with_suffix(".png").stat().st_size > 1000
