"""The decoding benchmark end to end on a tiny random model: JSON schema, ratios, plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_decode


def test_quick_benchmark_writes_json_and_plot(tmp_path):
    out = tmp_path / "decode.json"
    bench_decode.main(
        [
            "--quick",
            "--repeats",
            "2",
            "--max-new-tokens",
            "6",
            "--num-prompts",
            "3",
            "--batch-sizes",
            "1",
            "2",
            "--out",
            str(out),
        ]
    )
    payload = json.loads(out.read_text())
    assert (
        payload["device"] and payload["versions"]["torch"] and payload["versions"]["transformers"]
    )
    assert payload["model"]["n_future"] == 4 and payload["model"]["prompts"] == 3
    cases = {(r["mode"], r["batch"]) for r in payload["results"]}
    assert cases == {("greedy", 1), ("greedy", 2), ("sample", 1), ("sample", 2)}
    for row in payload["results"]:
        for decoder in ("spec", "ar"):
            t = row[decoder]["time_s"]
            assert 0 < t["p20"] <= t["p50"] <= t["p80"] and t["n"] == 2
        assert row["speedup"] == pytest.approx(
            row["ar"]["time_s"]["p50"] / row["spec"]["time_s"]["p50"]
        )
        spec = row["spec"]
        if row["mode"] == "greedy":
            assert spec["new_tokens"] == 3 * 6 == row["ar"]["new_tokens"]
        else:  # independent draws: either decoder may sample the random model's EOS
            assert 0 < spec["new_tokens"] <= 3 * 6 and 0 < row["ar"]["new_tokens"] <= 3 * 6
        assert 1.0 <= spec["tokens_per_forward"]["p50"] <= 4.0
        assert len(spec["acceptance_rate"]) == 3
        for acc, prop, rate in zip(
            spec["accepted_counts"], spec["proposed_counts"], spec["acceptance_rate"]
        ):
            assert 0 <= acc <= prop
            assert rate is None if prop == 0 else rate == pytest.approx(acc / prop)
        if row["mode"] == "greedy":
            assert row["identical_to_autoregressive"] is True
    assert out.with_suffix(".png").stat().st_size > 1000
    # the recorded output path is not this machine's absolute path
    assert payload["config"]["out"] == f"{tmp_path.name}/decode.json"


def test_prompts_file_blocks_and_lines(tmp_path):
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("def f(x):\n    return x\n\n\nclass A:\n    pass\n")
    assert bench_decode.read_prompts_file(blocks) == [
        "def f(x):\n    return x",
        "class A:\n    pass",
    ]
    lines = tmp_path / "lines.txt"
    lines.write_text("import os\nimport sys\n")
    assert bench_decode.read_prompts_file(lines) == ["import os", "import sys"]


class _Stop(Exception):
    pass


def test_quick_run_does_not_write_to_docs(monkeypatch):
    """Without --out, --quick writes under the git-ignored scratch dir, never docs/."""
    import harness

    seen = []

    def stop(args):
        seen.append(Path(args.out).resolve())
        raise _Stop

    monkeypatch.setattr(bench_decode, "load_inputs", stop)
    with pytest.raises(_Stop):
        bench_decode.main(["--quick"])
    (out,) = seen
    assert not out.is_relative_to((harness.ROOT / "docs").resolve())
    assert out.is_relative_to(harness.SCRATCH_DIR)


@pytest.mark.parametrize(
    "flag",
    [
        "--num-prompts",
        "--prompt-tokens",
        "--max-new-tokens",
        "--batch-sizes",
        "--repeats",
        "--threads",
    ],
)
@pytest.mark.parametrize("count", ["0", "-1"])
def test_bad_counts_are_usage_errors(tmp_path, monkeypatch, capsys, flag, count):
    monkeypatch.setattr(bench_decode, "load_inputs", lambda args: pytest.fail("ran"))
    out = tmp_path / "decode.json"
    with pytest.raises(SystemExit) as exit_info:
        bench_decode.main(["--quick", flag, count, "--out", str(out)])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and flag in errors[0]
    assert not out.exists()
