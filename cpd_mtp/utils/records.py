"""Sealed folders: one way to record a folder's files and to check them later.

Exports, checkpoints and the data caches all end the same way: once every file of a folder is
written, a JSON *record* beside them lists each file's size and SHA-256 (and whatever else the
writer wants kept), and a reader checks the files against it before trusting them.

- :func:`seal` fsyncs the files, measures them and writes the record atomically;
- :func:`read_record` reads a record and checks its shape (every entry a size and 64 hex
  digits), raising the caller's error class in one line;
- :func:`check_files` compares the files with the record: missing, a size that differs, or
  (unless skipped, for files too large to hash on every open) a SHA-256 that differs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cpd_mtp.utils.files import atomic_write_text, fsync_path, sha256_file

__all__ = ["RecordError", "check_files", "file_entry", "read_record", "seal"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class RecordError(RuntimeError):
    """A sealed folder's record is unreadable, or a file differs from it."""


def file_entry(path: str | os.PathLike[str], digest: str | None = None) -> dict[str, Any]:
    """``{"bytes": size, "sha256": digest}`` of one file (the digest computed when not given)."""
    path = Path(path)
    return {"bytes": path.stat().st_size, "sha256": digest or sha256_file(path)}


def seal(
    folder: str | os.PathLike[str],
    record_name: str,
    files: Iterable[str] | None = None,
    extra: dict[str, Any] | None = None,
    digests: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Fsync and record the files of ``folder``; the record is written last, atomically, and
    the folder fsynced after it.

    Args:
        folder: the folder.
        record_name: the record's file name inside it (never recorded itself).
        files: relative paths to record; None: every file under ``folder``.
        extra: more keys of the record (a step, a format, shapes); ``files`` is the seal's.
        digests: SHA-256s already computed while writing, by relative path.

    Returns:
        The record.
    """
    folder = Path(folder)
    if files is None:
        names = [
            str(p.relative_to(folder))
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != record_name
        ]
    else:
        names = list(files)
    entries = {}
    for name in names:
        path = folder / name
        fsync_path(path)
        entries[name] = file_entry(path, (digests or {}).get(name))
    # The files' entries are durable before the record that vouches for them exists.
    for sub in sorted({(folder / name).parent for name in names}, reverse=True):
        fsync_path(sub)
    record = {**(extra or {}), "files": entries}
    atomic_write_text(folder / record_name, json.dumps(record, indent=1))
    fsync_path(folder)
    return record


def read_record(
    folder: str | os.PathLike[str],
    record_name: str,
    error: type[Exception] = RecordError,
    what: str | None = None,
) -> dict[str, Any]:
    """The record of ``folder``, its ``files`` entries checked for shape.

    Args:
        what: how messages name the folder (default: the folder's path).

    Raises:
        error: "``what`` has an unreadable ``record_name``" (missing, not JSON) or "... a
            malformed ..." (not an object, ``files`` not a mapping, an entry without a size or
            64 hex digits, a path outside the folder).
    """
    folder = Path(folder)
    what = what or str(folder)
    try:
        record = json.loads((folder / record_name).read_text())
    except (OSError, ValueError) as err:
        raise error(f"{what} has an unreadable {record_name}: {err}") from None

    def malformed(why: str) -> Exception:
        return error(f"{what} has a malformed {record_name}: {why}")

    if not isinstance(record, dict):
        raise malformed(f"expected a JSON object, got {type(record).__name__}")
    files = record.get("files")
    if not isinstance(files, dict):
        raise malformed(f"'files' must be an object, got {files!r:.80}")
    for name, meta in files.items():
        parts = Path(name).parts
        # Lexically, not resolved: files of a Hub cache snapshot are links into its blobs.
        if os.path.isabs(name) or ".." in parts or not parts:
            raise malformed(f"file name {name!r} points outside the folder")
        if not isinstance(meta, dict):
            raise malformed(f"entry of {name!r} must be an object, got {meta!r:.80}")
        size, digest = meta.get("bytes"), meta.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise malformed(f"'bytes' of {name!r} must be a non-negative integer, got {size!r}")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise malformed(f"'sha256' of {name!r} must be 64 hex digits, got {digest!r:.80}")
    return record


def check_files(
    folder: str | os.PathLike[str],
    record: dict[str, Any],
    error: type[Exception] = RecordError,
    what: str | None = None,
    *,
    size_only: Iterable[str] = (),
) -> None:
    """Compare ``folder``'s files with ``record`` (from :func:`read_record`).

    Args:
        what: how messages name the folder (default: the folder's path).
        size_only: files whose size alone is checked (hashing them on every open would read
            hundreds of MB); their SHA-256 stays in the record for a full check.

    Raises:
        error: "``what`` is corrupt: <file> is missing" or "... <file> does not match its
            record" (its size, or its SHA-256).
    """
    folder = Path(folder)
    what = what or str(folder)
    lenient = set(size_only)
    for name, meta in record["files"].items():
        path = folder / name
        if not path.is_file():
            raise error(f"{what} is corrupt: {name} is missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise error(
                f"{what} is corrupt: {name} does not match its record ({size} bytes, "
                f"recorded {meta['bytes']})"
            )
        if name not in lenient and sha256_file(path) != meta["sha256"]:
            raise error(f"{what} is corrupt: {name} does not match its record (SHA-256)")
