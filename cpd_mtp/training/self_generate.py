"""The model's own answers, with the trunk states it computed for them: a drafter's data.

A drafter learns what the verifier will say (Medusa-2; EAGLE; Kirchenbauer et al. 2026). The
frozen model answers prompts greedily through the library's own exact decoder
(``cpd_mtp.decoding.generate``, batched, one token per row and forward: on a CPU that is the
fastest way to make many tokens), and the decoder hands back the final hidden state of every
token it fed (``capture_states``): the prompt's in the prefill, then each new one. Those are the
head's inputs at training time, so no second pass over the text is needed, and every state is
computed with its whole true context (the chat template, the full prompt), as decoding will
see it.

The examples are stored in chunks of one generation batch each, under
``<cache>/self_generated/<key>/chunk-<i>/`` (``ids.npy``, ``bounds.npy``, ``states.npy`` and a
sealed ``chunk.json`` record, ``cpd_mtp.utils.records``), keyed by the model's fingerprint and
the settings, each chunk checked against its prompts. A rerun reuses the finished chunks and
generates the others, so a killed run loses one batch at most. A batch cut short by the
deadline is used but marked ``cut`` and made again by a later run with more time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpd_mtp.training.state_cache import model_fingerprint
from cpd_mtp.utils.files import durable_directory
from cpd_mtp.utils.records import RecordError, check_files, read_record, seal

__all__ = ["GeneratedExamples", "generate_examples"]

RECIPE = "self-generated-v1"  # bump when what a chunk holds changes
RECORD = "chunk.json"
# Prompts are batched in order, by windows of this many batches sorted by length.
SORT_WINDOW = 8


@dataclass
class GeneratedExamples:
    """Prompts and the model's continuations, with the trunk states of every token but the
    last of each.

    Attributes:
        ids: per example, (L,) int64 prompt + continuation.
        prompt_lengths: per example, how many of its ids are the prompt's.
        states: per example, (L - 1, d) the trunk's final hidden states (float16 or float32).
        seconds: wall-clock seconds spent generating in this call (chunks read from the cache
            cost none).
        made: new tokens generated in this call.
        cut: whether the deadline cut the last batch short.
    """

    ids: list[np.ndarray] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0
    made: int = 0
    cut: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def generated_tokens(self) -> int:
        return sum(len(x) - p for x, p in zip(self.ids, self.prompt_lengths))

    def extend(self, other: GeneratedExamples) -> None:
        self.ids += other.ids
        self.prompt_lengths += other.prompt_lengths
        self.states += other.states


def _digest(*parts: Any) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True).encode() + b"|")
    return digest.hexdigest()


class _Deadline:
    """A stopping criterion that ends every row once ``clock()`` passes ``deadline``."""

    def __init__(self, deadline: float, clock: Any = time.monotonic) -> None:
        self.deadline = deadline
        self.clock = clock
        self.hit = False

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        self.hit = self.hit or self.clock() > self.deadline
        return torch.full((input_ids.shape[0],), self.hit, dtype=torch.bool)


def _read_chunk(folder: Path, prompts_key: str, reuse_cut: bool) -> GeneratedExamples | None:
    """A finished chunk of these prompts, or None (absent, damaged, other prompts, or cut
    without ``reuse_cut``)."""
    if not (folder / RECORD).is_file():
        return None
    try:
        record = read_record(folder, RECORD)
        if record.get("prompts") != prompts_key or (record.get("cut") and not reuse_cut):
            return None
        check_files(folder, record, size_only=["states.npy"])
        ids = np.load(folder / "ids.npy")
        bounds = np.load(folder / "bounds.npy")
        states = np.load(folder / "states.npy", mmap_mode="r")
    except (RecordError, OSError, ValueError):
        return None
    out = GeneratedExamples()
    offset = 0
    for start, end, prompt_length in bounds.tolist():
        out.ids.append(ids[start:end])
        out.prompt_lengths.append(int(prompt_length))
        out.states.append(states[offset : offset + end - start - 1])
        offset += end - start - 1
    return out


def _write_chunk(folder: Path, chunk: GeneratedExamples, prompts_key: str, cut: bool) -> None:
    bounds, start = [], 0
    for ids, prompt_length in zip(chunk.ids, chunk.prompt_lengths):
        bounds.append((start, start + len(ids), prompt_length))
        start += len(ids)
    with durable_directory(folder) as tmp:
        np.save(tmp / "ids.npy", np.concatenate(chunk.ids).astype(np.int64))
        np.save(tmp / "bounds.npy", np.asarray(bounds, dtype=np.int64).reshape(-1, 3))
        np.save(tmp / "states.npy", np.concatenate(chunk.states))
        seal(tmp, RECORD, extra={"format": RECIPE, "prompts": prompts_key, "cut": cut})


@torch.no_grad()
def generate_examples(
    model: Any,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    cache_dir: str | os.PathLike[str],
    *,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    batch_size: int = 32,
    store_dtype: str = "float16",
    deadline: float | None = None,
    max_tokens: int | None = None,
    max_examples: int | None = None,
    reuse_cut: bool = False,
    progress: Any = None,
    clock: Any = time.monotonic,
) -> GeneratedExamples:
    """The model's greedy continuations of ``prompts``, with their trunk states.

    Args:
        model: a ``CPDMTPForCausalLM`` around the frozen model (its head is not used: the
            continuation is the model's own greedy decoding, one token per row and forward).
        prompts: token ids per prompt (chat prompts already through the template), in the order
            they are generated (a deadline keeps the first ones), but that every window of
            ``SORT_WINDOW`` batches is sorted by length (less padding in the prefill).
        new_tokens: most new tokens per prompt (a continuation stops after the model's EOS).
        cache_dir: the cache root; chunks go under ``self_generated/<key>/``.
        eos_token_id: the model's stop id(s); ``[]`` for none.
        pad_token_id: the padding id.
        batch_size: prompts per generation batch and per chunk.
        store_dtype: ``"float16"`` (half the disk and memory) or ``"float32"``.
        deadline: a ``time.monotonic()`` value: no batch starts after it, and the batch running
            then stops at it (its rows keep what they generated).
        max_tokens: no batch starts once the examples hold this many new tokens.
        max_examples: no batch starts once this many examples are made (the examples of an
            earlier run, read back: the batches are the same whatever the limit).
        reuse_cut: also reuse chunks a deadline cut short (a resumed run, which must train on
            what the interrupted run made); else they are made again.
        progress: called after each batch with (examples done, examples in all, tokens made
            in this call, seconds spent in this call); None: silent.
        clock: what ``deadline`` is read against (a test gives its own).

    Returns:
        The examples of the prompts done, in order.
    """
    from transformers import StoppingCriteriaList

    from cpd_mtp.decoding import generate
    from cpd_mtp.decoding.padding import left_pad

    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if store_dtype not in ("float16", "float32"):
        raise ValueError(f"store_dtype must be float16 or float32, got {store_dtype!r}")
    settings = {
        "recipe": RECIPE,
        "new_tokens": new_tokens,
        "eos": eos_token_id,
        "pad": pad_token_id,
        "dtype": store_dtype,
        "batch": batch_size,
    }
    # The trunk and W_U decide the text and the states; the (untrained) head does not.
    identity = [
        model_fingerprint(model.trunk),
        model_fingerprint(torch.nn.ParameterList([model.head.weight])),
    ]
    entry = Path(cache_dir) / "self_generated" / _digest(identity, settings)
    device = next(model.parameters()).device
    out = GeneratedExamples()
    start = time.monotonic()
    # Batches of prompts of similar length: a left-padded prefill computes the padding too.
    ordered = []
    for window in range(0, len(prompts), SORT_WINDOW * batch_size):
        group = [list(map(int, p)) for p in prompts[window : window + SORT_WINDOW * batch_size]]
        ordered += sorted(group, key=len)
    for first in range(0, len(ordered), batch_size):
        batch = ordered[first : first + batch_size]
        prompts_key = _digest(batch)
        folder = entry / f"chunk-{first // batch_size:06d}"
        if max_tokens is not None and out.generated_tokens >= max_tokens:
            break
        if max_examples is not None and len(out) >= max_examples:
            break
        chunk = _read_chunk(folder, prompts_key, reuse_cut)
        if chunk is None:
            if deadline is not None and clock() > deadline:
                break
            stop = _Deadline(deadline, clock) if deadline is not None else None
            ids, mask = left_pad([torch.tensor(p) for p in batch], pad_token_id)
            result = generate(
                model,
                ids.to(device),
                new_tokens,
                attention_mask=mask.to(device),
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                draft_tree=0,
                capture_states=True,
                stopping_criteria=StoppingCriteriaList([stop]) if stop is not None else None,
            )
            chunk = GeneratedExamples()
            for row, prompt in enumerate(batch):
                count = result.new_tokens_per_row[row]
                new = result.sequences[row, ids.shape[1] : ids.shape[1] + count].cpu().numpy()
                chunk.ids.append(np.concatenate([np.asarray(prompt, dtype=np.int64), new]))
                chunk.prompt_lengths.append(len(prompt))
                chunk.states.append(result.states[row].float().cpu().numpy().astype(store_dtype))
                out.made += count
            cut = stop is not None and stop.hit
            _write_chunk(folder, chunk, prompts_key, cut)
            out.cut = cut
        out.extend(chunk)
        out.seconds = time.monotonic() - start
        if progress is not None:
            progress(len(out), len(prompts), out.made, out.seconds)
        if out.cut:
            break
    return out
