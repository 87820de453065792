"""Crash-safe DeepSpeed checkpoints.

DeepSpeed writes each checkpoint into ``<dir>/<tag>/``. On top of that:

1. after every rank has saved, rank 0 writes ``<tag>/cpd_mtp_complete.json`` listing every file
   with its size and SHA-256;
2. only then it points ``<dir>/latest`` at the tag, by write-to-temp and ``os.replace``.

A kill at any moment leaves ``latest`` on the previous complete checkpoint, so a resume never
loses more than the work since it. A checkpoint whose files do not match their record is
reported as corrupt with the file named, never loaded silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

MARKER = "cpd_mtp_complete.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def seal(checkpoint_dir: Path, tag: str, step: int) -> None:
    """Record the files of a saved tag, then point ``latest`` at it. Rank 0 only."""
    tag_dir = checkpoint_dir / tag
    files = {
        str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    if not files:
        raise CheckpointError(f"checkpoint {tag_dir} has no files to seal")
    _atomic_write(tag_dir / MARKER, json.dumps({"step": step, "files": files}, indent=1))
    _atomic_write(checkpoint_dir / LATEST, tag)


def verify(checkpoint_dir: Path, tag: str) -> dict[str, Any]:
    """The sealed record of ``tag``; raises ``CheckpointError`` if a file is missing or changed."""
    tag_dir = Path(checkpoint_dir) / tag
    marker = tag_dir / MARKER
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: no {MARKER} (killed mid-save?)")
    try:
        record = json.loads(marker.read_text())
        files = record["files"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {tag_dir} has an unreadable {MARKER}: {err}") from err
    for name, meta in files.items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} is corrupt: {name} is missing")
        if path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            raise CheckpointError(
                f"checkpoint {tag_dir} is corrupt: {name} does not match its record"
            )
    return record


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The tag ``latest`` points at (verified), or None when there is no checkpoint yet."""
    pointer = Path(checkpoint_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    verify(checkpoint_dir, tag)
    return tag


def prune(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` sealed tags; never the one ``latest`` points at."""
    checkpoint_dir = Path(checkpoint_dir)
    pointer = checkpoint_dir / LATEST
    current = pointer.read_text().strip() if pointer.is_file() else None
    tags = sorted(p.name for p in checkpoint_dir.glob("step*") if (p / MARKER).is_file())
    for tag in tags[: max(len(tags) - keep, 0)]:
        if tag != current:
            shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)
