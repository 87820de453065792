"""Durable atomic writes: a failed or killed write never leaves a torn or empty file."""

from __future__ import annotations

import hashlib

import pytest

from cpd_mtp.utils import files
from cpd_mtp.utils.files import atomic_directory, atomic_write_text, sha256_file


def test_atomic_write_text_replaces_the_file(tmp_path):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")
    atomic_write_text(target, "new\n" * 3)
    assert target.read_text() == "new\n" * 3
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_atomic_write_text_failing_midway_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.jsonl"
    old = '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n'
    target.write_text(old)
    # Text UTF-8 cannot encode.
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, '{"step": 1}\n' * 100 + "\ud800")
    assert target.read_text() == old
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]

    # A full disk at the flush to storage.
    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, '{"step": 1}\n')
    assert target.read_text() == old
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_atomic_directory_is_all_or_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "entry") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(tmp_path / "entry") as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert [p.name for p in (tmp_path / "entry").iterdir()] == ["whole.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_sha256_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
