"""DeepSpeed training: multi-process equals single-process, resume equals straight, bad configs.

Runs go through real launchers (``python -m cpd_mtp.train``, ``torchrun``) in subprocesses on
the ``tiny`` preset (a 2-layer trunk on a few stdlib files).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cpd_mtp.train import check_config, deepspeed_config, micro_batch_indices
from cpd_mtp.train_config import load_train_config

ROOT = Path(__file__).resolve().parent.parent


def run_env() -> dict[str, str]:
    # An in-process run earlier in this session sets these; a child must pick its own.
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    return env


def launch(out_dir: Path, *overrides: str, nproc: int = 1, wait: bool = True):
    module = ["-m", "cpd_mtp.train", "--preset", "tiny", f"run.out_dir={out_dir}", *overrides]
    env = run_env()
    if nproc > 1:  # the launch script CI and users run on CPU
        env.update(
            NPROC=str(nproc), PYTHON=sys.executable, MASTER_PORT=str(29500 + os.getpid() % 1000)
        )
        cmd = ["bash", str(ROOT / "scripts" / "train_cpu.sh"), *module[2:]]
    else:
        cmd = [sys.executable, *module]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
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
    launch(multi, f"run.zero_stage={stage}", "run.micro_batch_size=2", "run.steps=4",
           "run.export=false", nproc=2)  # fmt: skip
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
    while time.time() < deadline and not (
        pointer.exists() and pointer.read_text() == "step00000002"
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert pointer.read_text() in ("step00000002", "step00000004")
    resumed_from = int(pointer.read_text()[4:])
    assert resumed_from < 6, "the run finished before it was killed: nothing was tested"
    launch(killed, *steps, "run.resume=true")
    a, b = metrics(straight), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-6), (ra, rb)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-9)
    wa, wb = final_weights(straight), final_weights(killed)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-6, atol=1e-6, msg=name)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    launch(out, "run.steps=2", "run.save_every=2", "run.export=false")
    state = out / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    proc = launch(out, "run.steps=4", "run.resume=true", wait=False)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "is corrupt: mp_rank_00_model_states.pt does not match its record" in output


def test_short_run_on_the_embedded_corpus_lowers_validation_nll(tmp_path):
    from cpd_mtp.train import Trainer

    cfg = load_train_config("tiny", [f"run.out_dir={tmp_path}", "run.steps=12", "run.eval_every=12",
                                     "run.save_every=12"])  # fmt: skip
    trainer = Trainer(cfg)
    before = trainer.evaluate()
    after = trainer.train()
    assert after["val/joint_nll"] < before["val/joint_nll"] - 0.5
    assert after["val/next_token_nll"] < before["val/next_token_nll"]
    assert sum(after[f"val/expert{a}_weight"] for a in range(2)) == pytest.approx(1.0, abs=1e-4)
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
    ],
)
def test_bad_config_fails_early(overrides, error, message):
    cfg = load_train_config("tiny", overrides)
    with pytest.raises(error, match=message):
        check_config(cfg, on_gpu=False)


def test_unknown_preset_and_key_fail_early():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        load_train_config("nope")
    with pytest.raises(ValueError, match="bad training config"):
        load_train_config("tiny", ["run.stepz=3"])
    with pytest.raises(ValueError, match="bad training config"):
        load_train_config("tiny", ["run.steps=many"])


def test_vocab_mismatch_between_tokenizer_and_model_is_an_error(tmp_path):
    proc = launch(tmp_path, "trunk.vocab_size=999", wait=False)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "trunk.vocab_size=999 does not match the tokenizer's 300 tokens" in output
