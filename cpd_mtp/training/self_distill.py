"""Self-generated distillation data: the base model continues prompts from the corpus.

The head of a retrofit should learn what the verifier will say, not what the corpus says
(Medusa-2; Kirchenbauer et al. 2026): the frozen base model continues prompts cut from the
training text, greedily or sampled at a temperature, and the head trains on the continuations
with the exact joint NLL. Generation is batched (left padding) through Hugging Face
``generate`` and cached on disk, keyed by the model, the prompts and the settings.

Each example is stored as (prompt + continuation) ids with a mask of which ids were generated;
``distillation_blocks`` turns them into fixed-length blocks whose labels ignore the prompt.

Generation resumes. Each batch (a chunk) is published as it completes, atomically and fsynced,
as ``<key>.partial-b<batch_size>/chunk-<index>.npz`` beside the entry; a rerun with the same
inputs reuses the finished chunks (each checked: its prompts, its layout, the zip CRCs) and
generates only the others. Chunk ``i`` is sampled with a seed drawn from (seed, i), so a
resumed run gives what an uninterrupted one gives. When all chunks are there, the entry
``<key>/`` (``ids.npy``, ``bounds.npy`` and a ``meta.json`` with their sizes and SHA-256) is
published in one rename and the chunks are removed. An open checks the whole entry (the data
is small): the checksums and that every example starts with its prompt; a damaged entry is
regenerated with a warning naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpd_mtp.ops.few_rows import few_row_linears
from cpd_mtp.training.state_cache import (
    FORMAT,
    CacheError,
    DamagedEntry,
    discard_entry,
    model_fingerprint,
    read_record,
    record_sha256,
    sweep_stale_temporaries,
    write_errors,
)
from cpd_mtp.utils.files import durable_directory, durable_write_bytes, sha256_file

IGNORE_INDEX = -100
_WHAT = "self-distillation cache"


@dataclass
class Continuations:
    """Prompts and the base model's continuations: ``ids[i]`` is prompt + continuation (int64),
    ``prompt_lengths[i]`` how many of its ids came from the corpus."""

    ids: list[np.ndarray]
    prompt_lengths: list[int]
    path: Path

    @property
    def generated_tokens(self) -> int:
        return sum(len(x) - p for x, p in zip(self.ids, self.prompt_lengths))


def _key(model: Any, prompts: Sequence[Sequence[int]], settings: dict[str, Any]) -> str:
    digest = hashlib.blake2b(digest_size=12)
    digest.update(model_fingerprint(model).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for prompt in prompts:
        digest.update(np.asarray(prompt, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()


def chunk_seed(seed: int, index: int) -> int:
    """The sampling seed of chunk ``index``: a function of (seed, index) alone, so a chunk
    generated on a resume is the chunk an uninterrupted run generates."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@torch.no_grad()
def generate_continuations(
    model: Any,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    cache_dir: str | os.PathLike[str],
    *,
    temperature: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    pad_token_id: int | None = None,
    progress: bool = False,
    stop: Callable[[int, float], bool] | None = None,
    max_examples: int | None = None,
) -> Continuations:
    """Continue every prompt with the base model; computed once per (model, prompts, settings).

    A killed run resumes: the batches finished before the kill are reused (see the module's
    docstring), and the result is the one an uninterrupted run gives.

    A time budget (``stop``) or ``max_examples`` stops early, after a whole batch: the result
    is then the continuations of the first prompts only (whole batches), kept as resumable
    chunks, so a later call with more time or more examples goes on from them.

    Args:
        model: a HF causal LM (the frozen base model).
        prompts: token-id lists, one per example.
        new_tokens: most new tokens per prompt (a continuation stops after the model's EOS).
        cache_dir: cache root; the entry goes to ``cache_dir/self_distill/<key>/``.
        temperature: 0 decodes greedily; > 0 samples at that temperature (no top-k / top-p).
        batch_size: prompts per ``generate`` call (left-padded), and per resumable chunk.
        seed: the sampling seed (the same seed and batch size give the same continuations).
        pad_token_id: the id used to left-pad batches; default the model's pad, else its EOS.
        progress: show a progress bar (resumed chunks count as done).
        stop: asked before each batch but the first (so the result is never empty) with the
            prompts done so far and the seconds the last batch took (0 for one read from
            disk); True stops there.
        max_examples: continue at most the first this many prompts (rounded up to a whole
            batch); ``None``: all of them.

    Returns:
        ``Continuations`` of all the prompts, or of the first ones when stopped early.

    Raises:
        CacheError: a write failed (a full disk, say); one line naming the file.
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be an int >= 1, got {new_tokens!r}")
    if not (temperature >= 0.0) or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    generation = model.generation_config
    settings = {
        "new_tokens": new_tokens,
        "temperature": temperature,
        "seed": seed,
        "eos": generation.eos_token_id,  # the stop token is not part of the weights' hash
        "pad": pad_token_id if pad_token_id is not None else generation.pad_token_id,
    }
    entry = Path(cache_dir) / "self_distill" / _key(model, prompts, settings)
    sweep_stale_temporaries(cache_dir)
    # Whole batches of the first max_examples prompts, wherever they come from.
    limit = len(prompts)
    if max_examples is not None:
        limit = min(limit, -(-max_examples // batch_size) * batch_size)
    if os.path.lexists(entry):
        try:
            return _leading(_open(entry, prompts, new_tokens), limit)
        except DamagedEntry as why:
            warnings.warn(
                f"self-distillation cache entry {entry} is damaged ({why}); generating it again",
                stacklevel=2,
            )
            discard_entry(entry)
    finished = _generate(
        model, prompts, new_tokens, entry, temperature, batch_size, seed, pad_token_id, progress,
        stop, max_examples,
    )  # fmt: skip
    if finished is not None:  # stopped early: the first prompts' chunks, as they are
        count = sum(len(x) for x in finished)
        ids = [x for chunk in finished for x in chunk]
        return Continuations(ids, [len(p) for p in prompts[:count]], entry)
    try:
        return _leading(_open(entry, prompts, new_tokens), limit)
    except DamagedEntry as why:
        raise CacheError(
            f"self-distillation cache entry {entry} is damaged right after it was written "
            f"({why}); delete it and rerun"
        ) from None


def _leading(data: Continuations, count: int) -> Continuations:
    """The first ``count`` examples of ``data``."""
    return Continuations(data.ids[:count], data.prompt_lengths[:count], data.path)


def _check_layout(
    flat: np.ndarray,
    bounds: np.ndarray,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    where: Path,
) -> None:
    """``flat`` and ``bounds`` (E, 3: start, end, prompt length) hold one example per prompt,
    back to back, each starting with its prompt and at most ``new_tokens`` longer."""
    if flat.ndim != 1 or flat.dtype != np.int64:
        raise DamagedEntry(f"{where}: the ids are {flat.dtype} {flat.shape}, not int64 (L,)")
    if bounds.shape != (len(prompts), 3) or bounds.dtype != np.int64:
        raise DamagedEntry(
            f"{where}: the bounds are {bounds.dtype} {bounds.shape}, not int64 ({len(prompts)}, 3)"
        )
    starts, ends, lengths = bounds.T
    if (
        starts[0] != 0
        or np.any(starts[1:] != ends[:-1])
        or ends[-1] != len(flat)
        or np.any(lengths < 1)
        or np.any(ends - starts < lengths)
        or np.any(ends - starts - lengths > new_tokens)
    ):
        raise DamagedEntry(f"{where}: the bounds do not tile the ids")
    for (start, _, length), prompt in zip(bounds, prompts):
        if length != len(prompt) or not np.array_equal(flat[start : start + length], prompt):
            raise DamagedEntry(f"{where}: an example does not start with its prompt")


def _open(entry: Path, prompts: Sequence[Sequence[int]], new_tokens: int) -> Continuations:
    """The entry, checked (record, checksums, layout): ``DamagedEntry`` if it fails."""
    meta = read_record(entry)
    arrays = {}
    for name in ("ids.npy", "bounds.npy"):
        path = entry / name
        if "format" in meta:
            recorded = meta.get("files", {}).get(name, {})
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise DamagedEntry(f"{path} is missing") from None
            if size != recorded.get("bytes"):
                raise DamagedEntry(
                    f"{path} is {size} bytes, the record says {recorded.get('bytes')}"
                )
            if sha256_file(path) != recorded.get("sha256"):
                raise DamagedEntry(f"{path} fails its SHA-256")
        try:
            arrays[name] = np.load(path)
        except FileNotFoundError:
            raise DamagedEntry(f"{path} is missing") from None
        except (OSError, ValueError) as err:
            raise DamagedEntry(f"{path} is unreadable ({err})") from None
    flat, bounds = arrays["ids.npy"], arrays["bounds.npy"]  # bounds (E, 3)
    _check_layout(flat, bounds, prompts, new_tokens, entry)
    ids = [flat[start:end] for start, end, _ in bounds]
    return Continuations(ids, [int(p) for _, _, p in bounds], entry)


def _read_chunk(path: Path, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[np.ndarray]:
    """A finished chunk's sequences, checked against its prompts: ``DamagedEntry`` if not."""
    try:
        with np.load(path) as archive:
            flat, bounds = archive["ids"], archive["bounds"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise DamagedEntry(f"{path} is unreadable ({err})") from None
    _check_layout(flat, bounds, prompts, new_tokens, path)
    return [flat[start:end] for start, end, _ in bounds]


def _layout(
    outputs: list[np.ndarray], prompts: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(x) for x in outputs], dtype=np.int64)
    ends = np.cumsum(lengths)
    bounds = np.stack([ends - lengths, ends, [len(p) for p in prompts]], axis=1)
    return np.concatenate(outputs).astype(np.int64), bounds.astype(np.int64)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _generate(
    model,
    prompts,
    new_tokens,
    entry,
    temperature,
    batch_size,
    seed,
    pad,
    progress,
    stop,
    max_examples,
) -> list[list[np.ndarray]] | None:
    """Generate the missing chunks and publish the entry; when ``stop`` or ``max_examples``
    ends it first, the finished leading chunks instead (the entry unpublished)."""
    # Imported under another name: `progress` is the caller's on/off switch.
    from cpd_mtp.utils.progress import progress as progress_bar

    generation = model.generation_config
    pad = pad if pad is not None else generation.pad_token_id
    eos = generation.eos_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    pad = 0 if pad is None else int(pad)
    device = next(model.parameters()).device
    starts = list(range(0, len(prompts), batch_size))
    wanted = len(starts)
    if max_examples is not None:
        wanted = min(wanted, -(-max_examples // batch_size))
    chunks = entry.with_name(f"{entry.name}.partial-b{batch_size}")
    done: dict[int, list[np.ndarray]] = {}
    for index, start in enumerate(starts[:wanted]):
        path = chunks / f"chunk-{index:06d}.npz"
        if not path.is_file():
            continue
        try:
            done[index] = _read_chunk(path, prompts[start : start + batch_size], new_tokens)
        except DamagedEntry as why:
            warnings.warn(f"{why}; generating that chunk again", stacklevel=3)
    resumed = sum(len(prompts[starts[i] : starts[i] + batch_size]) for i in done)
    bar = progress_bar(
        total=min(len(prompts), wanted * batch_size),
        desc="self-distillation",
        unit="prompt",
        disable=not progress,
        initial=resumed,
    )
    if progress and done:
        bar.write(
            f"self-distillation: resuming from {chunks}: {len(done)} of {len(starts)} chunks "
            f"({resumed} of {len(prompts)} prompts) already done"
        )
    was_training = model.training
    model.eval()
    last_s = 0.0
    try:
        for index, start in enumerate(starts[:wanted]):
            if index in done:
                continue
            if (entry / "meta.json").is_file():  # another process published the entry
                break
            if stop is not None and index > 0 and stop(start, last_s):
                break  # the budget is spent: keep what is done
            began = time.perf_counter()
            batch = [list(p) for p in prompts[start : start + batch_size]]
            torch.manual_seed(chunk_seed(seed, index))
            outputs = _generate_batch(model, batch, new_tokens, temperature, pad, eos, device)
            flat, bounds = _layout(outputs, batch)
            buffer = io.BytesIO()
            np.savez(buffer, ids=flat, bounds=bounds)
            path = chunks / f"chunk-{index:06d}.npz"
            with write_errors(path, _WHAT):
                chunks.mkdir(parents=True, exist_ok=True)
                durable_write_bytes(path, buffer.getvalue())
            done[index] = outputs
            bar.update(len(batch))
            last_s = time.perf_counter() - began
    finally:
        bar.close()
        model.train(was_training)
    if len(done) < len(starts) and not (entry / "meta.json").is_file():
        leading = 0
        while leading in done:
            leading += 1
        return [done[i] for i in range(leading)]
    if len(done) == len(starts):
        flat, bounds = _layout([x for i in range(len(starts)) for x in done[i]], prompts)
        with write_errors(entry, _WHAT), durable_directory(entry) as tmp:
            files = {}
            for name, array in (("ids.npy", flat), ("bounds.npy", bounds)):
                data = _npy_bytes(array)
                with write_errors(tmp / name, _WHAT):
                    (tmp / name).write_bytes(data)
                files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            meta = {"format": FORMAT, "examples": len(prompts), "files": files}
            meta["record_sha256"] = record_sha256(meta)
            with write_errors(tmp / "meta.json", _WHAT):
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    # The entry is published (here or by another process): the chunks of every batch size go.
    for partial in entry.parent.glob(f"{entry.name}.partial-b*"):
        shutil.rmtree(partial, ignore_errors=True)


def _generate_batch(model, batch, new_tokens, temperature, pad, eos, device) -> list[np.ndarray]:
    """(prompt + continuation) ids of each prompt of one left-padded ``generate`` call."""
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, prompt in enumerate(batch):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    # Each decoding step feeds one token per row: the few-row layout reads every weight
    # once per step on a CPU (on the machines measured, ~20x faster at 8-16 rows).
    with few_row_linears(model):
        out = model.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new_tokens,
            pad_token_id=pad,
            **(sampling if temperature > 0 else {"do_sample": False}),
        )
    new = out[:, width:].cpu().numpy()
    return [
        np.concatenate([np.asarray(prompt, dtype=np.int64), _until_eos(new[i], eos)])
        for i, prompt in enumerate(batch)
    ]


def _until_eos(tokens: np.ndarray, eos: int | list[int] | None) -> np.ndarray:
    """The generated ids up to and including the first EOS (HF pads after it)."""
    tokens = tokens.astype(np.int64)
    if eos is None:
        return tokens
    hits = np.flatnonzero(np.isin(tokens, np.atleast_1d(eos)))
    return tokens[: hits[0] + 1] if hits.size else tokens


def distillation_blocks(
    examples: Continuations, block_size: int, pad_token_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-length blocks for head training: (input ids, labels), both (E, block_size).

    Each example is cut (or right-padded with ``pad_token_id``) to ``block_size``; labels are
    the ids where they were generated and ``-100`` on the prompt and the padding, so the head
    learns the base model's own continuations given the corpus context.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    ids = np.full((len(examples.ids), block_size), pad_token_id, dtype=np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    for i, (seq, prompt) in enumerate(zip(examples.ids, examples.prompt_lengths)):
        seq = seq[:block_size]
        ids[i, : len(seq)] = seq
        labels[i, prompt : len(seq)] = seq[prompt:]
    return ids, labels
