"""Cached trunk states: with a frozen trunk, compute its hidden states once per data set.

Heads-only training (the retrofit) runs the frozen trunk on the same blocks every epoch. This
module runs it once, stores the final hidden states (after the final norm: the input of the
lm_head) as a ``.npy`` beside the token ids, and hands out both, memory-mapped, for training.

A cache entry lives in ``<cache_root>/trunk_states/<key>/`` where the key is a hash of the
model (its config and every parameter's bytes), the tokens and the stored dtype, so a changed
model or data set never reads stale states. An entry is written into a temporary folder named
by its writer (``.<key>.tmp<pid>@<host>.<hex>``), every file and the folder are fsynced, and
the folder is renamed into place: a kill or a power cut leaves no half-written entry.

Writing is refused up front when the disk lacks the room (N x T x d x itemsize plus the ids),
and the hidden states are written with ordinary writes, not through a memory map, so a disk
that fills anyway gives a ``CacheError`` naming the file instead of a ``Bus error``.

Every open checks the entry (a damaged one is rebuilt with a warning naming it):

* ``meta.json``, the record: shapes, dtype, the byte size and SHA-256 of both files, and a
  SHA-256 of the record itself;
* ``tokens.npy``: its size, and its SHA-256 against the record (N x T int64, cheap);
* ``hidden.npy``: its header against the record and its size against the header. Its SHA-256
  is recorded at write but not checked on open, which would read hundreds of MB to GBs each
  time; ``verify_trunk_states`` checks it on demand.

Entries of older versions (a record without checksums) are kept when their sizes are right
and their ids equal the blocks.

``sweep_stale_temporaries(cache_root)`` removes the temporaries of killed runs (trunk states
and self-distillation); caching calls it first.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpd_mtp.utils.files import (
    STALE_TEMPORARY_AGE_S,
    durable_directory,
    owned_temporary,
    remove_stale_temporaries,
    sha256_file,
)
from cpd_mtp.utils.records import check_files, seal
from cpd_mtp.utils.records import read_record as read_sealed

STORE_DTYPES = {"float32": np.float32, "float16": np.float16}
# The record's layout: 3 is sealed by ``cpd_mtp.utils.records`` (the files' sizes and SHA-256),
# 2 had the same checksums and a checksum of its own, 1 (no "format" key) only shapes.
FORMAT = 3
# Room asked beyond the arrays' bytes: .npy headers and the record.
SMALL_FILES_BYTES = 1 << 16
# The caches ``sweep_stale_temporaries`` cleans, below the cache root.
SWEPT_FOLDERS = ("trunk_states", "self_distill")
# Names of ``atomic_directory`` temporaries of entries (older versions): no PID, so by age.
_ENTRY_TEMPORARY_RE = re.compile(r"^\.[0-9a-f]{24}\.[a-z0-9_]{8}$")


class CacheError(RuntimeError):
    """A cache entry cannot be written (too little space, a failed write) or is unreadable
    right after it was written. The message is one line naming the folder or file."""


class DamagedEntry(Exception):
    """A cache entry failed a check on open (the message says which file and how); the
    caches catch it, warn and rebuild the entry."""


def sweep_stale_temporaries(
    cache_root: str | os.PathLike[str], *, max_age_s: float = STALE_TEMPORARY_AGE_S
) -> list[Path]:
    """Remove the temporary files and folders of killed runs from the caches; return them.

    Looks in ``<cache_root>/trunk_states`` and ``<cache_root>/self_distill`` and their
    folders two levels down (self-distillation chunks). A temporary naming a PID of this
    machine is removed when that process is gone; one of another machine, or of an older
    version (no PID in the name), when untouched for ``max_age_s`` seconds. A live process's
    temporary is never removed. Finished entries and resumable self-distillation chunks are
    not temporaries and are kept.
    """
    root = Path(cache_root)
    removed: list[Path] = []
    for name in SWEPT_FOLDERS:
        level = [root / name]
        for depth in range(3):
            below = []
            for folder in level:
                removed += remove_stale_temporaries(
                    folder,
                    max_age_s=max_age_s,
                    unattributed=_ENTRY_TEMPORARY_RE if depth == 0 else None,
                )
                with contextlib.suppress(OSError):
                    below += [
                        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                    ]
            level = below
    return removed


@contextlib.contextmanager
def write_errors(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Re-raise an ``OSError`` of a write in the block as a one-line ``CacheError`` naming
    ``path`` (a full disk or quota says so)."""
    try:
        yield
    except OSError as err:
        where = err.filename or path
        reason = err.strerror or str(err) or type(err).__name__
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(
                f"{reason} while writing {where} ({what}); free space and rerun"
            ) from err
        raise CacheError(f"cannot write {where} ({what}): {reason}") from err


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale / 10:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e3:.2f} kB"


def required_bytes(blocks: int, block_size: int, hidden_size: int, itemsize: int) -> int:
    """The disk room a cache entry of (N, T, d) states of ``itemsize`` bytes asks for."""
    return blocks * block_size * (hidden_size * itemsize + 8) + SMALL_FILES_BYTES


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise CacheError(
            f"not enough space in {folder} to cache trunk states: needs {_size(needed)}, "
            f"{_size(free)} free"
        )


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's config and the bytes of every parameter and buffer."""
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        data = tensor.detach().cpu().contiguous()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def tokens_fingerprint(blocks: np.ndarray) -> str:
    """A hash of a (N, T) token array's shape and values."""
    array = np.ascontiguousarray(blocks, dtype=np.int64)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass
class TrunkStates:
    """Memory-mapped trunk states of N blocks: item i is (hidden (T, d) float32, ids (T,) int64)."""

    hidden: np.ndarray  # (N, T, d), memory-mapped
    tokens: np.ndarray  # (N, T) int64, memory-mapped
    path: Path

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.from_numpy(np.array(self.hidden[index], dtype=np.float32))
        return hidden, torch.from_numpy(np.array(self.tokens[index], dtype=np.int64))

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)


def _trunk_hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, d) of a HF causal LM (its base model's last_hidden_state)."""
    trunk = getattr(model, "base_model", model)
    out = trunk(input_ids=ids, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _config_hidden_size(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def cached_trunk_states(
    model: Any,
    blocks: np.ndarray,
    cache_dir: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    store_dtype: str = "float32",
    progress: bool = False,
) -> TrunkStates:
    """The trunk's hidden states for every block, computed once and memory-mapped.

    Args:
        model: a HF causal LM (or its trunk); run in eval mode, without gradients.
        blocks: (N, T) token ids.
        cache_dir: the cache root; the entry goes to ``cache_dir/trunk_states/<key>/``.
        batch_size: blocks per trunk forward.
        store_dtype: ``float32`` (exact) or ``float16`` (half the disk).
        progress: show a progress bar while computing.

    Returns:
        ``TrunkStates`` with ``hidden`` (N, T, d) and ``tokens`` (N, T).

    Raises:
        CacheError: the disk lacks room for the entry (checked before writing), or a write
            failed; one line naming the folder or file. Nothing is left behind.
    """
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 1:
        raise ValueError(f"blocks must be a non-empty (N, T) array, got shape {blocks.shape}")
    key = hashlib.blake2b(
        f"{model_fingerprint(model)}|{tokens_fingerprint(blocks)}|{store_dtype}".encode(),
        digest_size=12,
    ).hexdigest()
    dtype = np.dtype(STORE_DTYPES[store_dtype])
    entry = Path(cache_dir) / "trunk_states" / key
    sweep_stale_temporaries(cache_dir)
    if os.path.lexists(entry):
        try:
            return _open(entry, blocks, dtype)
        except DamagedEntry as why:
            warnings.warn(
                f"trunk-state cache entry {entry} is damaged ({why}); rebuilding it",
                stacklevel=2,
            )
            discard_entry(entry)
    _build(model, blocks, entry, batch_size, dtype, progress)
    try:
        return _open(entry, blocks, dtype)
    except DamagedEntry as why:
        raise CacheError(
            f"trunk-state cache entry {entry} is damaged right after it was written ({why}); "
            "delete it and rerun"
        ) from None


def discard_entry(entry: str | os.PathLike[str]) -> None:
    """Remove a cache entry: renamed aside first (atomic, to an owned temporary name that a
    sweep removes if this is killed), then deleted."""
    entry = Path(entry)
    aside = owned_temporary(entry)
    try:
        with write_errors(entry, "removing a damaged cache entry"):
            os.replace(entry, aside)
    except CacheError as err:
        if isinstance(err.__cause__, FileNotFoundError):
            return  # another process discarded it
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _build(model, blocks, entry: Path, batch_size: int, dtype: np.dtype, progress: bool) -> None:
    # Imported under another name: `progress` is the caller's on/off switch.
    from cpd_mtp.utils.progress import progress as progress_bar

    n_blocks, length = blocks.shape
    folder = entry.parent
    with write_errors(folder, "trunk-state cache"):
        folder.mkdir(parents=True, exist_ok=True)
    if (width := _config_hidden_size(model)) is not None:  # refuse before any forward
        _check_space(folder, required_bytes(n_blocks, length, width, dtype.itemsize))
    was_training = getattr(model, "training", False)
    model.eval()
    device = next(model.parameters()).device

    def forward(start: int) -> np.ndarray:
        ids = torch.from_numpy(blocks[start : start + batch_size].astype(np.int64)).to(device)
        return _trunk_hidden(model, ids).float().cpu().numpy()  # (b, T, d)

    try:
        first = forward(0)
        width = first.shape[-1]
        _check_space(folder, required_bytes(n_blocks, length, width, dtype.itemsize))
        with write_errors(entry, "trunk-state cache"), durable_directory(entry) as tmp:
            bar = progress_bar(
                total=n_blocks, desc="trunk states", unit="block", disable=not progress
            )
            tokens_path, hidden_path = tmp / "tokens.npy", tmp / "hidden.npy"
            with write_errors(tokens_path, "trunk-state cache"):
                np.save(tokens_path, np.ascontiguousarray(blocks, dtype=np.int64))
            digest = hashlib.sha256()
            with write_errors(hidden_path, "trunk-state cache"), hidden_path.open("wb") as out:
                header = {
                    "descr": np.lib.format.dtype_to_descr(dtype),
                    "fortran_order": False,
                    "shape": (n_blocks, length, width),
                }
                head = io.BytesIO()
                np.lib.format.write_array_header_1_0(head, header)
                out.write(head.getvalue())
                digest.update(head.getvalue())
                for start in range(0, n_blocks, batch_size):
                    hidden = first if start == 0 else forward(start)
                    _append(out, hidden, dtype, digest)
                    bar.update(len(hidden))
            bar.close()
            shapes = {
                "format": FORMAT,
                "blocks": n_blocks,
                "block_size": length,
                "hidden_size": width,
                "dtype": dtype.name,
            }
            with write_errors(tmp / "meta.json", "trunk-state cache"):
                seal(tmp, "meta.json", ["tokens.npy", "hidden.npy"], shapes,
                     digests={"hidden.npy": digest.hexdigest()})  # fmt: skip
    finally:
        model.train(was_training)


def _append(out, hidden: np.ndarray, dtype: np.dtype, digest) -> None:
    """Write a batch of states (ordinary writes: a full disk is an OSError, not a SIGBUS)."""
    data = memoryview(np.ascontiguousarray(hidden, dtype=dtype)).cast("B")
    out.write(data)
    digest.update(data)


def record_sha256(meta: dict[str, Any]) -> str:
    """The SHA-256 of a record's canonical JSON, its own ``record_sha256`` field left out."""
    body = {k: v for k, v in meta.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_record(entry: Path) -> dict[str, Any]:
    """An entry's ``meta.json``, checked (``cpd_mtp.utils.records``; an older record's own
    checksum); ``DamagedEntry`` if it fails."""
    path = entry / "meta.json"
    if not path.is_file():
        raise DamagedEntry(f"{path} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DamagedEntry(f"{path} is unreadable: {err}") from None
    if not isinstance(meta, dict):
        raise DamagedEntry(f"{path} is not a record")
    if meta.get("format") == FORMAT:
        return read_sealed(entry, "meta.json", DamagedEntry, str(path))
    if meta.get("format") == 2:
        if meta.get("record_sha256") != record_sha256(meta):
            raise DamagedEntry(f"{path} fails its checksum")
    elif "format" in meta:
        raise DamagedEntry(f"{path} has an unknown format {meta['format']!r}")
    return meta


def checked_npy(
    path: Path, shape: tuple[int | None, ...], dtype: np.dtype, recorded: dict | None = None
) -> np.ndarray:
    """Memory-map a ``.npy`` after checking its header (``shape``, None a free axis, and
    ``dtype``), its size against the header and, if given, the recorded byte size."""
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f".npy format {version} is not one this cache writes")
            found_shape, fortran, found_dtype = header
            offset = handle.tell()
            size = os.fstat(handle.fileno()).st_size
    except FileNotFoundError:
        raise DamagedEntry(f"{path} is missing") from None
    except (OSError, ValueError) as err:
        raise DamagedEntry(f"{path} has no readable .npy header ({err})") from None
    if (
        fortran
        or found_dtype != dtype
        or len(found_shape) != len(shape)
        or any(want is not None and got != want for got, want in zip(found_shape, shape))
    ):
        raise DamagedEntry(
            f"{path} holds {found_dtype} {found_shape}, expected {np.dtype(dtype)} "
            f"{tuple('?' if s is None else s for s in shape)}"
        )
    expected = offset + math.prod(found_shape) * found_dtype.itemsize
    if recorded is not None and recorded.get("bytes") != size:
        raise DamagedEntry(f"{path} is {size} bytes, the record says {recorded.get('bytes')}")
    if size != expected:
        raise DamagedEntry(f"{path} is {size} bytes, its header needs {expected}")
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DamagedEntry(f"{path} cannot be mapped ({err})") from None


def _open(entry: Path, blocks: np.ndarray | None, dtype: np.dtype | None) -> TrunkStates:
    """The entry, checked (sizes always, the ids' checksum): ``DamagedEntry`` if it fails."""
    meta = read_record(entry)
    try:
        shape = (int(meta["blocks"]), int(meta["block_size"]))
        stored = np.dtype(meta["dtype"])
    except (KeyError, TypeError, ValueError):
        raise DamagedEntry(f"{entry / 'meta.json'} lacks the shapes or dtype") from None
    if blocks is not None and shape != blocks.shape:
        raise DamagedEntry(f"{entry / 'meta.json'} records {shape} blocks, not {blocks.shape}")
    if dtype is not None and stored != dtype:
        raise DamagedEntry(f"{entry / 'meta.json'} records {stored}, not {dtype}")
    files = meta.get("files", {}) if "format" in meta else {}
    width = meta.get("hidden_size") if "format" in meta else None
    tokens_path = entry / "tokens.npy"
    tokens = checked_npy(tokens_path, shape, np.dtype(np.int64), files.get("tokens.npy"))
    if "format" in meta:  # the ids hashed (cheap), the states' size only (hundreds of MB)
        try:
            check_files(entry, meta, DamagedEntry, str(entry), size_only=["hidden.npy"])
        except DamagedEntry as why:
            raise DamagedEntry(str(why).replace("does not match its record (SHA-256)",
                                                "fails its SHA-256")) from None  # fmt: skip
    elif blocks is not None and not np.array_equal(tokens, blocks):
        raise DamagedEntry(f"{tokens_path} holds other ids than the blocks")
    hidden = checked_npy(entry / "hidden.npy", (*shape, width), stored, files.get("hidden.npy"))
    return TrunkStates(hidden=hidden, tokens=tokens, path=entry)


def verify_trunk_states(path: str | os.PathLike[str]) -> None:
    """Check a trunk-state entry fully, the SHA-256 of its hidden states included (an open
    checks only their size); a one-line ``CacheError`` naming what failed."""
    entry = Path(path)
    try:
        states = _open(entry, None, None)
        recorded = read_record(entry).get("files", {}).get("hidden.npy", {}).get("sha256")
        if recorded is None:
            raise DamagedEntry(f"{entry / 'meta.json'} records no SHA-256 (an older version)")
        if sha256_file(entry / "hidden.npy") != recorded:
            raise DamagedEntry(f"{entry / 'hidden.npy'} fails its SHA-256")
        del states
    except DamagedEntry as why:
        raise CacheError(f"trunk-state cache entry {entry} is damaged: {why}") from None
