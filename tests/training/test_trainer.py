"""DeepSpeed training: multi-process equals single-process, resume equals straight, bad configs.

Runs go through real launchers (``python -m cpd_mtp.training.trainer``, ``torchrun``) in subprocesses on
the ``tiny`` preset (a 2-layer trunk on a few stdlib files).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from cpd_mtp.head import shift_targets
from cpd_mtp.metrics import usage_collapse, usage_entropy
from cpd_mtp.training import checkpoint
from cpd_mtp.training import engine as engine_module
from cpd_mtp.training import trainer as train_module
from cpd_mtp.training.config import config_to_dict, load_train_config
from cpd_mtp.training.trainer import (
    OutDirError,
    ResumeMismatchError,
    Trainer,
    check_config,
    deepspeed_config,
    json_line,
    lock_out_dir,
    main,
    micro_batch_indices,
    silence_dependency_noise,
    use_project_ops_dir,
)

ROOT = Path(__file__).resolve().parents[2]


def run_env() -> dict[str, str]:
    # An in-process run earlier in this session sets these; a child must pick its own.
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    return env


def launch(out_dir: Path, *overrides: str, nproc: int = 1, wait: bool = True):
    module = [
        "-m",
        "cpd_mtp.training.trainer",
        "--preset",
        "tiny",
        f"run.out_dir={out_dir}",
        *overrides,
    ]
    env = run_env()
    if nproc > 1:  # the launch script CI and users run on CPU
        env.update(
            NPROC=str(nproc), PYTHON=sys.executable, MASTER_PORT=str(29500 + os.getpid() % 1000)
        )
        cmd = ["bash", str(ROOT / "scripts" / "train_cpu.sh"), *module[2:]]
    else:
        cmd = [sys.executable, *module]
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return output


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "final" / "model.safetensors")


def test_data_order_is_the_same_global_batch_for_any_split():
    def global_batch(world, micro, accum, step):
        return sorted(
            int(i)
            for m in range(accum)
            for rank in range(world)
            for i in micro_batch_indices(step, m, rank, world, micro, accum, 37, seed=3)
        )

    for step in range(6):
        want = global_batch(1, 8, 1, step)
        assert global_batch(2, 4, 1, step) == want
        assert global_batch(2, 2, 2, step) == want
        assert global_batch(1, 2, 4, step) == want
    # Every epoch is a permutation of the blocks: 37 consecutive draws cover each block once.
    draws = np.concatenate([micro_batch_indices(s, 0, 0, 1, 1, 1, 37, seed=3) for s in range(74)])
    assert sorted(draws[:37]) == list(range(37)) and sorted(draws[37:]) == list(range(37))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_match_a_single_process(tmp_path, stage):
    single = tmp_path / "single"
    multi = tmp_path / f"zero{stage}"
    launch(single, "run.zero_stage=0", "run.micro_batch_size=4", "run.steps=4", "run.export=false")
    launch(
        multi,
        f"run.zero_stage={stage}",
        "run.micro_batch_size=2",
        "run.steps=4",
        "run.export=false",
        nproc=2,
    )
    a, b = metrics(single), metrics(multi)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "joint_nll", "next_token_nll", "val/joint_nll"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), (key, ra, rb)
    assert a[-1]["loss"] < a[0]["loss"]  # it trained


@pytest.mark.slow
def test_resume_after_a_kill_equals_a_straight_run(tmp_path):
    steps = ["run.steps=6", "run.save_every=2", "run.eval_every=3"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    launch(straight, *steps)
    proc = launch(killed, *steps, "run.export=false", wait=False)
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    # Kill at the first sealed checkpoint seen (2, or 4 on a busy machine), or stop waiting
    # as soon as the run has ended on its own.
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and pointer.read_text().strip() in ("step00000002", "step00000004"):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert pointer.read_text() in ("step00000002", "step00000004")
    resumed_from = int(pointer.read_text()[4:])
    assert resumed_from < 6, "the run finished before it was killed: nothing was tested"
    output = launch(killed, *steps, "run.resume=true")
    assert f"resumed from step {resumed_from} of 6 (checkpoint {killed / 'checkpoints'}" in output
    assert "re-shaped" not in output  # the same schedule: nothing to warn about
    a, b = metrics(straight), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-6), (ra, rb)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-9)
    wa, wb = final_weights(straight), final_weights(killed)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.slow
def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    launch(out, "run.steps=2", "run.save_every=2", "run.export=false")
    state = out / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    proc = launch(out, "run.steps=4", "run.resume=true", wait=False)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1  # a failure while running, not a usage error
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("cpd-mtp train: error: ")
    assert "is corrupt: mp_rank_00_model_states.pt does not match its record" in errors[0]
    assert "Traceback" not in output


def test_short_run_on_the_embedded_corpus_lowers_validation_nll(tmp_path):
    from cpd_mtp.training.trainer import Trainer

    cfg = load_train_config(
        "tiny",
        [f"run.out_dir={tmp_path}", "run.steps=12", "run.eval_every=12", "run.save_every=12"],
    )
    trainer = Trainer(cfg)
    before = trainer.evaluate()
    after = trainer.train()
    assert after["val/joint_nll"] < before["val/joint_nll"] - 0.5
    assert after["val/next_token_nll"] < before["val/next_token_nll"]
    assert sum(after[f"val/expert_usage/{a}"] for a in range(2)) == pytest.approx(1.0, abs=1e-4)
    exported = tmp_path / "final"
    assert (exported / "model.safetensors").is_file() and (exported / "tokenizer.json").is_file()


def test_deepspeed_config_from_the_run_config():
    cfg = load_train_config("tiny", ["run.zero_stage=3", "run.grad_accum=3", "optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.run.steps
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["run.dtype=fp16"], ValueError, "fp16 is not supported by DeepSpeed on CPU"),
        (["run.dtype=fp8"], ValueError, "run.dtype must be one of"),
        (["run.zero_stage=4"], ValueError, "run.zero_stage must be 0, 1, 2 or 3"),
        (["data.source=/no/such/corpus"], FileNotFoundError, "does not exist"),
        (["trunk.init_from=/no/such/model"], FileNotFoundError, "is not a directory"),
        # Runs that would silently learn or measure nothing:
        (["data.block_size=1"], ValueError, "data.block_size must be >= 2"),
        (["run.eval_batches=0"], ValueError, "run.eval_batches must be >= 1"),
        (["head.n_future=32"], ValueError, "head.n_future=32 must be < data.block_size=32"),
        (["run.resume=true", "run.overwrite=true"], ValueError, "exclude each other"),
        (["head.rank=0"], ValueError, "head.rank must be an integer >= 1"),
        (["head.expert_inner_size=0"], ValueError, "head.expert_inner_size must be >= 1"),
        (["head.draft_vocab_size=100"], ValueError, "head.draft_vocab_size < vocab_size needs"),
        # Every other section, too:
        (["optim.lr=0"], ValueError, "optim.lr must be a finite number > 0"),
        (["optim.betas=[0.9]"], ValueError, r"optim.betas must be two numbers in \[0, 1\)"),
        (["optim.min_lr_ratio=1.5"], ValueError, "optim.min_lr_ratio must be in"),
        (["optim.warmup_steps=-1"], ValueError, "optim.warmup_steps must be >= 0"),
        (["trunk.num_kv_heads=3"], ValueError, "trunk.num_heads=2 must be divisible by"),
        (["trunk.hidden_size=33"], ValueError, "trunk.hidden_size=33 must be divisible"),
        (["data.block_size=128"], ValueError, "exceeds trunk.max_position_embeddings=64"),
        (["data.val_fraction=0"], ValueError, r"data.val_fraction must be in \(0, 1\)"),
        (["data.vocab_size=100"], ValueError, "data.vocab_size must be >= 258"),
        (["data.tokenizer=/no/such/tok"], FileNotFoundError, "data.tokenizer='/no/such/tok'"),
        (["run.keep_checkpoints=0"], ValueError, "run.keep_checkpoints must be >= 1"),
        (["run.wandb_mode=loud"], ValueError, "run.wandb_mode must be one of"),
        (["run.collapse_entropy=2"], ValueError, r"run.collapse_entropy must be in \[0, 1\]"),
        (["run.deepspeed_config=/no/ds.json"], FileNotFoundError, "/no/ds.json does not exist"),
    ],
)
def test_bad_config_fails_early(overrides, error, message):
    cfg = load_train_config("tiny", overrides)
    with pytest.raises(error, match=message):
        check_config(cfg, on_gpu=False)


def test_build_model_passes_every_head_setting_to_the_head():
    cfg = load_train_config(
        "tiny", ["head.chunk_bytes=4096", "head.ignore_index=-1", "head.router_z_coef=0.5"]
    )
    model = train_module.build_model(cfg, vocab_size=64)
    head = model.head.config
    assert (head.chunk_bytes, head.ignore_index, head.router_z_coef) == (4096, -1, 0.5)
    assert (head.expert_type, head.expert_inner_size, head.n_future, head.rank) == (
        "lowrank",
        8,
        3,
        2,
    )
    trunk = model.config.text_config
    assert (trunk.hidden_size, trunk.num_hidden_layers, trunk.num_attention_heads) == (32, 2, 2)
    assert (trunk.vocab_size, trunk.intermediate_size, trunk.num_key_value_heads) == (64, 128, 2)


@pytest.mark.slow
def test_vocab_mismatch_between_tokenizer_and_model_is_an_error(tmp_path):
    proc = launch(tmp_path, "trunk.vocab_size=999", wait=False)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2
    want = "cpd-mtp train: error: trunk.vocab_size=999 does not match the tokenizer's 300 tokens"
    assert want in output and "Traceback" not in output


@settings(max_examples=60, deadline=None)
@given(block_size=st.integers(1, 12), n_future=st.integers(1, 14))
def test_config_is_refused_iff_some_offset_never_has_a_target(block_size, n_future):
    # The reference: the head's own target layout, (1, T, n) with -100 where t+s >= T.
    targets = shift_targets(torch.zeros(1, block_size, dtype=torch.long), n_future, -100)
    empty_offset = bool((targets == -100).all(dim=(0, 1)).any())
    cfg = load_train_config("tiny", [f"data.block_size={block_size}", f"head.n_future={n_future}"])
    if empty_offset:
        with pytest.raises(ValueError, match=r"data\.block_size"):
            check_config(cfg, on_gpu=False)
    else:
        check_config(cfg, on_gpu=False)


def cli_error(argv: list[str], capsys) -> str:
    """The one ``cpd-mtp train: error:`` line of a refused ``cpd-mtp train`` (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert errors[0].startswith("cpd-mtp train: error: ")
    return errors[0].removeprefix("cpd-mtp train: error: ")


def test_cli_refuses_a_bad_config_in_one_line(tmp_path, capsys):
    message = cli_error(
        ["--preset", "tiny", f"run.out_dir={tmp_path}", "data.block_size=1"], capsys
    )
    assert message.startswith("data.block_size must be >= 2")
    assert not any(tmp_path.iterdir())  # refused before any work
    # OmegaConf's own (multi-line) errors come out as one line naming the key, too.
    message = cli_error(["--preset", "tiny", "run.steps=many"], capsys)
    assert message.startswith("bad training config: run.steps: Value 'many'")


@pytest.fixture
def nothing_heavy(monkeypatch):
    """DeepSpeed, torch.distributed and the corpus raise if anything reaches them."""
    import deepspeed

    from cpd_mtp.training import data

    def touched(*args, **kwargs):
        raise AssertionError("reached heavy work before the config was refused")

    monkeypatch.setattr(deepspeed, "initialize", touched)
    monkeypatch.setattr(deepspeed, "init_distributed", touched)
    monkeypatch.setattr(train_module, "init_distributed", touched)
    monkeypatch.setattr(data, "build_corpus", touched)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("head.rank=0", "head.rank must be an integer >= 1, got 0"),
        ("head.draft_vocab_size=64", "head.draft_vocab_size < vocab_size needs next_token='base'"),
        ("head.expert_type=dense", "head.expert_type: Invalid value 'dense'"),
        ("head.n_future=0", "head.n_future must be an integer >= 1"),
        ("optim.betas=[0.9,1.0]", "optim.betas must be two numbers"),
        ("run.zero_stage=5", "run.zero_stage must be 0, 1, 2 or 3"),
    ],
)
def test_a_bad_config_is_refused_before_deepspeed_or_the_corpus(
    override, message, tmp_path, capsys, nothing_heavy
):
    got = cli_error(["--preset", "tiny", f"run.out_dir={tmp_path}", override], capsys)
    assert message in got
    assert not any(tmp_path.iterdir())


def _strict_json(line: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.floats() | st.integers() | st.none(), max_size=6))
def test_metrics_lines_are_strict_json_with_null_for_non_finite(record):
    line = json_line(record)
    assert line.endswith("\n") and line.count("\n") == 1
    want = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }
    assert _strict_json(line) == want


# ---------------------------------------------------------------------- the run directory
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-step tiny run: metrics, a checkpoint at step 2, an export."""
    out = tmp_path_factory.mktemp("finished") / "run"
    launch(out, "run.steps=2", "run.save_every=2", "run.eval_every=2")
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def tiny_cfg(out: Path, *overrides: str):
    return load_train_config("tiny", [f"run.out_dir={out}", *overrides])


def test_a_second_run_on_an_out_dir_that_holds_one_is_refused(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    with pytest.raises(OutDirError, match=r"already holds a run .*--resume .*--overwrite"):
        Trainer(tiny_cfg(out, "run.steps=3"))
    # The command line: one line, no traceback.
    message = cli_error(["--preset", "tiny", f"run.out_dir={out}", "run.steps=3"], capsys)
    assert message.startswith("run.out_dir") and str(out) in message
    assert snapshot(out) == before


def hold_lock(lock: Path) -> subprocess.Popen:
    """Another process that holds an exclusive flock on ``lock`` until killed."""
    code = (
        "import fcntl, sys, time\n"
        "h = open(sys.argv[1], 'a'); fcntl.flock(h, fcntl.LOCK_EX); print('locked', flush=True)\n"
        "time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_out_dir_is_refused_and_the_lock_dies_with_its_process(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    before = snapshot(out)
    holders = [hold_lock(out / ".lock"), hold_lock(fresh / ".lock")]
    try:
        cases = [(out, "run.resume=true"), (out, "run.overwrite=true"), (fresh, "run.steps=3")]
        for directory, extra in cases:
            start = time.perf_counter()
            pattern = re.escape(repr(str(directory))) + " is in use by another training run"
            with pytest.raises(OutDirError, match=pattern):
                Trainer(tiny_cfg(directory, extra))
            assert time.perf_counter() - start < 10  # at once, not after waiting for the lock
        assert snapshot(out) == before
    finally:
        for holder in holders:
            holder.kill()  # SIGKILL: the holder runs no clean-up
            holder.wait()
    lock_out_dir(out).close()  # the kernel dropped the dead process's lock


def test_an_out_dir_that_cannot_be_written_is_one_line(tmp_path):
    # These were a FileExistsError / OSError traceback from deep inside.
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    with pytest.raises(OutDirError, match="is a file, not a folder"):
        lock_out_dir(a_file)
    assert a_file.read_text() == "not a folder"
    unwritable = Path("/proc/cpd_mtp_test/out")  # no folder can be made under /proc
    with pytest.raises(OutDirError, match=r"cannot write to run\.out_dir"):
        lock_out_dir(unwritable)


@pytest.mark.slow
def test_overwrite_replaces_the_old_run(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    old_final = (out / "final" / "model.safetensors").read_bytes()
    launch(out, "run.steps=3", "run.save_every=3", "run.eval_every=3", "--overwrite")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000003"]
    assert (out / "checkpoints" / "latest").read_text() == "step00000003"
    assert (out / "final" / "model.safetensors").read_bytes() != old_final


@pytest.mark.slow
def test_resume_drops_a_torn_last_line_of_the_metrics(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    old = metrics(out)
    assert [r["step"] for r in old] == [1, 2]
    with (out / "metrics.jsonl").open("a") as handle:  # killed mid-write of step 3's record
        handle.write('{"step": 3, "loss": 5.7')
    output = launch(out, "run.steps=3", "run.save_every=3", "run.eval_every=3", "--resume")
    assert f"{out / 'metrics.jsonl'}:3: dropping an unreadable record" in output
    assert f"resumed from step 2 of 3 (checkpoint {out / 'checkpoints' / 'step00000002'})" in output
    assert (
        "warning: the cosine schedule is re-shaped: run.steps 2 -> 3 (checkpoint -> now)" in output
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [_strict_json(line) for line in lines]
    assert records[:2] == old
    assert [r["step"] for r in records] == [1, 2, 3]


# ---------------------------------------------------------------------- resume, said out loud
def test_checkpoints_store_the_config_and_the_schedule(finished_run):
    record = checkpoint.read_record(finished_run / "checkpoints", "step00000002")
    cfg = tiny_cfg(finished_run, "run.steps=2", "run.save_every=2", "run.eval_every=2")
    assert record["config"] == config_to_dict(cfg)  # what the launch ran with
    schedule = {"run.steps": 2, "optim.lr": cfg.optim.lr, "optim.warmup_steps": 2}
    assert record["schedule"] == {**schedule, "optim.min_lr_ratio": cfg.optim.min_lr_ratio}


def _refuse_heavy_work(monkeypatch) -> None:
    import deepspeed

    from cpd_mtp.training import data

    def touched(*args, **kwargs):
        raise AssertionError("reached heavy work")

    monkeypatch.setattr(deepspeed, "initialize", touched)
    monkeypatch.setattr(data, "build_corpus", touched)


def test_resuming_a_finished_run_says_so_and_trains_nothing(
    finished_run, tmp_path, capsys, monkeypatch
):
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    _refuse_heavy_work(monkeypatch)  # not even the corpus or the engine is built
    main(["--preset", "tiny", f"run.out_dir={out}", "run.steps=2", "--resume"])  # exit 0
    err = capsys.readouterr().err
    tag = out / "checkpoints" / "step00000002"
    assert f"the run is already complete: step 2 of 2 (checkpoint {tag}); nothing to train" in err
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("override", "change"),
    [
        ("head.rank=3", "head.rank 2 -> 3"),
        ("head.expert_type=linear", 'head.expert_type "lowrank" -> "linear"'),
        ("trunk.num_layers=3", "trunk.num_layers 2 -> 3"),
        ("data.block_size=16", "data.block_size 32 -> 16"),
        ("data.max_files=20", "data.max_files 40 -> 20"),
    ],
)
def test_a_resume_that_changes_the_model_or_data_is_refused_naming_the_key(
    override, change, finished_run, tmp_path, capsys, monkeypatch
):
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    _refuse_heavy_work(monkeypatch)
    with pytest.raises(ResumeMismatchError, match=re.escape(change)):
        Trainer(tiny_cfg(out, "run.resume=true", "run.steps=4", override))
    # On the command line: one line, the overrides after --resume.
    message = cli_error(
        ["--preset", "tiny", f"run.out_dir={out}", "--resume", "run.steps=4", override], capsys
    )
    tag = out / "checkpoints" / "step00000002"
    assert message.startswith(f"cannot resume from {tag}: {change} (checkpoint -> now)")
    assert snapshot(out) == before


def test_a_resume_may_change_how_the_loss_is_computed(finished_run, tmp_path, monkeypatch):
    out = copy_run(finished_run, tmp_path)
    _refuse_heavy_work(monkeypatch)
    free = ["head.loss_impl=reference", "head.chunk_bytes=4096"]  # the same loss, another route
    trainer = Trainer(tiny_cfg(out, "run.resume=true", "run.steps=2", *free))
    assert trainer.complete and trainer.resume_point.step == 2


def test_a_checkpoint_without_a_config_resumes_with_a_warning(
    finished_run, tmp_path, capsys, monkeypatch
):
    out = copy_run(finished_run, tmp_path)
    marker = out / "checkpoints" / "step00000002" / checkpoint.MARKER
    record = json.loads(marker.read_text())
    del record["config"], record["schedule"]  # as an older version sealed it
    marker.write_text(json.dumps(record))
    _refuse_heavy_work(monkeypatch)
    # No export to compare with: the record was rewritten, so the export's stamp would differ.
    cfg = tiny_cfg(out, "run.resume=true", "run.steps=2", "head.rank=3", "run.export=false")
    assert Trainer(cfg).train() == {}
    err = capsys.readouterr().err
    assert "stores no config" in err and "already complete" in err


# ---------------------------------------------------------------------- collapse, noise, ops
@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1, allow_subnormal=False), min_size=1, max_size=8))
def test_usage_entropy_is_the_entropy_of_the_usage_over_log_r(weights):
    got = usage_entropy(weights)
    if len(weights) < 2 or sum(weights) == 0:
        assert got is None
        return
    probs = torch.tensor(weights, dtype=torch.float64)
    want = torch.distributions.Categorical(probs=probs).entropy() / math.log(len(weights))
    assert got == pytest.approx(float(want), abs=1e-9)
    message = usage_collapse(weights, threshold=0.5)
    assert (message is not None) == (got < 0.5)


def test_a_collapsed_gate_is_warned_about_at_evaluation(tmp_path, capsys):
    # ZeRO-0: ZeRO-1/2 would copy their own fp32 master weights back over the edited gate.
    trainer = Trainer(tiny_cfg(tmp_path, "run.steps=1", "run.export=false", "run.zero_stage=0"))
    assert trainer.evaluate()["val/usage_entropy"] > 0.9  # a fresh gate uses both experts
    with torch.no_grad():  # a gate that sends every position to expert 0
        trainer.engine.module.head.gate.bias.copy_(torch.tensor([8.0, -8.0]))
    last = trainer.train()
    usage = [last["val/expert_usage/0"], last["val/expert_usage/1"]]
    assert usage[0] > 0.99 and last["val/usage_entropy"] < 0.1
    warned = [line for line in capsys.readouterr().err.splitlines() if "collapsed" in line]
    assert len(warned) == 1
    assert warned[0].startswith("warning: step 1: expert usage has collapsed: usage 1.00/0.00")
    assert "run.collapse_entropy=0.5" in warned[0]


def test_only_the_known_dependency_deprecations_are_silenced():
    noise = "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ..."
    where = ("c10d_logger.py", 83)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_dependency_noise()
        warnings.warn_explicit(noise, FutureWarning, *where, module="torch.distributed.c10d_logger")
        # The same text from another module, another category, another message: all shown.
        warnings.warn_explicit(noise, FutureWarning, "mine.py", 1, module="cpd_mtp.mine")
        warnings.warn_explicit(noise, UserWarning, *where, module="torch.distributed.c10d_logger")
        other = "`torch.distributed.all_reduce_coalesced` will be deprecated"
        warnings.warn_explicit(other, FutureWarning, *where, module="torch.distributed.c10d_logger")
    assert len(seen) == 3
    # DeepSpeed's log line about reading the LR before the first step goes too, nothing else.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("DeepSpeed")
    logger.addHandler(handler)
    try:
        logger.warning("Attempting to get learning rate from scheduler before it has started")
        logger.warning("total_num_steps 1 is less than warmup_num_steps 1")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "total_num_steps 1 is less than warmup_num_steps 1"
    ]


@pytest.mark.slow
def test_a_zero3_run_prints_no_future_warning(tmp_path):
    # Without the filter, this run prints the c10d FutureWarnings about 20 times.
    output = launch(tmp_path / "z3", "run.zero_stage=3", "run.steps=2", "run.export=false")
    assert "FutureWarning" not in output and "DeprecationWarning" not in output
    assert "built successfully" not in output  # DeepSpeed's line at each start
    assert [r["step"] for r in metrics(tmp_path / "z3")] == [1, 2]


def test_compiled_ops_go_to_the_environment_and_a_first_build_says_where(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert engine_module.ops_dir() == Path(sys.prefix) / "torch_extensions"  # the .venv
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setattr(sys, "prefix", str(env))
    path = use_project_ops_dir()
    assert path == env / "torch_extensions" and os.environ["TORCH_EXTENSIONS_DIR"] == str(path)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"builds the ops it needs into {path}" in lines[0]
    (path / "deepspeed_shm_comm").mkdir(parents=True)  # once an op is built: silent
    (path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert use_project_ops_dir() == path and capsys.readouterr().err == ""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))  # a set one is kept
    assert use_project_ops_dir() == tmp_path / "mine"


# ---------------------------------------------------------------------- launch scripts
def _fake_python(path: Path) -> None:
    """An interpreter that reports how it was called; ``-c`` code runs in the real one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\n'
        'echo "ran $0 $*"\n'
    )
    path.chmod(0o755)


@pytest.mark.parametrize("script", ["train_cpu.sh", "train_multi_gpu.sh"])
def test_launch_scripts_use_the_project_environment(script, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    env = {k: v for k, v in run_env().items() if k not in ("PYTHON", "TORCH_EXTENSIONS_DIR")}
    env.update(NUM_GPUS="1", NPROC="1")
    bin_dir = tmp_path / "bin"
    _fake_python(bin_dir / "python3")  # what PATH offers
    env["PATH"] = f"{bin_dir}:{env['PATH']}"

    def run(**extra: str) -> subprocess.CompletedProcess:
        cmd = ["bash", str(repo / "scripts" / script), "--preset", "tiny"]
        return subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True)

    # No .venv: python3 from PATH, with a warning.
    out = run()
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"ran {bin_dir / 'python3'} -m ")
    assert "--preset tiny" in out.stdout and ".venv not found" in out.stderr
    # The project's .venv, when there is one; $PYTHON above both.
    _fake_python(repo / ".venv" / "bin" / "python")
    out = run()
    assert out.stdout.startswith(f"ran {repo / '.venv' / 'bin' / 'python'} -m ")
    assert out.stderr == ""
    _fake_python(tmp_path / "mine" / "python")
    out = run(PYTHON=str(tmp_path / "mine" / "python"))
    assert out.stdout.startswith(f"ran {tmp_path / 'mine' / 'python'} -m ")
