"""Durable, atomic file writes: one implementation for checkpoints, exports, caches and logs.

A file is written to a temporary sibling, flushed and fsynced, then moved over the target with
``os.replace``; a kill or a failed write at any moment leaves either the old file or the new
one, never a torn or empty one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file, or a directory (a rename or a new entry is durable only once it is)."""
    path = Path(path)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_sibling(path: str | os.PathLike[str]) -> Path:
    """The temporary name a write of ``path`` uses: ``.<name>.tmp<pid>`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` by ``data`` in one step: a kill or a failed write leaves the old file."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no temporary left behind
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory that is renamed to ``target`` when the block succeeds.

    The rename is atomic, so ``target`` is either absent or complete. If ``target`` already
    exists when the block finishes (another process won a race), the temporary directory is
    discarded and the existing entry is kept.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- owned temporaries
# A temporary named by its writer, ``.<name>.tmp<pid>@<host>.<random>``, can be told apart
# from a live one after a kill: on the same host (and PID namespace) a dead PID means a dead
# writer. ``temporary_sibling`` (``.<name>.tmp<pid>``) and ``atomic_directory`` (``.<name>.``
# plus random characters) names carry no host, so only their age can tell.

# Unattributable temporaries (another host, or no PID in the name) untouched this long are stale.
STALE_TEMPORARY_AGE_S = 6 * 3600.0
_OWNED_TEMPORARY_RE = re.compile(
    r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9_-]+))?(?:\.[A-Za-z0-9_]+)?$"
)


def swap_in_directory(tmp: Path, target: Path, backup: Path) -> None:
    """Rename the finished folder ``tmp`` to ``target``: an existing ``target`` is moved to
    ``backup`` first (put back if the rename fails) and deleted only once the new one is in
    place; then the parent folder is fsynced. A kill leaves ``target`` or ``backup`` whole."""
    if target.exists():
        os.replace(target, backup)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(backup, target)  # put the old folder back
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_path(target.parent)


def host_tag() -> str:
    """This machine and PID namespace as a file-name-safe word: ``<hostname>-<pidns inode>``.

    Two containers may share a host name (``--network host``) but not a PID namespace, so a PID
    is compared only between writers with the same tag.
    """
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"
    try:
        namespace = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        namespace = ""
    return f"{host}-{namespace}" if namespace else host


def owned_temporary(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary name beside ``path`` naming its writer: ``.<name>.tmp<pid>@<host>.<hex>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}@{host_tag()}.{secrets.token_hex(4)}")


def temporary_owner(name: str) -> tuple[int, str | None] | None:
    """(pid, host tag or None) of a temporary's file name; None if it is not one with a PID."""
    match = _OWNED_TEMPORARY_RE.match(name)
    if match is None:
        return None
    return int(match["pid"]), match["host"]


def process_is_alive(pid: int) -> bool:
    """Whether a process with this PID exists here (another user's counts: it may be writing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True  # cannot tell: keep what it may own
    return True


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """fsync every file and folder under ``path`` (files first, each folder after its entries)."""
    path = Path(path)
    if not path.is_dir():
        fsync_path(path)
        return
    for folder, _, names in os.walk(path, topdown=False):
        for name in names:
            fsync_path(Path(folder) / name)
        fsync_path(folder)


def durable_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """``atomic_write_bytes`` through an ``owned_temporary`` (a sweep can tell a dead writer's
    leftover), with the folder fsynced after the rename so the new name is durable too."""
    path = Path(path)
    tmp = owned_temporary(path)
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


@contextlib.contextmanager
def durable_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """``atomic_directory`` made durable, in an ``owned_temporary`` folder.

    Every file and folder written in the block is fsynced before the rename that publishes
    ``target``, and the parent after it: a power cut leaves ``target`` absent or whole. If
    ``target`` already exists at the end (another process won a race), it is kept and the
    temporary folder discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = owned_temporary(target)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
        else:
            fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _newest_mtime(path: Path) -> float:
    """The latest modification time of ``path`` and, for a folder, of its direct entries."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            with contextlib.suppress(OSError):
                newest = max(newest, child.lstat().st_mtime)
    return newest


def remove_stale_temporaries(
    folder: str | os.PathLike[str],
    *,
    max_age_s: float = STALE_TEMPORARY_AGE_S,
    unattributed: re.Pattern[str] | None = None,
) -> list[Path]:
    """Remove the temporaries in ``folder`` (not below) whose writer is dead; return them.

    A temporary named ``.<name>.tmp<pid>@<host>...`` (``owned_temporary``) with this machine's
    ``host_tag`` is stale when no process has that PID. One of another host, or named
    ``.<name>.tmp<pid>`` (``temporary_sibling``), or matching ``unattributed`` (say the names
    of ``atomic_directory``), is stale when nothing in it changed for ``max_age_s`` seconds.
    A live writer's temporary is never removed. Errors (a vanished file, a permission) skip
    the temporary.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    here = host_tag()
    now = time.time()
    removed = []
    for path in sorted(folder.iterdir()):
        owner = temporary_owner(path.name)
        try:
            if owner is not None and owner[1] == here:
                stale = not process_is_alive(owner[0])
            elif owner is not None or (unattributed is not None and unattributed.match(path.name)):
                stale = now - _newest_mtime(path) > max_age_s
            else:
                continue
            if not stale:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cpd_mtp cache directory.

    Order of precedence: the explicit ``cache_dir`` argument, the ``CPD_MTP_CACHE`` environment
    variable, ``$XDG_CACHE_HOME/cpd_mtp``, then ``~/.cache/cpd_mtp``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if env := os.environ.get("CPD_MTP_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cpd_mtp"
