"""Training data: tokenizing, splitting and packing a corpus with ``datasets``.

The one call most code needs is :func:`build_corpus`::

    corpus = build_corpus(DataConfig(block_size=256))
    corpus.tokenizer            # transformers tokenizer; len(corpus.tokenizer) is its vocab
    corpus.train[0]             # LongTensor [block_size]; input_ids = labels (the model shifts)
    corpus.validation_files     # names of held-out documents

Documents come from :mod:`cpd_mtp.training.sources` as a ``datasets.Dataset`` of
``{name, text}``. Each document is tokenized by a batched ``Dataset.map`` (the tokenizer's Rust
batch encoder), followed by the eos token; the documents of a split are concatenated and cut
into ``block_size`` blocks by a second map (the tail that does not fill a block is dropped).
Both maps are cached as Arrow files under ``cache_root()/tokens``, named by a fingerprint of the
corpus, the tokenizer, the split and the block size, and memory-mapped by later runs; a cached
file that is unreadable or holds an id outside the vocabulary (a corrupted file) is rebuilt
with a warning naming it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import PreTrainedTokenizerBase

from cpd_mtp.training.sources import (
    PathLike,
    check_max_files,
    load_documents,
)
from cpd_mtp.training.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    load_or_train_tokenizer,
    load_tokenizer,
    stable_hash,
    tokenizer_fingerprint,
)
from cpd_mtp.utils.extras import require
from cpd_mtp.utils.files import cache_root

datasets = require("datasets", "cpd_mtp.training.data")

__all__ = [
    "Corpus",
    "DataConfig",
    "PackedDataset",
    "build_corpus",
    "epoch_permutation",
    "held_out_prompts",
    "num_tokens",
    "pack",
    "pack_blocks",
    "split_documents",
    "token_dtype",
    "tokenize",
]

# Bump when tokenizing or packing changes so stale cache files are not reused.
TOKENS_RECIPE = "eos-after-each-document-v2"
_DEF_LINE = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+\w+[ \t]*\(", re.MULTILINE)


@dataclass
class DataConfig:
    """Where the training text comes from and how it is tokenized and packed.

    Attributes:
        source: ``"stdlib"`` or one path / glob / directory, or a list of them.
        vocab_size: vocabulary of the BPE trained on the corpus (ignored with ``tokenizer``).
        tokenizer: optional local Hugging Face tokenizer directory to use instead of training.
        block_size: tokens per training example.
        val_fraction: expected fraction of documents held out for validation (0 < f < 1);
            at least one document is always held out.
        cache_dir: cache root; defaults to ``$CPD_MTP_CACHE`` or ``~/.cache/cpd_mtp``.
        max_files: keep only the first ``max_files`` documents (sorted), for quick runs;
            None keeps all, anything below 1 is a ValueError.
        text_field: the text field of JSONL records, Parquet tables and HF datasets.
        progress: show progress bars (only on a terminal).
    """

    source: PathLike | Sequence[PathLike] = "stdlib"
    vocab_size: int = DEFAULT_VOCAB_SIZE
    tokenizer: PathLike | None = None
    block_size: int = 256
    val_fraction: float = 0.03
    cache_dir: PathLike | None = None
    max_files: int | None = None
    text_field: str = "text"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_files is not None:
            check_max_files(self.max_files)


# ----------------------------------------------------------------------------- split


def _unit_hash(name: str) -> float:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_documents(names: Sequence[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split by a stable hash of each document name.

    A document goes to validation when its hash, mapped to [0, 1), is below ``val_fraction``,
    so its side does not depend on the rest of the corpus. Both sides are made non-empty (the
    lowest-hash document is always in validation, the highest-hash one always in train).
    Returns (train indices, validation indices), each ascending.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(names) < 2:
        raise ValueError(f"a train/validation split needs at least 2 documents, got {len(names)}")
    scores = [_unit_hash(n) for n in names]
    order = sorted(range(len(names)), key=lambda i: (scores[i], names[i]))
    held = {i for i in order if scores[i] < val_fraction} | {order[0]}
    held.discard(order[-1])
    train = [i for i in range(len(names)) if i not in held]
    return train, sorted(held)


# ----------------------------------------------------------------------------- tokens


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids below ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_batch(batch: pa.Table, tokenizer: PreTrainedTokenizerBase, dtype: np.dtype) -> pa.Table:
    """``input_ids`` of each row's ``text`` followed by eos, as an Arrow list column.

    Uses the tokenizer's Rust batch encoder when it has one; no other special tokens are added.
    """
    texts = batch.column("text").to_pylist()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        rows = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ends = np.cumsum([len(row) + 1 for row in rows], dtype=np.int64)
    flat = np.full(int(ends[-1]) if len(rows) else 0, tokenizer.eos_token_id, dtype=dtype)
    for row, end in zip(rows, ends, strict=True):
        flat[end - 1 - len(row) : end - 1] = row
    offsets = pa.array(np.concatenate([[0], ends]).astype(np.int32))
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(flat))})


def pack_blocks(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """View of ``tokens`` as [num_blocks, block_size]; the tail short of a block is dropped."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_blocks = len(tokens) // block_size
    return tokens[: num_blocks * block_size].reshape(num_blocks, block_size)


def pack_batch(batch: pa.Table, block_size: int) -> pa.Table:
    """The rows' ``input_ids`` concatenated and cut into [num_blocks, block_size] blocks."""
    stream = pc.list_flatten(batch.column("input_ids")).combine_chunks()
    blocks = pack_blocks(stream.to_numpy(zero_copy_only=False), block_size)
    values = pa.array(blocks.reshape(-1), type=stream.type)
    return pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(values, block_size)})


def _token_problem(dataset: datasets.Dataset, vocab_size: int) -> str | None:
    """Why a dataset of token ids cannot be used, or None when it is sound.

    Checks the id type and that every id is below ``vocab_size``; a max over the memory map
    reads the file once, far cheaper than tokenizing.
    """
    if dataset.column_names != ["input_ids"]:
        return f"it holds the columns {dataset.column_names}, not input_ids"
    column = dataset.data.column("input_ids")
    expected = pa.from_numpy_dtype(token_dtype(vocab_size))
    kind = column.type
    if not pa.types.is_list(kind) and not pa.types.is_fixed_size_list(kind):
        return f"it holds {kind}, not lists of token ids"
    if kind.value_type != expected:
        return f"it holds {kind.value_type} ids, not {expected}"
    largest = pc.max(pc.list_flatten(column)).as_py()
    if largest is not None and largest >= vocab_size:
        return f"it holds token id {largest}, outside the vocabulary of {vocab_size}"
    return None


def cached_map(
    dataset: datasets.Dataset,
    function: Callable[[pa.Table], pa.Table],
    cache_file: Path,
    fingerprint: str,
    vocab_size: int,
    **map_kwargs: object,
) -> datasets.Dataset:
    """``dataset.map(function, batched=True)`` of Arrow batches into ``cache_file``, checked.

    The fingerprint is ours (corpus, tokenizer, split, block size), not one hashed from the
    function: hashing a tokenizer by pickling it is slow and not stable between calls. A cached
    file that cannot be read or fails :func:`_token_problem` is rebuilt with a warning naming
    it; a freshly written one that fails is a ValueError naming it.
    """
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        cached = cache_file.is_file()
        try:
            out = dataset.with_format("arrow").map(
                function,
                batched=True,
                cache_file_name=str(cache_file),
                new_fingerprint=fingerprint,
                load_from_cache_file=True,
                remove_columns=dataset.column_names,
                **map_kwargs,
            )
            problem = _token_problem(out, vocab_size)
        except Exception as error:  # a torn or foreign file fails to load in many ways
            if not cached:
                raise
            problem = f"it cannot be read ({type(error).__name__}: {error})"
        if problem is None:
            return out.with_format(None)
        if not cached:
            raise ValueError(f"the token cache written to {cache_file} is invalid: {problem}")
        warnings.warn(
            f"token cache {cache_file} is invalid: {problem}; rebuilding it", stacklevel=2
        )
        cache_file.unlink()
    raise AssertionError("unreachable")


def tokenize(
    documents: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    cache_file: Path,
    *,
    fingerprint: str | None = None,
    batch_size: int = 256,
) -> datasets.Dataset:
    """Per-document token ids: a Dataset with one column ``input_ids`` (uint16/uint32 lists).

    Row i is the ids of ``documents[i]["text"]`` followed by eos, cached in ``cache_file``.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; packing needs one")
    vocab = len(tokenizer)
    encode = functools.partial(encode_batch, tokenizer=tokenizer, dtype=token_dtype(vocab))
    fingerprint = fingerprint or stable_hash(TOKENS_RECIPE, cache_file.name)
    return cached_map(
        documents, encode, cache_file, fingerprint, vocab, batch_size=batch_size, desc="tokenizing"
    )


def num_tokens(tokens: datasets.Dataset) -> int:
    """Total length of the ``input_ids`` rows of ``tokens`` (selected rows only)."""
    lengths = pc.list_value_length(tokens.with_format("arrow")["input_ids"])
    return int(pc.sum(lengths).as_py() or 0)


def pack(
    tokens: datasets.Dataset,
    block_size: int,
    vocab_size: int,
    cache_file: Path,
    *,
    fingerprint: str | None = None,
) -> datasets.Dataset:
    """The rows of ``tokens`` concatenated and cut into blocks, cached in ``cache_file``.

    One column ``input_ids`` of fixed-size lists [num_blocks, block_size]; the tail short of a
    block is dropped. Written as one Arrow record batch, so :class:`PackedDataset` views it
    without a copy.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_blocks = num_tokens(tokens) // block_size
    fingerprint = fingerprint or stable_hash(TOKENS_RECIPE, cache_file.name)
    return cached_map(
        tokens,
        functools.partial(pack_batch, block_size=block_size),
        cache_file,
        fingerprint,
        vocab_size,
        batch_size=None,
        writer_batch_size=max(1, num_blocks),
        desc="packing",
    )


class PackedDataset(torch.utils.data.Dataset[torch.Tensor]):
    """Fixed-length blocks; item i is a LongTensor of ``block_size`` ids.

    Args:
        blocks: [num_blocks, block_size] token ids (a memory-mapped view of the cache).
        num_tokens: tokens of the split before packing, including the dropped tail.
    """

    def __init__(self, blocks: np.ndarray, num_tokens: int | None = None) -> None:
        self.blocks = blocks
        self.block_size = blocks.shape[1]
        self.num_tokens = blocks.size if num_tokens is None else num_tokens

    @classmethod
    def from_dataset(cls, packed: datasets.Dataset, num_tokens: int | None = None) -> PackedDataset:
        """View the ``input_ids`` column of :func:`pack`'s output as a [N, block_size] array."""
        column = packed.data.column("input_ids")
        block_size = column.type.list_size
        chunks = [c.flatten().to_numpy(zero_copy_only=False) for c in column.chunks]
        flat = chunks[0] if len(chunks) == 1 else np.concatenate(chunks) if chunks else None
        if flat is None:
            flat = np.zeros(0, token_dtype(2 ** (8 * column.type.value_type.byte_width)))
        return cls(flat.reshape(-1, block_size), num_tokens)

    @property
    def tokens(self) -> np.ndarray:
        """The packed ids as one stream [num_blocks * block_size] (the tail is not kept)."""
        return self.blocks.reshape(-1)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.blocks[index].astype(np.int64))


def epoch_permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The block order of ``epoch``: a permutation of range(num_blocks), fixed by (seed, epoch).

    A loop that stopped after k blocks of an epoch resumes exactly with ``perm[k:]``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(num_blocks)


# ----------------------------------------------------------------------------- prompts


def _prefix_tokens(tokenizer: PreTrainedTokenizerBase, text: str, num_tokens: int) -> str:
    """The longest decoded prefix of ``text`` spanning at most ``num_tokens`` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:num_tokens]
    for end in range(len(ids), 0, -1):
        decoded = tokenizer.decode(ids[:end])
        if text.startswith(decoded):
            return decoded
    return tokenizer.decode(ids)


def held_out_prompts(
    documents: Iterable[Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    n: int = 4,
    prompt_tokens: int = 48,
) -> list[str]:
    """Up to ``n`` demo prompts from held-out documents, deterministically.

    ``documents`` are rows with ``name`` and ``text`` (a documents ``datasets.Dataset`` or a
    list of dicts). They are visited in stable-hash order of their names; each gives at most
    one prompt: the first ``prompt_tokens`` tokens starting at its first function definition
    that has some body left after the prompt (or at the document start when it has no ``def``).
    """
    prompts: list[str] = []
    rows = sorted(documents, key=lambda d: (_unit_hash(d["name"]), d["name"]))
    for doc in rows:
        if len(prompts) == n:
            break
        text = doc["text"]
        starts = [m.start() for m in _DEF_LINE.finditer(text)] or [0]
        window = prompt_tokens * 16
        for start in starts:
            snippet = text[start : start + 2 * window]
            if len(snippet.strip()) > window // 4:
                prompts.append(_prefix_tokens(tokenizer, snippet[:window], prompt_tokens))
                break
    return prompts


# ----------------------------------------------------------------------------- entry point


@dataclass
class Corpus:
    """A tokenized, split and packed corpus; see :func:`build_corpus`."""

    config: DataConfig
    tokenizer: PreTrainedTokenizerBase
    train: PackedDataset
    validation: PackedDataset
    train_documents: datasets.Dataset = field(repr=False)
    validation_documents: datasets.Dataset = field(repr=False)
    fingerprint: str = ""

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (``len(tokenizer)``)."""
        return len(self.tokenizer)

    @property
    def train_files(self) -> list[str]:
        """Names of the training documents."""
        return list(self.train_documents["name"])

    @property
    def validation_files(self) -> list[str]:
        """Names of the held-out documents."""
        return list(self.validation_documents["name"])

    def held_out_prompts(self, n: int = 4, prompt_tokens: int = 48) -> list[str]:
        """Demo prompts from validation documents; see :func:`held_out_prompts`."""
        return held_out_prompts(self.validation_documents, self.tokenizer, n, prompt_tokens)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """``datasets``' progress bars on or off for the block, restored afterwards."""
    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


def _texts(documents: datasets.Dataset) -> Iterator[str]:
    for batch in documents.select_columns(["text"]).iter(batch_size=256):
        yield from batch["text"]


def build_corpus(config: DataConfig | None = None) -> Corpus:
    """Load, tokenize (training or loading a tokenizer), split and pack a corpus.

    Raises FileNotFoundError for a missing path and ValueError for an empty corpus or a split
    too small to fill one block.
    """
    config = config or DataConfig()
    with _progress_bars(config.progress):
        docs, fingerprint = load_documents(
            config.source, config.text_field, config.max_files, config.cache_dir
        )
        if config.tokenizer is not None:
            tokenizer = load_tokenizer(config.tokenizer)
        else:
            tokenizer = load_or_train_tokenizer(
                lambda: _texts(docs),
                fingerprint,
                config.vocab_size,
                cache_dir=config.cache_dir,
                length=len(docs),
                verbose=config.progress,
            )
        names = list(docs["name"])
        train_idx, val_idx = split_documents(names, config.val_fraction)
        cache = cache_root(config.cache_dir) / "tokens"
        key = stable_hash(TOKENS_RECIPE, fingerprint, tokenizer_fingerprint(tokenizer))
        tokens = tokenize(docs, tokenizer, cache / f"documents-{key}.arrow", fingerprint=key)
        splits = {}
        for split, index in (("train", train_idx), ("validation", val_idx)):
            part = tokens.select(index)
            total = num_tokens(part)
            split_key = stable_hash(key, split, [names[i] for i in index], config.block_size)
            name = f"{split}-{split_key}-block{config.block_size}.arrow"
            packed = pack(
                part, config.block_size, len(tokenizer), cache / name, fingerprint=split_key
            )
            splits[split] = PackedDataset.from_dataset(packed, total)
            if len(splits[split]) == 0:
                raise ValueError(
                    f"the {split} split has {total} tokens, fewer than block_size="
                    f"{config.block_size}; use more data, a smaller block_size or a larger "
                    "val_fraction"
                )
    return Corpus(
        config,
        tokenizer,
        splits["train"],
        splits["validation"],
        docs.select(train_idx),
        docs.select(val_idx),
        fingerprint,
    )
