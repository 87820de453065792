"""The loss benchmark harness end to end on tiny shapes: JSON schema, ratios, plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
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
    # the recorded output path is not this machine's absolute path
    assert payload["config"]["out"] == f"{tmp_path.name}/loss.json"


class _Stop(Exception):
    pass


def test_quick_and_custom_runs_do_not_write_to_docs(monkeypatch):
    """Without --out, only the default sweep writes docs/benchmarks/loss.json."""
    written = []

    def fake_worker(script, case):
        return {
            **case,
            "time_s": {"p20": 1.0, "p50": 1.0, "p80": 1.0, "n": 1},
            "peak_extra_bytes": 1,
        }

    def capture(path, payload):
        written.append(Path(path).resolve())
        raise _Stop

    monkeypatch.setattr(harness, "run_worker", fake_worker)
    monkeypatch.setattr(harness, "write_json", capture)
    for argv in (["--quick"], ["--cases", "8,2,2,30,4"]):
        with pytest.raises(_Stop):
            bench_loss.main(argv)
    docs = (harness.ROOT / "docs").resolve()
    assert len(written) == 2
    for path in written:
        assert not path.is_relative_to(docs) and path.is_relative_to(harness.SCRATCH_DIR)
    assert bench_loss.default_out(bench_loss.argparse.Namespace(quick=False, cases=None)) == (
        harness.ROOT / "docs" / "benchmarks" / "loss.json"
    )


@pytest.mark.parametrize("count", ["0", "-3", "x"])
def test_bad_repeats_is_a_usage_error(tmp_path, capsys, count):
    out = tmp_path / "loss.json"
    with pytest.raises(SystemExit) as exit_info:
        bench_loss.main(["--quick", "--repeats", count, "--out", str(out)])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--repeats" in errors[0]
    assert not out.exists()


def test_portable_path_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    root = harness.ROOT
    monkeypatch.chdir(root)  # where the Makefile runs the benchmarks
    assert harness.portable_path(root / "docs" / "benchmarks" / "loss.json") == (
        "docs/benchmarks/loss.json"
    )
    assert harness.portable_path(Path("runs/demo/final")) == "runs/demo/final"
    assert harness.portable_path(tmp_path / "demo3" / "final") == "demo3/final"
    assert harness.portable_path(None) is None
    monkeypatch.chdir(tmp_path)
    assert harness.portable_path(tmp_path / "demo3" / "final") == "demo3/final"
    assert harness.portable_path(root / "docs" / "benchmarks" / "loss.json") == (
        "benchmarks/loss.json"
    )


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def test_published_results_hold_no_absolute_paths():
    files = sorted((harness.ROOT / "docs").glob("*/*.json"))
    assert any(f.parent.name == "benchmarks" for f in files)
    for path in files:
        for text in _strings(json.loads(path.read_text())):
            assert not Path(text).is_absolute(), (path.name, text)
