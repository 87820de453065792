"""Training data: the embedded standard-library corpus, user corpora, splitting and packing.

The one call most code needs is :func:`build_corpus`::

    corpus = build_corpus(DataConfig(block_size=256))
    corpus.tokenizer            # transformers tokenizer; len(corpus.tokenizer) is its vocab
    corpus.train[0]             # LongTensor [block_size]; input_ids = labels (the model shifts)
    corpus.validation_files     # names of held-out documents

The default source, ``"stdlib"``, is the Python standard library of the running interpreter
(``.py`` files under ``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded). A source
can instead be a list of user paths: text files, globs, directories, JSONL, Parquet, or a
directory written by ``datasets.Dataset.save_to_disk``.

Each document is tokenized, followed by the eos token, and the documents of a split are
concatenated and cut into ``block_size`` blocks (the tail that does not fill a block is dropped).
Token streams are cached as ``.npy`` files keyed by the corpus fingerprint, the tokenizer
fingerprint and the split, so later runs memory-map them; a cached stream that is unreadable or
holds an id outside the vocabulary (a corrupted file) is rebuilt with a warning naming it.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from cpd_mtp.training.sources import (
    Document,
    PathLike,
    check_max_files,
    discover_stdlib_files,
    load_documents,
    stdlib_documents,
    stdlib_root,
    user_documents,
)
from cpd_mtp.training.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    cache_root,
    load_or_train_tokenizer,
    load_tokenizer,
    stable_hash,
    tokenizer_fingerprint,
)

__all__ = [
    "Corpus",
    "DataConfig",
    "Document",
    "EpochSampler",
    "PackedDataset",
    "build_corpus",
    "cached_array",
    "discover_stdlib_files",
    "epoch_permutation",
    "held_out_prompts",
    "load_documents",
    "pack_blocks",
    "split_documents",
    "stdlib_documents",
    "stdlib_root",
    "token_dtype",
    "tokenize_documents",
    "user_documents",
]

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
        progress: show tqdm progress bars (only on a terminal).
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


# ----------------------------------------------------------------------------- packing


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids below ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenize_documents(
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    *,
    batch_size: int = 256,
    total: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Token ids of every text followed by eos, concatenated, as a 1-D uint16/uint32 array.

    Uses the tokenizer's Rust batch encoder when it has one; no other special tokens are added.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; packing needs one")
    dtype = token_dtype(len(tokenizer))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pieces: list[np.ndarray] = []
    bar = tqdm(total=total, desc="tokenizing", unit="doc", disable=None if progress else True)
    for batch in _batched(texts, batch_size):
        if backend is not None:
            ids = [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
        else:
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        pieces.extend(np.asarray([*row, eos], dtype=dtype) for row in ids)
        bar.update(len(batch))
    bar.close()
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def pack_blocks(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """View of ``tokens`` as [num_blocks, block_size]; the tail short of a block is dropped."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_blocks = len(tokens) // block_size
    return tokens[: num_blocks * block_size].reshape(num_blocks, block_size)


def _token_cache_problem(path: Path, vocab_size: int) -> str | None:
    """Why the cached token stream at ``path`` cannot be used, or None when it is sound.

    Checks that it loads as a 1-D array of the stream's dtype and that every id is below
    ``vocab_size``; a max over the memory map reads the file once, far cheaper than tokenizing.
    """
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:
        return f"it cannot be read ({error})"
    if array.ndim != 1 or array.dtype != token_dtype(vocab_size):
        return f"it holds a {array.dtype} array of shape {array.shape}, not a 1-D token stream"
    if array.size and (largest := int(array.max())) >= vocab_size:
        return f"it holds token id {largest}, outside the vocabulary of {vocab_size}"
    return None


def cached_array(
    path: Path, compute: Callable[[], np.ndarray], vocab_size: int | None = None
) -> np.ndarray:
    """Memory-map the ``.npy`` at ``path``, computing and writing it atomically on a miss.

    With ``vocab_size``, the file holds a token stream: a cached one that is unreadable, not a
    1-D array of :func:`token_dtype`, or holds an id >= ``vocab_size`` (a corrupted file) is
    rebuilt with a warning naming it; a freshly computed one that fails the check is an error.
    """
    if path.is_file() and vocab_size is not None:
        problem = _token_cache_problem(path, vocab_size)
        if problem is not None:
            warnings.warn(f"token cache {path} is invalid: {problem}; rebuilding it", stacklevel=2)
            path.unlink()
    if not path.is_file():
        array = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, array)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if vocab_size is not None and (problem := _token_cache_problem(path, vocab_size)):
            raise ValueError(f"the token stream written to {path} is invalid: {problem}")
    return np.load(path, mmap_mode="r")


class PackedDataset(Dataset[torch.Tensor]):
    """Fixed-length blocks of a token stream; item i is a LongTensor of ``block_size`` ids."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size
        self.blocks = pack_blocks(tokens, block_size)

    @property
    def num_tokens(self) -> int:
        """Tokens in the underlying stream, including the dropped tail."""
        return len(self.tokens)

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


class EpochSampler(Sampler[int]):
    """Sampler over :func:`epoch_permutation`, skipping the first ``start`` indices (resume)."""

    def __init__(self, num_blocks: int, seed: int = 0, epoch: int = 0, start: int = 0) -> None:
        self.num_blocks, self.seed, self.epoch, self.start = num_blocks, seed, epoch, start

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Move to ``epoch``, beginning at position ``start`` of its order."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        order = epoch_permutation(self.num_blocks, self.seed, self.epoch)[self.start :]
        return iter(order.tolist())

    def __len__(self) -> int:
        return max(0, self.num_blocks - self.start)


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
    documents: Sequence[Document],
    tokenizer: PreTrainedTokenizerBase,
    n: int = 4,
    prompt_tokens: int = 48,
) -> list[str]:
    """Up to ``n`` demo prompts from held-out documents, deterministically.

    Documents are visited in stable-hash order of their names; each gives at most one prompt:
    the first ``prompt_tokens`` tokens starting at its first function definition that has some
    body left after the prompt (or at the document start when it has no ``def``).
    """
    prompts: list[str] = []
    for doc in sorted(documents, key=lambda d: (_unit_hash(d.name), d.name)):
        if len(prompts) == n:
            break
        text = doc.text()
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
    train_documents: list[Document] = field(repr=False)
    validation_documents: list[Document] = field(repr=False)
    fingerprint: str = ""

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (``len(tokenizer)``)."""
        return len(self.tokenizer)

    @property
    def train_files(self) -> list[str]:
        """Names of the training documents."""
        return [d.name for d in self.train_documents]

    @property
    def validation_files(self) -> list[str]:
        """Names of the held-out documents."""
        return [d.name for d in self.validation_documents]

    def held_out_prompts(self, n: int = 4, prompt_tokens: int = 48) -> list[str]:
        """Demo prompts from validation documents; see :func:`held_out_prompts`."""
        return held_out_prompts(self.validation_documents, self.tokenizer, n, prompt_tokens)


def _split_tokens(
    docs: list[Document],
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    key_parts: tuple[str, ...],
    config: DataConfig,
) -> np.ndarray:
    key = stable_hash(*key_parts, split, [d.name for d in docs])
    path = cache_root(config.cache_dir) / "tokens" / f"{split}-{key}.npy"

    def compute() -> np.ndarray:
        texts = (d.text() for d in docs)
        return tokenize_documents(tokenizer, texts, total=len(docs), progress=config.progress)

    return cached_array(path, compute, vocab_size=len(tokenizer))


def build_corpus(config: DataConfig | None = None) -> Corpus:
    """Load, tokenize (training or loading a tokenizer), split and pack a corpus.

    Raises FileNotFoundError for a missing path and ValueError for an empty corpus or a split
    too small to fill one block.
    """
    config = config or DataConfig()
    docs, fingerprint = load_documents(config.source, config.text_field, config.max_files)
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    else:
        tokenizer = load_or_train_tokenizer(
            lambda: (d.text() for d in docs),
            fingerprint,
            config.vocab_size,
            cache_dir=config.cache_dir,
            length=len(docs),
            verbose=config.progress,
        )
    train_idx, val_idx = split_documents([d.name for d in docs], config.val_fraction)
    train_docs, val_docs = [docs[i] for i in train_idx], [docs[i] for i in val_idx]
    key_parts = (fingerprint, tokenizer_fingerprint(tokenizer))
    train_tokens = _split_tokens(train_docs, "train", tokenizer, key_parts, config)
    val_tokens = _split_tokens(val_docs, "validation", tokenizer, key_parts, config)
    train = PackedDataset(train_tokens, config.block_size)
    validation = PackedDataset(val_tokens, config.block_size)
    for name, data in (("train", train), ("validation", validation)):
        if len(data) == 0:
            raise ValueError(
                f"the {name} split has {data.num_tokens} tokens, fewer than block_size="
                f"{config.block_size}; use more data, a smaller block_size or a larger val_fraction"
            )
    return Corpus(config, tokenizer, train, validation, train_docs, val_docs, fingerprint)
