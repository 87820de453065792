"""A training run's folder: lock, refusal to clobber, resume point, sealed checkpoints, metrics.

    out_dir/
      .lock              an exclusive flock while a run holds the folder
      metrics.jsonl      one JSON record per step (cut back to the checkpoint on resume)
      checkpoints/       DeepSpeed checkpoints, sealed by ``checkpoint.seal``
      final/             the export, with ``cpd_mtp_run.json`` naming the checkpoint it came from

``cpd-mtp train`` and ``cpd-mtp retrofit`` both run in a :class:`RunDirectory`. Rank 0 does the
file work; every rank gets the same answer or the same error (a broadcast), so no process is
left waiting in a collective.

Completion is judged by the sealed record of the export matching the run's last checkpoint
(:meth:`RunDirectory.export_is_current`), never by a file existing: a re-export killed half
way, or one from before a resume with more steps, is written again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import torch

from cpd_mtp.training import checkpoint
from cpd_mtp.training.config import flatten
from cpd_mtp.utils.files import atomic_write_text

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
FINAL = "final"
RUN_FILES = (METRICS_FILE, "checkpoints", FINAL)  # what a run leaves in out_dir
# Written into the export: the checkpoint it was made from (tag, step, SHA-256 of its record).
EXPORT_STAMP = "cpd_mtp_run.json"

T = TypeVar("T")


class OutDirError(ValueError):
    """``out_dir`` holds another run, or a live run holds it, or it cannot be written."""


class ResumeMismatchError(ValueError):
    """The config changes what the checkpoint was trained on (the model or its data)."""


@dataclass
class ResumePoint:
    """The checkpoint a resume starts from: its tag, step and folder."""

    tag: str
    step: int
    path: Path


def note(message: str) -> None:
    """One line on stderr for the person running the job (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        import sys

        print(message, file=sys.stderr, flush=True)


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_line(record: dict[str, Any]) -> str:
    """One ``metrics.jsonl`` line. NaN and inf are not JSON: a non-finite value becomes null."""
    clean = {key: _finite_or_none(value) for key, value in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, list, dict)) else str(value).lower()


def changed_keys(
    old: dict[str, Any], new: dict[str, Any], keys: Sequence[str], free: Sequence[str] = ()
) -> list[str]:
    """``key old -> new`` for each flattened key that differs, matches one of ``keys`` (a key,
    or a prefix ending in ``.``) and is not one of ``free``."""
    old, new = flatten(old), flatten(new)

    def watched(key: str) -> bool:
        hit = any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)
        return hit and key not in free

    missing = object()
    names = [k for k in dict.fromkeys([*old, *new]) if watched(k)]
    return [
        f"{k} {_shown(old.get(k))} -> {_shown(new.get(k))}"
        for k in names
        if old.get(k, missing) != new.get(k, missing)
    ]


def sealed_info(config: dict[str, Any], resolved: dict[str, Any], rules: ResumeRules) -> dict:
    """What every checkpoint's sealed record stores: the run's config as given (compared on
    resume) and the schedule keys of the config as the run resolved them."""
    flat = flatten(resolved)
    return {"config": config, "schedule": {key: flat[key] for key in rules.schedule}}


@dataclass(frozen=True)
class ResumeRules:
    """What a resume must keep and what it may change.

    Attributes:
        fixed: keys of the stored config a resume must keep (a trailing ``.`` is a section):
            they change the model's shape or the data it sees, so the checkpoint would not fit.
        free: keys under ``fixed`` that only pick how the same loss is computed.
        schedule: keys that shape the LR schedule: a change is allowed, with a warning.
    """

    fixed: tuple[str, ...]
    free: tuple[str, ...] = ()
    schedule: tuple[str, ...] = ()


class RunDirectory:
    """The folder of one run, held (locked) by rank 0 for the life of the object."""

    def __init__(self, out_dir: str | os.PathLike[str], rank: int = 0, world: int = 1) -> None:
        self.path = Path(out_dir)
        self.rank, self.world = rank, world
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / METRICS_FILE
        self.final = self.path / FINAL
        self._lock: IO[str] | None = None

    # ------------------------------------------------------------------ collective answers
    def on_rank0(self, work: Callable[[], T], errors: tuple[type[BaseException], ...]) -> T:
        """``work()`` on rank 0, its answer (or its error, re-raised) on every rank."""
        answer: Any = None
        if self.rank == 0:
            try:
                answer = work()
            except errors as err:
                answer = err
        if self.world > 1:
            box = [answer]
            torch.distributed.broadcast_object_list(box, src=0)
            answer = box[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def barrier(self) -> None:
        if self.world > 1 or torch.distributed.is_initialized():
            torch.distributed.barrier()

    # ------------------------------------------------------------------ claim
    def existing_run(self) -> list[str]:
        """The files of an earlier run in the folder (metrics, checkpoints, export); [] if none."""
        found = []
        for name in RUN_FILES:
            path = self.path / name
            if path.is_file() or (path.is_dir() and any(path.iterdir())):
                found.append(name)
        return found

    def claim(self, resume: bool, overwrite: bool) -> None:
        """Lock the folder (rank 0), sweep what killed runs left, refuse to mix with a run.

        Raises:
            OutDirError: the folder is a file, cannot be written, is locked by a live run, or
                holds a run while neither ``resume`` nor ``overwrite`` is set.
        """

        def work() -> None:
            self._lock = lock_out_dir(self.path)
            try:
                self.sweep_stale()
                found = self.existing_run()
                if found and not resume and not overwrite:
                    raise OutDirError(
                        f"run.out_dir {str(self.path)!r} already holds a run "
                        f"({', '.join(found)}); pass --resume (run.resume=true) to continue it "
                        "or --overwrite (run.overwrite=true) to replace it"
                    )
                if resume and not found:
                    raise FileNotFoundError(
                        f"--resume (run.resume=true) but {self.path} holds no run to continue"
                    )
            except BaseException:
                self.close()
                raise

        self.on_rank0(work, (OutDirError, FileNotFoundError))

    def sweep_stale(self) -> list[Path]:
        """Remove what killed runs left in the folder (call with the lock held).

        The lock proves no live run uses the folder, so every temporary in it is stale:
        ``.final.tmp*`` (an export killed while writing) and ``.metrics.jsonl.tmp*``. A
        ``.final.old*`` is the previous export, moved aside by an export killed between its
        two renames: it is put back when ``final`` is missing, deleted otherwise.
        """
        removed: list[Path] = []
        if not self.path.is_dir():
            return removed
        for stale in self.path.glob(f".{FINAL}.old*"):
            if not self.final.exists():
                os.replace(stale, self.final)
                note(f"restored the previous export {self.final} from {stale.name}")
                continue
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
        for pattern in (f".{FINAL}.tmp*", f".{METRICS_FILE}.tmp*"):
            for stale in self.path.glob(pattern):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
                removed.append(stale)
        if removed:
            note(f"removed {len(removed)} temporaries left by a killed run in {self.path}")
        return removed

    def give_up_earlier_run(self) -> None:
        """Delete the earlier run's files (``--overwrite``), once the new run is built."""
        if self.rank == 0:
            for name in self.existing_run():
                path = self.path / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.barrier()

    def close(self) -> None:
        """Release the lock (also released when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ------------------------------------------------------------------ resume
    def resume_point(self, config: dict[str, Any], rules: ResumeRules) -> ResumePoint:
        """The checkpoint to resume from, checked against ``config``; call before heavy work.

        Rank 0 picks the newest checkpoint that verifies and refuses one whose stored config
        differs on a fixed key (``ResumeMismatchError`` naming the key and both values); every
        rank gets the same answer or error.
        """

        def work() -> ResumePoint:
            tag = checkpoint.resume_tag(self.checkpoints)  # falls back past a corrupt latest
            if tag is None:
                raise FileNotFoundError(
                    f"run.resume=true but {self.checkpoints} holds no checkpoint"
                )
            record = checkpoint.read_record(self.checkpoints, tag)
            point = ResumePoint(tag, int(record["step"]), self.checkpoints / tag)
            saved = record.get("config")
            if saved is None:
                note(
                    f"warning: checkpoint {point.path} stores no config (an older version "
                    "wrote it): the model and data settings cannot be checked against it"
                )
            else:
                changed = changed_keys(saved, config, rules.fixed, rules.free)
                if changed:
                    raise ResumeMismatchError(
                        f"cannot resume from {point.path}: {'; '.join(changed)} (checkpoint "
                        "-> now) changes the model or its data; set the checkpoint's values "
                        "back, or start a new run (--overwrite or another run.out_dir)"
                    )
            return point

        return self.on_rank0(work, (checkpoint.CheckpointError, ValueError, FileNotFoundError))

    def warn_reshaped_schedule(
        self, point: ResumePoint, schedule: dict[str, Any], rules: ResumeRules, steps: int
    ) -> None:
        """Warn (rank 0) when the LR schedule's keys differ from the checkpoint's."""
        if self.rank != 0:
            return
        stored = checkpoint.read_record(self.checkpoints, point.tag).get("schedule") or {}
        reshaped = changed_keys(stored, schedule, rules.schedule)
        if stored and reshaped and point.step < steps:
            note(
                f"warning: the cosine schedule is re-shaped: {', '.join(reshaped)} "
                f"(checkpoint -> now); steps 1-{point.step} followed the old schedule, "
                f"steps {point.step + 1}-{steps} follow the new one"
            )

    def is_complete(self, point: ResumePoint | None, steps: int, export: bool, more: str) -> bool:
        """Whether ``point`` already is the last of ``steps`` with a current export (then say
        so, with ``more``: how to train further). A finished run whose export is missing or
        stale is not complete: it writes the export without training."""
        if point is None or point.step < steps:
            return False
        if export and not self.export_is_current(point):
            note(f"the run is at step {point.step} of {steps}; writing its export {self.final}")
            return False
        note(
            f"the run is already complete: step {point.step} of {steps} (checkpoint "
            f"{point.path}); nothing to train. {more}"
        )
        return True

    def load(self, engine: Any, point: ResumePoint) -> dict[str, Any]:
        """Load ``point`` into the DeepSpeed ``engine``; returns the client state."""
        try:
            path, client = engine.load_checkpoint(str(self.checkpoints), tag=point.tag)
        except Exception as err:  # torch/DeepSpeed raise many types on a broken file
            raise checkpoint.CheckpointError(f"cannot load checkpoint {point.tag}: {err}") from err
        if path is None or client is None:
            raise checkpoint.CheckpointError(
                f"DeepSpeed found no checkpoint {point.tag} in {self.checkpoints}"
            )
        return client

    def save(
        self, engine: Any, step: int, client: dict[str, Any], info: dict[str, Any], keep: int
    ) -> None:
        """Save a DeepSpeed checkpoint of ``step``, seal it, prune to the newest ``keep``."""
        tag = checkpoint.tag_for_step(step)
        with checkpoint.disk_full_is_an_error(self.checkpoints / tag):
            engine.save_checkpoint(
                str(self.checkpoints), tag=tag, client_state=client, save_latest=False
            )
        self.barrier()
        if self.rank == 0:
            checkpoint.seal(self.checkpoints, tag, step, info)
            checkpoint.prune(self.checkpoints, keep)
        self.barrier()

    # ------------------------------------------------------------------ export
    def _checkpoint_stamp(self, tag: str) -> dict[str, Any]:
        marker = self.checkpoints / tag / checkpoint.MARKER
        digest = hashlib.sha256(marker.read_bytes()).hexdigest()
        return {"checkpoint": tag, "checkpoint_record_sha256": digest}

    def export_stamp(self, step: int) -> str:
        """The text of :data:`EXPORT_STAMP` for an export made at ``step`` (rank 0, after its
        checkpoint is sealed): which sealed checkpoint the exported weights are."""
        tag = checkpoint.tag_for_step(step)
        return json.dumps({"step": step, **self._checkpoint_stamp(tag)}, indent=1)

    def export_is_current(self, point: ResumePoint) -> bool:
        """Whether ``final/`` is a complete, verified export of the checkpoint ``point``."""

        def work() -> bool:
            from cpd_mtp.hf.export import ExportError, verify_export

            stamp_path = self.final / EXPORT_STAMP
            if not stamp_path.is_file():
                return False
            try:
                stamp = json.loads(stamp_path.read_text())
                if stamp != {"step": point.step, **self._checkpoint_stamp(point.tag)}:
                    return False
                return verify_export(self.final) is not None
            except (ValueError, OSError, ExportError):
                return False

        return self.on_rank0(work, ())

    # ------------------------------------------------------------------ metrics
    def log(self, record: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` (rank 0)."""
        if self.rank == 0:
            with self.metrics_path.open("a") as handle:
                handle.write(json_line(record))

    def cut_metrics(self, step: int) -> None:
        """Drop the records past ``step`` (a resume from it), and a torn last line (rank 0)."""
        if self.rank != 0 or not self.metrics_path.exists():
            return
        kept = []
        for number, line in enumerate(self.metrics_path.read_text().splitlines(), start=1):
            try:
                record_step = json.loads(line)["step"]
            except (json.JSONDecodeError, TypeError, KeyError):
                # A kill or a full disk mid-write leaves a torn last line: drop it, say so.
                where = f"{self.metrics_path}:{number}"
                warnings.warn(f"{where}: dropping an unreadable record {line[:80]!r}", stacklevel=2)
                continue
            if record_step <= step:
                kept.append(line)
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))


def lock_out_dir(out_dir: Path) -> IO[str]:
    """An exclusive ``flock`` on ``out_dir/.lock``, held while the returned handle is open.

    Fails at once when another process holds it. The kernel drops the lock when its process
    dies, so a killed run never leaves a stale lock behind.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise OutDirError(f"run.out_dir {str(out_dir)!r} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = (out_dir / LOCK_FILE).open("a")
    except OSError as err:  # a read-only filesystem, no permission, a full disk
        raise OutDirError(
            f"cannot write to run.out_dir {str(out_dir)!r}: {err.strerror or err}"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OutDirError(
            f"run.out_dir {str(out_dir)!r} is in use by another training run "
            f"(it holds {out_dir / LOCK_FILE})"
        ) from None
    return handle
