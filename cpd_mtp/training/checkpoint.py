"""Crash-safe DeepSpeed checkpoints.

DeepSpeed writes each checkpoint into ``<dir>/<tag>/``. On top of that:

1. after every rank has saved, rank 0 fsyncs every file of the tag, writes
   ``<tag>/cpd_mtp_complete.json`` listing every file with its size and SHA-256, and fsyncs the
   tag directory;
2. only then it points ``<dir>/latest`` at the tag, by write-to-temp and ``os.replace``, and
   fsyncs ``<dir>``.

A kill at any moment leaves ``latest`` on the previous complete checkpoint, so a resume never
loses more than the work since it. A checkpoint whose files do not match their record is
reported as corrupt with the file named, never loaded silently. When ``latest`` is missing or
names a checkpoint that does not verify, :func:`resolve_resume_tag` falls back to the newest
checkpoint that does, and says which it skipped and why.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cpd_mtp.utils.files import atomic_write_text, fsync_path
from cpd_mtp.utils.records import check_files
from cpd_mtp.utils.records import read_record as read_folder_record
from cpd_mtp.utils.records import seal as seal_folder

MARKER = "cpd_mtp_complete.json"
LATEST = "latest"
# Temporary files of an `_atomic_write` killed before its rename.
_STALE_TMP = (f".{LATEST}.tmp*", f".{MARKER}.tmp*")
_TAG_RE = re.compile(r"step\d+")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or cannot be written."""


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def _disk_is_full(path: Path) -> bool:
    """Less than 1 MiB is left to this user on the file system holding ``path``."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False


@contextlib.contextmanager
def disk_full_is_an_error(path: Path) -> Iterator[None]:
    """Re-raise a full disk inside the block as a ``CheckpointError`` naming ``path``.

    The message says "No space left on device" and names ``path``, the file or folder being
    written, instead of a bare errno from deep inside a write. That is an ``OSError`` with
    ``ENOSPC``, and any other error raised while the disk is full: ``torch.save`` (DeepSpeed's
    writer) reports a failed write as a ``RuntimeError`` with no errno.
    """
    try:
        yield
    except Exception as err:
        enospc = isinstance(err, OSError) and err.errno == errno.ENOSPC
        if not enospc and (isinstance(err, OSError) or not _disk_is_full(path)):
            raise
        raise CheckpointError(
            f"No space left on device while writing {path} ({err}); free space and resume"
        ) from err


def _check_tag_name(checkpoint_dir: Path, tag: str) -> None:
    """A tag must name a folder directly inside ``checkpoint_dir``: no path, no ``..``."""
    if (
        not tag
        or tag in (".", "..")
        or "/" in tag
        or "\\" in tag
        or "\x00" in tag
        or os.path.isabs(tag)
    ):
        raise CheckpointError(
            f"refusing checkpoint tag {tag!r} in {checkpoint_dir}: a tag must name a folder "
            "inside the checkpoint directory (no '/', '..' or absolute path)"
        )


def _atomic_write(path: Path, text: str) -> None:
    """``atomic_write_text`` with a full disk reported as a ``CheckpointError`` naming ``path``."""
    with disk_full_is_an_error(path):
        atomic_write_text(path, text)


def _is_stale_tmp(path: Path) -> bool:
    return any(path.match(pattern) for pattern in _STALE_TMP)


def seal(checkpoint_dir: Path, tag: str, step: int, info: dict[str, Any] | None = None) -> None:
    """Record the files of a saved tag, then point ``latest`` at it. Rank 0 only.

    Every file of the tag and the tag folder are fsynced before ``latest`` moves, and the
    checkpoint folder after, so a power cut cannot leave ``latest`` on unwritten data.
    ``info`` (JSON-serialisable; the trainer stores the run's config and LR schedule) goes
    into the record next to ``step`` and ``files``; :func:`read_record` returns it.

    Raises:
        CheckpointError: the tag has no files, or the disk is full (the message names the path).
    """
    checkpoint_dir = Path(checkpoint_dir)
    _check_tag_name(checkpoint_dir, tag)
    tag_dir = checkpoint_dir / tag
    for stale in tag_dir.glob(f".{MARKER}.tmp*"):  # an earlier seal killed mid-write
        stale.unlink(missing_ok=True)
    paths = [p for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MARKER]
    if not paths:
        raise CheckpointError(f"checkpoint {tag_dir} has no files to seal")
    with disk_full_is_an_error(tag_dir):
        # A new entry is durable only once its folder is: sub-folders before the tag folder.
        for folder in sorted({p.parent for p in paths} - {tag_dir}, reverse=True):
            fsync_path(folder)
        seal_folder(
            tag_dir,
            MARKER,
            [str(p.relative_to(tag_dir)) for p in paths],
            {**(info or {}), "step": step},
        )
    _atomic_write(checkpoint_dir / LATEST, tag)
    with disk_full_is_an_error(checkpoint_dir):
        fsync_path(checkpoint_dir)  # the pointer's rename


def _read_record(tag_dir: Path) -> dict[str, Any]:
    """The completion record of ``tag_dir``, checked for shape; ``CheckpointError`` if not."""
    if not (tag_dir / MARKER).is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: no {MARKER} (killed mid-save?)")
    record = read_folder_record(tag_dir, MARKER, CheckpointError, f"checkpoint {tag_dir}")
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(
            f"checkpoint {tag_dir} has a malformed {MARKER}: 'step' must be a non-negative "
            f"integer, got {step!r}"
        )
    if not record["files"]:
        raise CheckpointError(f"checkpoint {tag_dir} has a malformed {MARKER}: no files")
    return record


def read_record(checkpoint_dir: Path, tag: str) -> dict[str, Any]:
    """The sealed record of ``tag`` (``step``, ``files`` and the ``info`` given to :func:`seal`),
    checked for shape but without hashing the files (:func:`verify` does that)."""
    checkpoint_dir = Path(checkpoint_dir)
    _check_tag_name(checkpoint_dir, tag)
    return _read_record(checkpoint_dir / tag)


def verify(checkpoint_dir: Path, tag: str) -> dict[str, Any]:
    """The sealed record of ``tag``; raises ``CheckpointError`` if a file is missing or changed.

    A record that is not of the shape ``seal`` writes (``files`` missing, a size that is not an
    integer, ...) is a ``CheckpointError`` too, as is a tag that is not a plain folder name.
    """
    checkpoint_dir = Path(checkpoint_dir)
    _check_tag_name(checkpoint_dir, tag)
    tag_dir = checkpoint_dir / tag
    record = _read_record(tag_dir)
    check_files(tag_dir, record, CheckpointError, f"checkpoint {tag_dir}")
    return record


def _read_latest(checkpoint_dir: Path) -> str | None:
    """The tag ``latest`` names (checked to be a folder name), or None without a pointer."""
    pointer = checkpoint_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        tag = pointer.read_text().strip()
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{pointer} is unreadable: {err}") from err
    _check_tag_name(checkpoint_dir, tag)
    return tag


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The tag ``latest`` points at (verified), or None when there is no checkpoint yet.

    Raises ``CheckpointError`` when that checkpoint does not verify; :func:`resolve_resume_tag`
    falls back to an older one instead.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tag = _read_latest(checkpoint_dir)
    if tag is not None:
        verify(checkpoint_dir, tag)
    return tag


def _step_tags(checkpoint_dir: Path) -> list[str]:
    """Checkpoint folders named like ``tag_for_step``, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    names = [p.name for p in checkpoint_dir.iterdir() if p.is_dir() and _TAG_RE.fullmatch(p.name)]
    return sorted(names, key=lambda name: int(name[4:]))


def resolve_resume_tag(checkpoint_dir: Path) -> tuple[str | None, list[str]]:
    """The checkpoint to resume from, and a warning for every checkpoint skipped on the way.

    That is the tag ``latest`` names when it verifies. When ``latest`` is missing, unreadable,
    names a folder outside ``checkpoint_dir`` or a checkpoint that does not verify, it is the
    newest checkpoint that verifies; the warnings name each skipped tag with the reason and the
    tag chosen. (None, []) when the folder holds no checkpoint at all.

    Raises:
        CheckpointError: there are checkpoints but none verifies (every reason is listed).
    """
    checkpoint_dir = Path(checkpoint_dir)
    reasons: list[str] = []
    latest: str | None = None
    try:
        latest = _read_latest(checkpoint_dir)
        if latest is not None:
            verify(checkpoint_dir, latest)
            return latest, []
        if _step_tags(checkpoint_dir):
            reasons.append(f"{checkpoint_dir / LATEST} is missing")
    except CheckpointError as err:
        reasons.append(f"skipping {latest or LATEST!r}: {err}")
    for tag in reversed(_step_tags(checkpoint_dir)):
        if tag == latest:
            continue
        try:
            verify(checkpoint_dir, tag)
        except CheckpointError as err:
            reasons.append(f"skipping {tag!r}: {err}")
            continue
        chosen = f"resuming from {tag!r} in {checkpoint_dir}, the newest checkpoint that verifies"
        return tag, [*reasons, chosen]
    if reasons:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir} verifies: " + "; ".join(reasons))
    return None, []


def resume_tag(checkpoint_dir: Path) -> str | None:
    """:func:`resolve_resume_tag`, with its warnings issued as ``UserWarning``s."""
    tag, notes = resolve_resume_tag(checkpoint_dir)
    for note in notes:
        warnings.warn(f"checkpoint recovery: {note}", stacklevel=2)
    return tag


def clean_stale(checkpoint_dir: Path) -> None:
    """Delete what killed saves left behind. Rank 0 only, with no save in progress.

    That is temporary files of an interrupted pointer or record write, and checkpoint folders
    without a completion record that are older than the newest complete checkpoint (a newer one
    may be a save still in progress on other ranks, so it is kept).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return
    for stale in checkpoint_dir.glob(f".{LATEST}.tmp*"):
        stale.unlink(missing_ok=True)
    tags = _step_tags(checkpoint_dir)
    complete = [tag for tag in tags if (checkpoint_dir / tag / MARKER).is_file()]
    newest = int(complete[-1][4:]) if complete else -1
    for tag in tags:
        tag_dir = checkpoint_dir / tag
        for stale in tag_dir.glob(f".{MARKER}.tmp*"):
            stale.unlink(missing_ok=True)
        if tag not in complete and int(tag[4:]) < newest:
            shutil.rmtree(tag_dir, ignore_errors=True)


def prune(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` sealed tags; never the one ``latest`` points at.

    Also deletes stale temporaries and incomplete older folders (:func:`clean_stale`).
    """
    checkpoint_dir = Path(checkpoint_dir)
    pointer = checkpoint_dir / LATEST
    current = pointer.read_text().strip() if pointer.is_file() else None
    clean_stale(checkpoint_dir)
    tags = [tag for tag in _step_tags(checkpoint_dir) if (checkpoint_dir / tag / MARKER).is_file()]
    for tag in tags[: max(len(tags) - keep, 0)]:
        if tag != current:
            shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)
