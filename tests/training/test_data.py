"""Tests for cpd_mtp.training.data, each against a direct reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from data_builders import (  # noqa: F401 (the fixtures are used by name)
    SMALL_VOCAB,
    TEXTS,
    _isolated_cache,
    reference_stream,
    small_tokenizer,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpd_mtp.training import data as data_mod
from cpd_mtp.training import tokenizer as tok_mod
from cpd_mtp.training.data import (
    DataConfig,
    PackedDataset,
    build_corpus,
    epoch_permutation,
    held_out_prompts,
    pack,
    pack_blocks,
    split_documents,
    token_dtype,
    tokenize,
)
from cpd_mtp.training.sources import discover_stdlib_files, stdlib_documents
from cpd_mtp.training.tokenizer import tokenizer_fingerprint
from cpd_mtp.utils.files import cache_root


def documents(texts: list[str]):
    import datasets

    return datasets.Dataset.from_dict({"name": [f"d{i}" for i in range(len(texts))], "text": texts})


def token_rows(vocab: int, lengths: list[int], seed: int):
    """A tokenized dataset of random rows (ids below ``vocab``) and its concatenation."""
    import datasets

    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab)
    rows = [rng.integers(0, vocab, size=n).astype(dtype) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(rows) if rows else np.zeros(0, dtype)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return datasets.Dataset(datasets.table.InMemoryTable(pa.table({"input_ids": column}))), flat


def corpus_texts(names: list[str], texts: list[str]) -> list[str]:
    """Texts of JSONL documents named ``path#record`` (1-based)."""
    return [texts[int(n.rsplit("#", 1)[1]) - 1] for n in names]


# ----------------------------------------------------------------------------- split


@settings(max_examples=50, deadline=None)
@given(
    names=st.lists(st.text(min_size=1, max_size=20), min_size=2, max_size=200, unique=True),
    fraction=st.floats(0.001, 0.999),
)
def test_split_is_deterministic_disjoint_and_covering(names: list[str], fraction: float) -> None:
    train, val = split_documents(names, fraction)
    assert (train, val) == split_documents(list(names), fraction)
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == list(range(len(names)))
    # A document's side depends only on its own name: reversing the order keeps each side.
    rtrain, rval = split_documents(names[::-1], fraction)
    assert {names[::-1][i] for i in rval} == {names[i] for i in val}
    assert {names[::-1][i] for i in rtrain} == {names[i] for i in train}


def test_split_fraction_is_close_to_requested() -> None:
    names = [f"pkg/module_{i}.py" for i in range(20000)]
    _, val = split_documents(names, 0.05)
    assert abs(len(val) / len(names) - 0.05) < 0.006  # ~4 binomial standard deviations
    _, val = split_documents(names[:3], 1e-9)
    assert len(val) == 1


def test_split_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(["a", "b"], 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(["a"], 0.5)


# ----------------------------------------------------------------------------- packing


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=20),
    block_size=st.integers(1, 64),
    seed=st.integers(0, 2**16),
)
def test_pack_is_the_truncated_stream(lengths: list[int], block_size: int, seed: int) -> None:
    tokens, flat = token_rows(1000, lengths, seed)
    stream_list = flat.tolist()
    blocks = pack_blocks(flat, block_size)
    assert blocks.shape == (len(stream_list) // block_size, block_size)
    assert blocks.reshape(-1).tolist() == stream_list[: blocks.size]
    path = cache_root() / "tokens" / f"pack-{seed}-{block_size}-{len(lengths)}.arrow"
    path.unlink(missing_ok=True)
    packed = pack(tokens, block_size, 1000, path)
    dataset = PackedDataset.from_dataset(packed, len(flat))
    assert len(dataset) == blocks.shape[0] and dataset.num_tokens == len(stream_list)
    for i in range(len(dataset)):
        item = dataset[i]
        assert item.dtype == torch.long and item.shape == (block_size,)
        assert item.tolist() == stream_list[i * block_size : (i + 1) * block_size]


def test_tokenize_matches_per_text_reference(small_tokenizer) -> None:
    tokenizer, _ = small_tokenizer
    path = cache_root() / "tokens" / "t.arrow"
    tokens = tokenize(documents(TEXTS * 3), tokenizer, path, batch_size=4)
    assert tokens.column_names == ["input_ids"] and len(tokens) == 3 * len(TEXTS)
    for text, row in zip(TEXTS * 3, tokens["input_ids"], strict=True):
        np.testing.assert_array_equal(row, reference_stream(tokenizer, [text]))
    assert tokens.features["input_ids"].feature.dtype == "uint16"
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32
    assert [p.name for p in path.parent.iterdir()] == ["t.arrow"]  # no temporary leftovers


def test_interrupted_tokenize_leaves_no_cache_file(small_tokenizer, monkeypatch) -> None:
    tokenizer, _ = small_tokenizer
    path = cache_root() / "tokens" / "x.arrow"
    calls, original = [], data_mod.encode_batch

    def crash_on_second_batch(batch, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return original(batch, **kwargs)

    monkeypatch.setattr(data_mod, "encode_batch", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        tokenize(documents(TEXTS), tokenizer, path, batch_size=2)
    assert not path.exists()


# ----------------------------------------------------------------------------- token cache


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    vocab=st.sampled_from([3, 300, 2**16 - 1, 2**16 + 5]),
    length=st.integers(1, 200),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_corrupted_token_cache_is_rebuilt(
    tmp_path: Path, vocab: int, length: int, seed: int, data: st.DataObject
) -> None:
    dtype = token_dtype(vocab)
    tokens, flat = token_rows(vocab, [length], seed)
    corrupt = flat.copy()
    corrupt[data.draw(st.integers(0, length - 1))] = data.draw(
        st.integers(vocab, int(np.iinfo(dtype).max))
    )
    path = tmp_path / f"tokens-{vocab}-{length}-{seed}.arrow"
    path.unlink(missing_ok=True)
    pack(token_rows(vocab, [length], seed)[0], 1, vocab, path)  # a sound file ...
    column = pa.FixedSizeListArray.from_arrays(pa.array(corrupt), 1)
    schema = pa.schema([("input_ids", column.type)])  # ... overwritten with a bad id
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(pa.table({"input_ids": column}))
    with pytest.warns(UserWarning, match=re.escape(str(path)) + ".*outside the vocabulary"):
        loaded = PackedDataset.from_dataset(pack(tokens, 1, vocab, path))
    np.testing.assert_array_equal(loaded.tokens, flat)

    def fail(*args, **kwargs):
        raise AssertionError("a sound cache must not be recomputed")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_mod, "pack_batch", fail)
        again = PackedDataset.from_dataset(pack(tokens, 1, vocab, path))
    np.testing.assert_array_equal(again.tokens, flat)


def test_unreadable_or_misshapen_token_cache_is_rebuilt(tmp_path: Path) -> None:
    tokens, flat = token_rows(10, [10], 0)
    path = tmp_path / "t.arrow"
    other = tmp_path / "other.arrow"
    pack(token_rows(2**16 + 5, [10], 0)[0], 5, 2**16 + 5, other)  # uint32 ids
    for bad in (b"\x93ARROW garbage", b"", other.read_bytes()):
        path.write_bytes(bad)
        with pytest.warns(UserWarning, match=re.escape(str(path))):
            loaded = PackedDataset.from_dataset(pack(tokens, 5, 10, path))
        np.testing.assert_array_equal(loaded.tokens, flat)
    # a freshly computed stream with an id outside the vocabulary is refused, naming the file
    path.unlink()
    largest = int(flat.max())
    with pytest.raises(ValueError, match=re.escape(str(path)) + f".*token id {largest}"):
        pack(tokens, 5, largest, path)


def test_build_corpus_rebuilds_a_flipped_token_cache(tmp_path: Path, small_tokenizer) -> None:
    tokenizer, tok_dir = small_tokenizer
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    config = DataConfig(source=source, tokenizer=tok_dir, block_size=4, val_fraction=0.4)
    corpus = build_corpus(config)
    expected = np.asarray(corpus.train.tokens).copy()
    (cache_file,) = (cache_root() / "tokens").glob("train-*.arrow")
    raw = bytearray(cache_file.read_bytes())
    # the last packed uint16 id (it precedes the 8-byte end-of-stream marker and the padding to
    # 8 bytes) becomes 65535 >= the 512-token vocabulary
    at = raw.rfind(expected[-1:].tobytes(), 0, len(raw) - 8)
    raw[at : at + 2] = b"\xff\xff"
    cache_file.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=re.escape(str(cache_file))):
        again = build_corpus(config)
    train_texts = corpus_texts(again.train_files, TEXTS)
    stream = reference_stream(tokenizer, train_texts)
    np.testing.assert_array_equal(again.train.tokens, stream[: again.train.tokens.size])
    np.testing.assert_array_equal(again.train.tokens, expected)


# ----------------------------------------------------------------------------- order


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(0, 2**31), epoch=st.integers(0, 100))
def test_epoch_permutation(n: int, seed: int, epoch: int) -> None:
    perm = epoch_permutation(n, seed, epoch)
    assert sorted(perm.tolist()) == list(range(n))
    np.testing.assert_array_equal(perm, epoch_permutation(n, seed, epoch))
    if n >= 100:
        assert not np.array_equal(perm, epoch_permutation(n, seed, epoch + 1))
        assert not np.array_equal(perm, epoch_permutation(n, seed + 1, epoch))


# ----------------------------------------------------------------------------- end to end


def test_build_corpus_from_user_sources(tmp_path: Path, small_tokenizer) -> None:
    tokenizer, tok_dir = small_tokenizer
    texts = [t.replace("\r\n", "\n") for t in TEXTS]
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join(json.dumps({"body": t}) for t in texts) + "\n\n")
    corpus = build_corpus(
        DataConfig(
            source=source, text_field="body", tokenizer=tok_dir, block_size=4, val_fraction=0.4
        )
    )
    train_texts = corpus_texts(corpus.train_files, texts)
    val_texts = corpus_texts(corpus.validation_files, texts)
    assert sorted(train_texts + val_texts) == sorted(texts)
    for split, split_texts in ((corpus.train, train_texts), (corpus.validation, val_texts)):
        stream = reference_stream(tokenizer, split_texts)
        assert split.num_tokens == len(stream)
        np.testing.assert_array_equal(split.blocks, pack_blocks(stream, 4))
    with pytest.raises(FileNotFoundError, match="no_tok"):
        build_corpus(DataConfig(source=[source], text_field="body", tokenizer=tmp_path / "no_tok"))
    (tmp_path / "e1.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        build_corpus(DataConfig(source=[tmp_path / "e1.txt"]))


def test_build_corpus_on_stdlib_subset_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    config = DataConfig(vocab_size=SMALL_VOCAB, block_size=32, max_files=60, val_fraction=0.1)
    corpus = build_corpus(config)
    assert corpus.vocab_size == len(corpus.tokenizer) == SMALL_VOCAB
    assert len(corpus.train_files) + len(corpus.validation_files) == 60
    assert not set(corpus.train_files) & set(corpus.validation_files)
    assert corpus.validation_files and len(corpus.validation) > 0
    docs, _ = stdlib_documents(60)
    by_name = dict(zip(docs["name"], docs["text"], strict=True))
    expected = reference_stream(corpus.tokenizer, [by_name[n] for n in corpus.train_files])
    assert corpus.train.num_tokens == len(expected)
    np.testing.assert_array_equal(corpus.train.blocks, pack_blocks(expected, 32))
    batch = next(iter(torch.utils.data.DataLoader(corpus.train, batch_size=3)))
    assert batch.shape == (3, 32) and batch.dtype == torch.long

    def fail(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(tok_mod, "train_bpe_tokenizer", fail)
    monkeypatch.setattr(data_mod, "encode_batch", fail)
    monkeypatch.setattr(data_mod, "pack_batch", fail)
    monkeypatch.setattr(Path, "read_text", fail)  # a warm run reads no document file
    again = build_corpus(config)
    monkeypatch.undo()
    assert tokenizer_fingerprint(again.tokenizer) == tokenizer_fingerprint(corpus.tokenizer)
    np.testing.assert_array_equal(again.train.blocks, corpus.train.blocks)
    np.testing.assert_array_equal(again.validation.blocks, corpus.validation.blocks)
    assert not again.train.blocks.flags.owndata  # a view of the memory-mapped cache file

    prompts = corpus.held_out_prompts(n=3, prompt_tokens=24)
    assert prompts == again.held_out_prompts(n=3, prompt_tokens=24)
    assert 1 <= len(prompts) <= 3
    val_texts = [by_name[n] for n in corpus.validation_files]
    for prompt in prompts:
        assert prompt.strip() and any(prompt in text for text in val_texts)
        assert len(corpus.tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= 24


def test_held_out_prompts_start_at_a_def(small_tokenizer) -> None:
    tokenizer, _ = small_tokenizer
    docs = documents(TEXTS)
    prompts = held_out_prompts(docs, tokenizer, n=10, prompt_tokens=6)
    assert len(prompts) == len(TEXTS)
    assert prompts == held_out_prompts(list(docs), tokenizer, n=10, prompt_tokens=6)
    assert sum(p.lstrip().startswith("def ") for p in prompts) == 2


def test_user_tokenizer_too_small_blocks_error(tmp_path: Path, small_tokenizer) -> None:
    _, tok_dir = small_tokenizer
    for i, text in enumerate(TEXTS):
        (tmp_path / f"{i}.py").write_text(text)
    with pytest.raises(ValueError, match="block_size"):
        build_corpus(DataConfig(source=tmp_path, tokenizer=tok_dir, block_size=10_000))


@pytest.mark.slow
def test_full_stdlib_corpus() -> None:
    corpus = build_corpus(DataConfig(progress=False))
    files = len(corpus.train_files) + len(corpus.validation_files)
    assert files == len(discover_stdlib_files()) and 1500 < files < 2500
    assert len(corpus.tokenizer) == 4096
    total = corpus.train.num_tokens + corpus.validation.num_tokens
    assert 7e6 < total < 12e6
    assert 0.01 < len(corpus.validation_files) / files < 0.06
