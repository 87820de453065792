"""Crash-safe, verifiable model exports.

An export is written into a temporary folder next to its target and renamed into place only
when complete, with ``cpd_mtp_export.json`` recording every file's size and SHA-256. An
existing export at the target is moved aside first and deleted only after the new one is in
place, so a kill or an error at any point leaves the previous export readable.
``CPDMTPForCausalLM.from_pretrained`` checks the record when a local export carries one
(:func:`verify_export`) and refuses NaN or inf weights (:func:`check_finite`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cpd_mtp.utils.files import atomic_write_text, fsync_path, sha256_file

EXPORT_RECORD = "cpd_mtp_export.json"
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")

__all__ = [
    "EXPORT_RECORD",
    "ExportError",
    "atomic_export",
    "check_finite",
    "save_export",
    "set_special_tokens",
    "verify_export",
]


class ExportError(RuntimeError):
    """An export is corrupt (a file differs from its record) or holds non-finite weights."""


def set_special_tokens(model: Any, tokenizer: Any) -> None:
    """Copy the tokenizer's bos/eos/pad ids into the model's configs, in place.

    Written to ``model.config``, its ``text_config`` (when it has one) and
    ``model.generation_config``, so ``generate`` and pipelines stop on the tokenizer's eos and
    pad with its pad instead of the wrapped architecture's defaults.
    """
    ids = {name: getattr(tokenizer, name) for name in SPECIAL_TOKENS}
    configs = [model.config, getattr(model.config, "text_config", None)]
    configs.append(getattr(model, "generation_config", None))
    for config in configs:
        if config is not None:
            for name, value in ids.items():
                setattr(config, name, value)


def write_record(directory: Path) -> dict[str, Any]:
    """Fsync every file under ``directory`` and record its size and SHA-256 in ``EXPORT_RECORD``."""
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != EXPORT_RECORD:
            fsync_path(path)
            files[str(path.relative_to(directory))] = {
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
    record = {"files": files}
    atomic_write_text(directory / EXPORT_RECORD, json.dumps(record, indent=1))
    fsync_path(directory)
    return record


def verify_export(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Check every file of an export against its ``EXPORT_RECORD``; None when there is none.

    Raises:
        ExportError: naming the file that is missing or does not match its size or SHA-256, or
            the record itself when it is unreadable.
    """
    directory = Path(directory)
    marker = directory / EXPORT_RECORD
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
        entries = [(name, meta["bytes"], meta["sha256"]) for name, meta in record["files"].items()]
        for _, size, digest in entries:
            if not isinstance(size, int) or isinstance(size, bool) or not isinstance(digest, str):
                raise TypeError(f"bytes {size!r} / sha256 {digest!r:.80} have the wrong types")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ExportError(f"export {directory} has an unreadable {EXPORT_RECORD}: {err!r}") from err
    for name, size, digest in entries:
        path = directory / name
        # Lexically, not resolved: files of a Hub cache snapshot are links into its blobs.
        if os.path.isabs(name) or ".." in Path(name).parts:
            raise ExportError(f"export {directory}: {EXPORT_RECORD} names {name!r}, outside it")
        if not path.is_file():
            raise ExportError(f"export {directory} is corrupt: {name} is missing")
        if path.stat().st_size != size or sha256_file(path) != digest:
            raise ExportError(
                f"export {directory} is corrupt: {name} does not match its SHA-256 in "
                f"{EXPORT_RECORD}"
            )
    return record


def check_finite(model: torch.nn.Module, source: str | os.PathLike[str] | None = None) -> None:
    """Raise ``ExportError`` naming the first parameter or buffer with a NaN or inf entry.

    Partitioned (ZeRO-3, zero local elements) and meta tensors are skipped.
    """
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.is_meta:
            continue
        if not bool(torch.isfinite(tensor).all()):
            where = f" loaded from {source}" if source is not None else ""
            raise ExportError(f"weight {name}{where} holds NaN or inf values; refusing to use it")


@contextlib.contextmanager
def atomic_export(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; on success it becomes ``target``.

    On leaving the block the folder's files are fsynced and recorded (``EXPORT_RECORD``), an
    existing ``target`` is renamed aside, the new folder renamed to ``target``, and only then the
    old one deleted. An exception inside the block leaves ``target`` as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had our pid
    tmp.mkdir()  # not mkdtemp: the export keeps the usual (umask) permissions
    backup = target.with_name(f".{target.name}.old{os.getpid()}")
    try:
        yield tmp
        write_record(tmp)
        if target.exists():
            os.replace(target, backup)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(backup, target)  # put the old export back
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def save_export(
    model: Any,
    tokenizer: Any,
    target: str | os.PathLike[str],
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to ``target`` through :func:`atomic_export`.

    The tokenizer's bos/eos/pad ids are written into the model's configs first
    (:func:`set_special_tokens`). ``extra_files`` maps file names to text written alongside.
    """
    set_special_tokens(model, tokenizer)
    with atomic_export(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(target)
