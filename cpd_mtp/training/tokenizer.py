"""Byte-level BPE tokenizer for cpd_mtp corpora, and the on-disk cache it shares with `data`.

The tokenizer is trained with the `tokenizers` library and handed out as a
`transformers.PreTrainedTokenizerFast`, so it works with everything in the Hugging Face stack.
Trained tokenizers are cached under :func:`cache_root` keyed by the corpus fingerprint and the
vocabulary size; every entry is written with :func:`cpd_mtp.utils.files.atomic_directory`, so a
killed process never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from cpd_mtp.utils.files import atomic_directory, cache_root

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
DEFAULT_VOCAB_SIZE = 4096
# Bump when the training recipe changes so stale cache entries are not reused.
TOKENIZER_RECIPE = "bytelevel-bpe-v1"


def stable_hash(*parts: object, length: int = 16) -> str:
    """A short hex digest of ``parts`` (their ``repr``s), stable across processes and runs."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(repr(part).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:length]


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    length: int | None = None,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    The vocabulary holds at most ``vocab_size`` entries including the special tokens
    (``<|endoftext|>`` as eos and bos, ``<|pad|>`` as pad); a tiny corpus may give fewer, so use
    ``len(tokenizer)`` for the real size. Decoding inverts encoding exactly (no normaliser, no
    clean-up of spaces).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    return wrap_backend(backend)


def wrap_backend(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` trained by :func:`train_bpe_tokenizer` for transformers."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a local Hugging Face tokenizer directory (no hub access).

    Raises FileNotFoundError naming ``path`` when it does not exist, and ValueError when the
    tokenizer has no eos token (packing needs one to separate documents).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no eos token; packing needs one")
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable hash of a tokenizer's vocabulary, merges, pipeline and special token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return stable_hash(body, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer))


def tokenizer_cache_path(
    corpus_fingerprint: str, vocab_size: int, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the tokenizer for (corpus, vocab size) lives in the cache."""
    key = stable_hash(TOKENIZER_RECIPE, corpus_fingerprint, vocab_size)
    return cache_root(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{key}"


def load_or_train_tokenizer(
    texts: Iterable[str] | Callable[[], Iterable[str]] | None,
    corpus_fingerprint: str,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    length: int | None = None,
    verbose: bool = False,
) -> PreTrainedTokenizerFast:
    """Return the cached tokenizer for (corpus, vocab size), training and caching it on a miss.

    ``texts`` may be a zero-argument callable returning the iterable, so that a cache hit does
    not read the corpus at all.
    """
    path = tokenizer_cache_path(corpus_fingerprint, vocab_size, cache_dir)
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    if callable(texts):
        texts = texts()
    if texts is None:
        raise ValueError("no cached tokenizer and no texts to train one on")
    start = time.perf_counter()
    tokenizer = train_bpe_tokenizer(texts, vocab_size, length=length, show_progress=verbose)
    if verbose:
        print(f"trained a {len(tokenizer)}-token BPE in {time.perf_counter() - start:.1f} s")
    with atomic_directory(path) as tmp:
        tokenizer.save_pretrained(str(tmp))
    # Reload what is on disk: if another process won the race to write the entry, every
    # process must still use the same tokenizer.
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
