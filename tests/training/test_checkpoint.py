"""Crash-safe checkpoint bookkeeping: seal, verify, the latest pointer, pruning, recovery."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpd_mtp.training import checkpoint


def write_tag(root, step, payload=b"weights"):
    tag_dir = root / checkpoint.tag_for_step(step)
    (tag_dir / "sub").mkdir(parents=True)
    (tag_dir / "model.pt").write_bytes(payload)
    (tag_dir / "sub" / "optim.pt").write_bytes(payload * 2)
    return checkpoint.tag_for_step(step)


def test_seal_then_latest_round_trip(tmp_path):
    assert checkpoint.latest_tag(tmp_path) is None
    tag = write_tag(tmp_path, 4)
    checkpoint.seal(tmp_path, tag, 4)
    assert checkpoint.latest_tag(tmp_path) == tag
    record = checkpoint.verify(tmp_path, tag)
    assert record["step"] == 4 and set(record["files"]) == {"model.pt", "sub/optim.pt"}


def test_the_record_carries_the_info_given_to_seal(tmp_path):
    tag = write_tag(tmp_path, 4)
    info = {"config": {"head": {"rank": 4}, "run": {"steps": 8}}, "schedule": {"run.steps": 8}}
    # The info cannot overwrite what seal itself records.
    checkpoint.seal(tmp_path, tag, 4, {**info, "step": 99, "files": {}})
    record = checkpoint.read_record(tmp_path, tag)  # no hashing
    assert record == checkpoint.verify(tmp_path, tag)
    assert {k: record[k] for k in info} == info and record["step"] == 4
    assert set(record["files"]) == {"model.pt", "sub/optim.pt"}
    with pytest.raises(checkpoint.CheckpointError, match="refusing checkpoint tag"):
        checkpoint.read_record(tmp_path, "../elsewhere")


def test_an_unsealed_newer_tag_does_not_move_latest(tmp_path):
    checkpoint.seal(tmp_path, write_tag(tmp_path, 2), 2)
    write_tag(tmp_path, 4)  # a save killed before its seal
    assert checkpoint.latest_tag(tmp_path) == "step00000002"
    with pytest.raises(checkpoint.CheckpointError, match="is incomplete"):
        checkpoint.verify(tmp_path, "step00000004")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_files_are_reported_by_name(tmp_path, damage):
    tag = write_tag(tmp_path, 2)
    checkpoint.seal(tmp_path, tag, 2)
    victim = tmp_path / tag / "sub" / "optim.pt"
    if damage == "flip":
        victim.write_bytes(b"W" + victim.read_bytes()[1:])
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1])
    else:
        victim.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"is corrupt: sub/optim\.pt"):
        checkpoint.latest_tag(tmp_path)


def test_prune_keeps_the_newest_and_the_latest(tmp_path):
    for step in (2, 4, 6, 8):
        checkpoint.seal(tmp_path, write_tag(tmp_path, step), step)
    write_tag(tmp_path, 10)  # unsealed: never counted, never deleted by prune
    checkpoint.prune(tmp_path, keep=2)
    left = sorted(p.name for p in tmp_path.glob("step*"))
    assert left == ["step00000006", "step00000008", "step00000010"]
    assert checkpoint.latest_tag(tmp_path) == "step00000008"


# ---------------------------------------------------------------------- recovery
def corrupt(root, tag):
    victim = root / tag / "model.pt"
    victim.write_bytes(b"X" + victim.read_bytes()[1:])


@pytest.mark.parametrize(
    "break_latest, reason",
    [
        ("delete", r"latest is missing"),
        ("corrupt", r"is corrupt: model\.pt does not match its record"),
        ("unseal", r"is incomplete"),
        ("escape", r"refusing checkpoint tag '\.\./step00000006'"),
    ],
)
def test_a_broken_latest_falls_back_to_the_newest_checkpoint_that_verifies(
    tmp_path, break_latest, reason
):
    for step in (2, 4, 6):
        checkpoint.seal(tmp_path, write_tag(tmp_path, step), step)
    corrupt(tmp_path, "step00000004")  # not chosen either: the fallback verifies
    if break_latest == "delete":
        (tmp_path / "latest").unlink()
    elif break_latest == "unseal":
        (tmp_path / "step00000006" / checkpoint.MARKER).unlink()
    elif break_latest == "escape":
        (tmp_path / "latest").write_text("../step00000006")
    if break_latest != "unseal":
        corrupt(tmp_path, "step00000006")
    tag, notes = checkpoint.resolve_resume_tag(tmp_path)
    assert tag == "step00000002"
    text = "\n".join(notes)
    assert re.search(reason, text), text
    for skipped in ("step00000006", "step00000004"):
        assert f"skipping '{skipped}'" in text, text
    assert "resuming from 'step00000002'" in text
    with pytest.warns(UserWarning) as caught:
        assert checkpoint.resume_tag(tmp_path) == "step00000002"
    assert [str(w.message) for w in caught] == [f"checkpoint recovery: {n}" for n in notes]


def test_an_intact_latest_is_used_without_warnings(tmp_path):
    for step in (2, 4):
        checkpoint.seal(tmp_path, write_tag(tmp_path, step), step)
    assert checkpoint.resolve_resume_tag(tmp_path) == ("step00000004", [])
    assert checkpoint.resolve_resume_tag(tmp_path / "absent") == (None, [])


def test_no_checkpoint_that_verifies_is_an_error_listing_every_reason(tmp_path):
    checkpoint.seal(tmp_path, write_tag(tmp_path, 2), 2)
    corrupt(tmp_path, "step00000002")
    write_tag(tmp_path, 4)  # killed before its seal
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* verifies") as info:
        checkpoint.resolve_resume_tag(tmp_path)
    assert "step00000004" in str(info.value) and "model.pt does not match" in str(info.value)


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(st.integers(1, 40), min_size=1, max_size=5, unique=True),
    data=st.data(),
)
def test_resume_picks_latest_if_it_verifies_else_the_newest_that_does(steps, data):
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        for step in sorted(steps):
            checkpoint.seal(root, write_tag(root, step), step)
        damaged = data.draw(st.sets(st.sampled_from(steps)))
        for step in damaged:
            corrupt(root, checkpoint.tag_for_step(step))
        latest = data.draw(st.sampled_from(steps))
        (root / "latest").write_text(checkpoint.tag_for_step(latest))
        # Brute force: every tag checked on its own.
        good = [s for s in steps if s not in damaged]
        expected = latest if latest in good else (max(good) if good else None)
        if expected is None:
            with pytest.raises(checkpoint.CheckpointError):
                checkpoint.resolve_resume_tag(root)
        else:
            tag, notes = checkpoint.resolve_resume_tag(root)
            assert tag == checkpoint.tag_for_step(expected)
            assert bool(notes) == (expected != latest)


@pytest.mark.parametrize("pointer", ["../elsewhere", "/tmp/step00000002", "sub/step00000002", ".."])
def test_latest_may_only_name_a_folder_inside_its_directory(tmp_path, pointer):
    checkpoint.seal(tmp_path, write_tag(tmp_path, 2), 2)
    (tmp_path / "latest").write_text(pointer)
    with pytest.raises(checkpoint.CheckpointError, match="refusing checkpoint tag"):
        checkpoint.latest_tag(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="refusing checkpoint tag"):
        checkpoint.verify(tmp_path, pointer)


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.pop("files"),
        lambda r: r.update(files=list(r["files"])),
        lambda r: r.update(files={}),
        lambda r: r.pop("step"),
        lambda r: r.update(step="4"),
        lambda r: r["files"]["model.pt"].update(bytes="7"),
        lambda r: r["files"]["model.pt"].update(bytes=7.0),
        lambda r: r["files"]["model.pt"].update(bytes=None),
        lambda r: r["files"]["model.pt"].pop("bytes"),
        lambda r: r["files"]["model.pt"].pop("sha256"),
        lambda r: r["files"]["model.pt"].update(sha256=12),
        lambda r: r["files"].update({"model.pt": [7, "ab"]}),
        lambda r: r["files"].update({"../../etc/passwd": r["files"]["model.pt"]}),
    ],
)
def test_a_malformed_completion_record_is_a_checkpoint_error(tmp_path, edit):
    tag = write_tag(tmp_path, 2)
    checkpoint.seal(tmp_path, tag, 2)
    marker = tmp_path / tag / checkpoint.MARKER
    record = json.loads(marker.read_text())
    edit(record)
    marker.write_text(json.dumps(record))
    with pytest.raises(checkpoint.CheckpointError, match=f"has a malformed {checkpoint.MARKER}"):
        checkpoint.verify(tmp_path, tag)


@pytest.mark.parametrize("text", ["[1, 2]", "not json", "\xff"])
def test_an_unreadable_completion_record_is_a_checkpoint_error(tmp_path, text):
    tag = write_tag(tmp_path, 2)
    checkpoint.seal(tmp_path, tag, 2)
    (tmp_path / tag / checkpoint.MARKER).write_bytes(text.encode("latin-1"))
    with pytest.raises(
        checkpoint.CheckpointError, match=r"has an? (malformed|unreadable) cpd_mtp_"
    ):
        checkpoint.verify(tmp_path, tag)


# ---------------------------------------------------------------------- durability
def test_seal_fsyncs_the_files_and_folders_before_latest_moves(tmp_path, monkeypatch):
    checkpoint.seal(tmp_path, write_tag(tmp_path, 2), 2)
    tag = write_tag(tmp_path, 4)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.seal(tmp_path, tag, 4)
    latest = events.index(("replace", str((tmp_path / "latest").resolve())))
    synced_before = {path for kind, path in events[:latest] if kind == "fsync"}
    tag_dir = (tmp_path / tag).resolve()
    for path in [tag_dir / "model.pt", tag_dir / "sub" / "optim.pt", tag_dir / "sub", tag_dir]:
        assert str(path) in synced_before, path
    marker = events.index(("replace", str(tag_dir / checkpoint.MARKER)))
    assert ("fsync", str(tag_dir)) in events[marker:latest]  # the record's rename is durable
    assert ("fsync", str(tmp_path.resolve())) in events[latest:]  # and so is latest's


def test_stale_temporaries_and_older_incomplete_folders_are_cleaned(tmp_path):
    checkpoint.seal(tmp_path, write_tag(tmp_path, 2), 2)
    write_tag(tmp_path, 3)  # killed before its seal, older than the next complete one
    tag = write_tag(tmp_path, 4)
    write_tag(tmp_path, 6)  # newer than any complete one: could be a save in progress
    (tmp_path / ".latest.tmp999").write_text("step00000003")
    (tmp_path / "step00000002" / f".{checkpoint.MARKER}.tmp999").write_text("{")
    (tmp_path / tag / f".{checkpoint.MARKER}.tmp999").write_text("{")
    checkpoint.seal(tmp_path, tag, 4)
    assert f".{checkpoint.MARKER}.tmp999" not in checkpoint.verify(tmp_path, tag)["files"]
    checkpoint.prune(tmp_path, keep=5)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert not [name for name in left if ".tmp" in name], left
    assert sorted(p.name for p in tmp_path.glob("step*")) == [
        "step00000002",
        "step00000004",
        "step00000006",
    ]
    assert checkpoint.latest_tag(tmp_path) == tag


@pytest.mark.parametrize("where", ["fsync", "latest"])
def test_a_full_disk_while_sealing_names_the_path_and_keeps_latest(tmp_path, monkeypatch, where):
    checkpoint.seal(tmp_path, write_tag(tmp_path, 2), 2)
    tag = write_tag(tmp_path, 4)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "fsync":
        monkeypatch.setattr(os, "fsync", full)
        path = tmp_path / tag
    else:
        real_open = Path.open

        def open_(self, *args, **kwargs):
            if self.name.startswith(".latest.tmp"):
                full()
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", open_)
        path = tmp_path / "latest"
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device") as info:
        checkpoint.seal(tmp_path, tag, 4)
    assert str(path) in str(info.value)
    monkeypatch.undo()
    assert checkpoint.latest_tag(tmp_path) == "step00000002"
    assert not list(tmp_path.rglob("*.tmp*"))


def test_only_a_full_disk_is_rewritten(tmp_path):
    pattern = f"No space left on device while writing {re.escape(str(tmp_path))}"
    with (
        pytest.raises(checkpoint.CheckpointError, match=pattern),
        checkpoint.disk_full_is_an_error(tmp_path),
    ):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError), checkpoint.disk_full_is_an_error(tmp_path):
        raise PermissionError(errno.EACCES, "Permission denied")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("free", [0, 10 << 30])
def test_torch_saves_write_failure_on_a_full_disk_names_the_path(tmp_path, monkeypatch, free):
    # torch.save (DeepSpeed's writer) reports a failed write as a RuntimeError without errno;
    # /dev/full fails every write with ENOSPC.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))
    target = tmp_path / "step00000002"
    expected = checkpoint.CheckpointError if free == 0 else RuntimeError
    with pytest.raises(expected) as info, checkpoint.disk_full_is_an_error(target):
        torch.save({"w": torch.zeros(1 << 16)}, "/dev/full")
    if free == 0:
        assert f"No space left on device while writing {target}" in str(info.value)
    else:
        assert not isinstance(info.value, checkpoint.CheckpointError)


# ---------------------------------------------------------------------- with real DeepSpeed
ROOT = Path(__file__).resolve().parents[2]


def train_tiny(out_dir: Path, *overrides: str) -> str:
    # A child picks its own rendezvous, whatever an in-process run set in this process.
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "cpd_mtp.training.trainer",
        "--preset",
        "tiny",
        f"run.out_dir={out_dir}",
        "run.steps=2",
        "run.save_every=1",
        "run.eval_every=2",
        "run.export=false",
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_resume_skips_a_corrupt_latest_deepspeed_checkpoint(tmp_path):
    out = tmp_path / "run"
    train_tiny(out)
    straight = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000002"
    corrupt_file = ckpt / "step00000002" / "mp_rank_00_model_states.pt"
    data = bytearray(corrupt_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt_file.write_bytes(bytes(data))
    output = train_tiny(out, "--resume")
    assert "skipping 'step00000002'" in output and "mp_rank_00_model_states.pt" in output
    assert "resuming from 'step00000001'" in output
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2]
    # Step 2 redone from step 1's checkpoint matches the straight run's step 2.
    assert resumed[0] == straight[0]
    assert resumed[1]["loss"] == pytest.approx(straight[1]["loss"], rel=1e-6)
    assert resumed[1]["val/joint_nll"] == pytest.approx(straight[1]["val/joint_nll"], rel=1e-6)
    assert checkpoint.latest_tag(ckpt) == "step00000002"  # re-saved and sealed
