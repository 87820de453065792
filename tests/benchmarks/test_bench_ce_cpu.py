"""The CPU cross-entropy benchmark end to end at its quick shape: JSON schema, scratch path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_ce_cpu
import harness

pytest.importorskip("cut_cross_entropy")


def _check_stats(stats):
    assert 0 < stats["p20"] <= stats["p50"] <= stats["p80"]


def test_quick_run_writes_json_to_scratch(monkeypatch):
    written = []
    real_write = harness.write_json

    def capture(path, payload):
        written.append(Path(path).resolve())
        real_write(path, payload)

    monkeypatch.setattr(harness, "write_json", capture)
    payload = bench_ce_cpu.main(["--quick", "--repeats", "2", "--warmup", "1"])
    assert written == [(harness.SCRATCH_DIR / "ce_cpu.json").resolve()]
    assert not written[0].is_relative_to((harness.ROOT / "docs").resolve())
    on_disk = json.loads(written[0].read_text())
    assert on_disk == json.loads(json.dumps(payload))
    assert on_disk["device"] and on_disk["versions"]["torch"]
    assert "cut-cross-entropy" in on_disk["versions"]
    config = on_disk["config"]
    assert (config["N"], config["V"], config["d"]) == tuple(bench_ce_cpu.QUICK_SHAPE.values())
    assert config["out"] is None or not Path(config["out"]).is_absolute()
    assert set(on_disk["time_s"]) == set(bench_ce_cpu.IMPLS)
    for row in on_disk["time_s"].values():
        _check_stats(row)
        assert row["n"] == 2 and len(row["per_repeat"]) == 2
    ratio = on_disk["ratios"]["chunked_vs_cce_torch_compile"]
    _check_stats(ratio)
    assert isinstance(ratio["too_wide_to_trust"], bool)
    assert ratio["per_repeat"] == pytest.approx(
        [
            a / b
            for a, b in zip(
                on_disk["time_s"]["chunked"]["per_repeat"],
                on_disk["time_s"]["cce_torch_compile"]["per_repeat"],
            )
        ]
    )
    assert set(on_disk["max_abs_error_vs_reference"]) == set(bench_ce_cpu.IMPLS)


def test_default_run_writes_to_docs():
    args = bench_ce_cpu.argparse.Namespace(quick=False)
    assert bench_ce_cpu.default_out(args) == harness.ROOT / "docs" / "benchmarks" / "ce_cpu.json"


@pytest.mark.parametrize("count", ["0", "-1", "x"])
def test_bad_repeats_is_a_usage_error(tmp_path, count):
    out = tmp_path / "ce.json"
    with pytest.raises(SystemExit) as exit_info:
        bench_ce_cpu.main(["--quick", "--repeats", count, "--out", str(out)])
    assert exit_info.value.code == 2
    assert not out.exists()
