"""Crash-safe checkpoint bookkeeping: seal, verify, the latest pointer, pruning."""

from __future__ import annotations

import pytest

from cpd_mtp import checkpoint


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
