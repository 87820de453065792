"""``cpd-mtp measure``: a retrofit's export against its original model, as a command."""

from __future__ import annotations

import json

import pytest

from cpd_mtp import cli
from cpd_mtp.training.config import load_retrofit_config
from cpd_mtp.training.retrofit import retrofit


@pytest.fixture(scope="module")
def exports(tiny_pretrained_folder, tmp_path_factory):
    """A drafter-only and a merged export of one tiny retrofit setting."""
    root = tmp_path_factory.mktemp("measure")
    found = {}
    for merged in (False, True):
        out = root / ("merged" if merged else "drafter")
        retrofit(
            load_retrofit_config(
                {
                    "model.path": str(tiny_pretrained_folder),
                    "run.out_dir": str(out),
                    "head.n_future": 3,
                    "head.rank": 2,
                    "data.tokens": 1024,
                    "data.distill": "none",
                    "data.max_files": 12,
                    "data.block_size": 32,
                    "run.steps": 3,
                    "run.progress": False,
                    "run.merged": merged,
                    "run.measure_prompts": 0,
                }
            )
        )
        found[merged] = out / "final"
    return found


@pytest.mark.parametrize("merged", [False, True])
def test_measure_reports_identical_tokens_and_the_speedups(exports, merged, tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = ["measure", "--model", str(exports[merged]), "--prompts", "1", "--repeats", "2"]
    argv += ["--max-new-tokens", "8", "--max-files", "40", "--head-only"]
    cli.main([*argv, "--out", str(out)])
    printed = capsys.readouterr()
    assert "identical tokens to the original model: yes" in printed.out
    assert "over the best zero-training alternative" in printed.out
    assert "measure code 1/1 (pass 2)" in printed.err  # a line per prompt
    result = json.loads(out.read_text())
    code = result["kinds"]["code"]
    assert result["identical"] is True and code["vs_best_zero_training"]["n"] == 2
    assert set(code["decoders"]) == {"hf", "hf_packed", "hf_lookup", "context", "cp", "default"}
    assert result["environment"]["device"]


def test_measure_refuses_a_folder_that_is_no_export(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["measure", "--model", str(tmp_path)])
    assert (
        str(exit_info.value.code) == f"error: {tmp_path} is not an export folder (no config.json)"
    )
