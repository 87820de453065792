"""Sealed folders (``cpd_mtp.utils.records``): a record of every file, checked against the
files; tampering, truncation, a missing file and a malformed record are each named."""

from __future__ import annotations

import hashlib
import json

import pytest

from cpd_mtp.utils.records import RecordError, check_files, read_record, seal


def folder_with_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc" * 100)
    (tmp_path / "sub" / "b.txt").write_text("hello")
    return tmp_path


def test_a_sealed_folder_records_every_file_and_checks_clean(tmp_path):
    folder = folder_with_files(tmp_path)
    record = seal(folder, "record.json", extra={"step": 3})
    assert record["step"] == 3 and set(record["files"]) == {"a.bin", "sub/b.txt"}
    want = hashlib.sha256(b"abc" * 100).hexdigest()
    assert record["files"]["a.bin"] == {"bytes": 300, "sha256": want}
    assert read_record(folder, "record.json") == record
    check_files(folder, record)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda f: (f / "a.bin").write_bytes(b"abd" * 100),
            r"a\.bin does not match its record \(SHA-256\)",
        ),
        (lambda f: (f / "a.bin").write_bytes(b"ab"), r"a\.bin does not match its record \(2 bytes"),
        (lambda f: (f / "sub" / "b.txt").unlink(), r"sub/b\.txt is missing"),
    ],
)
def test_damage_is_named(tmp_path, damage, message):
    folder = folder_with_files(tmp_path)
    seal(folder, "record.json")
    damage(folder)
    with pytest.raises(RecordError, match=message):
        check_files(folder, read_record(folder, "record.json"))


def test_size_only_files_skip_the_hash_but_not_the_size(tmp_path):
    folder = folder_with_files(tmp_path)
    record = seal(folder, "record.json", files=["a.bin"])
    (folder / "a.bin").write_bytes(b"xyz" * 100)  # same size, other bytes
    check_files(folder, record, size_only=["a.bin"])
    with pytest.raises(RecordError):
        check_files(folder, record)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "has an unreadable record.json"),
        ("[1]", "has a malformed record.json: expected a JSON object"),
        (json.dumps({"files": {"../x": {"bytes": 1, "sha256": "0" * 64}}}), "points outside"),
        (json.dumps({"files": {"a": {"bytes": "1", "sha256": "0" * 64}}}), "'bytes' of 'a'"),
        (json.dumps({"files": {"a": {"bytes": 1, "sha256": "xyz"}}}), "'sha256' of 'a'"),
    ],
)
def test_a_bad_record_is_one_error_of_the_callers_class(tmp_path, text, message):
    (tmp_path / "record.json").write_text(text)
    with pytest.raises(KeyError, match=message):
        read_record(tmp_path, "record.json", KeyError, "my folder")
