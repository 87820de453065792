"""Tests for cpd_mtp.training.data, cpd_mtp.training.sources and cpd_mtp.training.tokenizer, each against a direct reference."""

from __future__ import annotations

import json
import os
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cpd_mtp.training import data as data_mod
from cpd_mtp.training import tokenizer as tok_mod
from cpd_mtp.training.data import (
    DataConfig,
    EpochSampler,
    PackedDataset,
    build_corpus,
    cached_array,
    discover_stdlib_files,
    epoch_permutation,
    held_out_prompts,
    load_documents,
    pack_blocks,
    split_documents,
    stdlib_documents,
    token_dtype,
    tokenize_documents,
    user_documents,
)
from cpd_mtp.training.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    cache_root,
    load_or_train_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL_VOCAB = 512
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "import os\n\nprint(os.getcwd())  # café ☕\n",
    "class A:\n    x = 1\n\n    def f(self):\n        return self.x * 2\n",
    "plain text, with\ttabs and  double  spaces\r\nand CRLF",
    "# ünïcödé 漢字 🚀\nvalue = '\ufffd'\n",
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPD_MTP_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def non_utf8_files() -> list[Path]:
    """Stdlib files whose bytes are not valid UTF-8, found independently of the library."""
    bad = []
    for path in STDLIB.rglob("*.py"):
        if "site-packages" in path.relative_to(STDLIB).parts:
            continue
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            bad.append(path)
    return sorted(bad)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A small BPE trained on 40 stdlib files plus TEXTS, saved to a local directory."""
    paths = sorted(p for p in STDLIB.glob("*.py"))[:40]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths] + TEXTS
    tokenizer = train_bpe_tokenizer(texts, SMALL_VOCAB)
    directory = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(str(directory))
    return tokenizer, directory


def reference_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """Tokenize one text at a time through the transformers API, eos after each."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.int64)


# ----------------------------------------------------------------------------- stdlib


def test_stdlib_discovery_matches_independent_walk() -> None:
    found = discover_stdlib_files()
    expected = sorted(
        p
        for p in STDLIB.rglob("*.py")
        if "site-packages" not in p.relative_to(STDLIB).parts
        and "__pycache__" not in p.relative_to(STDLIB).parts
    )
    assert sorted(found) == expected
    assert len(found) > 1000
    assert all(p.suffix == ".py" and p.is_relative_to(STDLIB) for p in found)
    rel = [p.relative_to(STDLIB).as_posix() for p in found]
    assert rel == sorted(rel)


def test_stdlib_documents_fingerprint_is_stable() -> None:
    docs, fp = stdlib_documents(max_files=30)
    docs2, fp2 = stdlib_documents(max_files=30)
    assert fp == fp2 and [d.name for d in docs] == [d.name for d in docs2]
    assert len(docs) == 30 and not Path(docs[0].name).is_absolute()
    assert stdlib_documents(max_files=31)[1] != fp


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_stdlib_files(small_tokenizer, non_utf8_files) -> None:
    tokenizer, _ = small_tokenizer
    assert non_utf8_files, "expected some non-UTF-8 files in the stdlib test suite"
    files = sorted(STDLIB.glob("*.py"))[40:60] + non_utf8_files
    replaced = 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        replaced += "\ufffd" in text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text, path
    assert replaced > 0


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=200))
def test_tokenizer_round_trips_any_text(small_tokenizer, text: str) -> None:
    tokenizer, _ = small_tokenizer
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_specials_and_size(small_tokenizer) -> None:
    tokenizer, directory = small_tokenizer
    assert len(tokenizer) == SMALL_VOCAB
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    loaded = load_tokenizer(directory)
    assert len(loaded) == len(tokenizer)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tokenizer)
    assert loaded(TEXTS[1])["input_ids"] == tokenizer(TEXTS[1])["input_ids"]


def test_tokenizer_cache_hit_does_not_retrain(monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_or_train_tokenizer(TEXTS * 3, "fp-test", 300)
    path = tok_mod.tokenizer_cache_path("fp-test", 300)
    assert (path / "tokenizer.json").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("retrained despite a cached tokenizer")

    monkeypatch.setattr(tok_mod, "train_bpe_tokenizer", fail)
    second = load_or_train_tokenizer(lambda: fail(), "fp-test", 300)
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)
    assert first.get_vocab() == second.get_vocab()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary leftovers
    with pytest.raises(AssertionError):  # a different vocab size is a different key
        load_or_train_tokenizer(TEXTS, "fp-test", 301)


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    assert cache_root() == tmp_path / "cache"
    monkeypatch.delenv("CPD_MTP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "cpd_mtp"


def test_interrupted_writes_leave_no_cache_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(self, directory, *args, **kwargs):
        (Path(directory) / "tokenizer.json").write_text("{half")
        raise KeyboardInterrupt

    monkeypatch.setattr(tok_mod.PreTrainedTokenizerFast, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        load_or_train_tokenizer(TEXTS, "fp-crash", 300)
    path = tok_mod.tokenizer_cache_path("fp-crash", 300)
    assert not path.exists() and list(path.parent.iterdir()) == []

    target = cache_root() / "tokens" / "x.npy"

    def broken() -> np.ndarray:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_array(target, broken)
    assert not target.exists()
    out = cached_array(target, lambda: np.arange(5, dtype=np.uint16))
    assert isinstance(out, np.memmap) and out.tolist() == [0, 1, 2, 3, 4]
    assert [p.name for p in target.parent.iterdir()] == ["x.npy"]


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


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=20),
    block_size=st.integers(1, 64),
    seed=st.integers(0, 2**16),
)
def test_pack_blocks_is_the_truncated_stream(
    lengths: list[int], block_size: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(2, 1000, size=n).tolist() for n in lengths]
    stream_list = [t for doc in docs for t in [*doc, 0]]
    stream = np.asarray(stream_list, dtype=np.uint16)
    blocks = pack_blocks(stream, block_size)
    assert blocks.shape == (len(stream_list) // block_size, block_size)
    assert blocks.reshape(-1).tolist() == stream_list[: blocks.size]
    dataset = PackedDataset(stream, block_size)
    assert len(dataset) == blocks.shape[0]
    for i in range(len(dataset)):
        item = dataset[i]
        assert item.dtype == torch.long and item.shape == (block_size,)
        assert item.tolist() == stream_list[i * block_size : (i + 1) * block_size]


def test_tokenize_documents_matches_per_text_reference(small_tokenizer) -> None:
    tokenizer, _ = small_tokenizer
    stream = tokenize_documents(tokenizer, TEXTS * 3, batch_size=4)
    assert stream.dtype == np.uint16
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32
    np.testing.assert_array_equal(stream, reference_stream(tokenizer, TEXTS * 3))


# ----------------------------------------------------------------------------- user sources


def _write_sources(root: Path, texts: list[str]) -> dict[str, object]:
    """Write ``texts`` in every supported format; returns the source spec of each."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    text_dir = root / "texts"
    (text_dir / "sub").mkdir(parents=True)
    for i, text in enumerate(texts):
        (text_dir / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_bytes(text.encode())
    jsonl = root / "data.jsonl"
    rows = [json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)]
    jsonl.write_text("\n".join(rows) + "\n\n", encoding="utf-8")
    parquet = root / "data.parquet"
    pq.write_table(pa.table({"body": texts, "n": list(range(len(texts)))}), parquet)
    hf_dir = root / "hf"
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(hf_dir))
    return {"jsonl": jsonl, "parquet": parquet, "hf": hf_dir}


def test_user_sources_give_the_same_tokens(tmp_path: Path, small_tokenizer) -> None:
    tokenizer, tok_dir = small_tokenizer
    texts = [t.replace("\r\n", "\n") for t in TEXTS]  # text files are read with universal newlines
    specs = _write_sources(tmp_path, texts)
    reference = reference_stream(tokenizer, texts)
    text_files = sorted((tmp_path / "texts").rglob("*.txt"))
    sources = {
        "files": text_files,
        "glob": str(tmp_path / "texts" / "**" / "*.txt"),
        "dir": tmp_path / "texts",
        **specs,
    }
    for kind, source in sources.items():
        docs, fingerprint = load_documents(source, text_field="body")
        got = sorted(d.text() for d in docs)
        assert got == sorted(texts), kind
        in_order = [d.text() for d in docs]
        np.testing.assert_array_equal(
            tokenize_documents(tokenizer, in_order), reference_stream(tokenizer, in_order)
        )
        if kind in specs:  # records keep their order
            assert in_order == texts, kind
        assert load_documents(source, text_field="body")[1] == fingerprint
    np.testing.assert_array_equal(tokenize_documents(tokenizer, texts), reference)

    corpus = build_corpus(
        DataConfig(
            source=specs["jsonl"],
            text_field="body",
            tokenizer=tok_dir,
            block_size=4,
            val_fraction=0.4,
        )
    )
    train_texts = [texts[int(n.rsplit("#", 1)[1]) - 1] for n in corpus.train_files]
    val_texts = [texts[int(n.rsplit("#", 1)[1]) - 1] for n in corpus.validation_files]
    np.testing.assert_array_equal(corpus.train.tokens, reference_stream(tokenizer, train_texts))
    np.testing.assert_array_equal(corpus.validation.tokens, reference_stream(tokenizer, val_texts))
    assert sorted(train_texts + val_texts) == sorted(texts)


def test_directory_walk_skips_hidden_and_binary(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# title\n")
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "empty.txt").write_text("")
    docs, _ = load_documents(tmp_path)
    assert [Path(d.name).name for d in docs] == ["a.md"]


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    (tmp_path / "real.txt").write_text("some text")
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        load_documents([missing])
    with pytest.raises(FileNotFoundError, match=r"\*\.zzz"):
        load_documents(str(tmp_path / "*.zzz"))
    with pytest.raises(FileNotFoundError, match="no_tok"):
        build_corpus(DataConfig(source=[missing.parent], tokenizer=tmp_path / "no_tok"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no documents"):
        load_documents(tmp_path / "empty_dir")
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="empty"):
        build_corpus(DataConfig(source=[tmp_path / "e1.txt", tmp_path / "e2.jsonl"]))
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="'text'"):
        load_documents(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="empty list"):
        load_documents([])


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "unterminated\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{bad}:3") + ".*JSON"):
        load_documents(bad)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    value=st.one_of(
        st.integers(),
        st.floats(allow_nan=False),
        st.booleans(),
        st.lists(st.text(max_size=3), max_size=3),
        st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
    )
)
def test_non_string_jsonl_text_is_an_error(tmp_path: Path, value: object) -> None:
    path = tmp_path / "records.jsonl"
    rows = [{"body": "ok"}, {"body": None}, {"body": value}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: field 'body'")):
        load_documents(path, text_field="body")


def test_non_string_parquet_and_dataset_text_is_an_error(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"body": [1, 2, 3]}), parquet)
    with pytest.raises(ValueError, match=re.escape(f"{parquet}: row 0: field 'body' is a int")):
        load_documents(parquet, text_field="body")
    hf_dir = tmp_path / "hf"
    datasets.Dataset.from_dict({"body": [[1, 2], [3]]}).save_to_disk(str(hf_dir))
    with pytest.raises(ValueError, match=re.escape(f"{hf_dir}: row 0: field 'body' is a list")):
        load_documents(hf_dir, text_field="body")
    # missing values are still skipped, not errors
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"body": ["a", None, "b"]}), nulls)
    assert [d.text() for d in load_documents(nulls, text_field="body")[0]] == ["a", "b"]


def test_glob_skips_binary_files_like_the_walk(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text\n")
    (tmp_path / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    walked = [Path(d.name).name for d in load_documents(tmp_path)[0]]
    globbed = [Path(d.name).name for d in load_documents(str(tmp_path / "*.txt"))[0]]
    assert globbed == walked == ["a.txt"]


@pytest.mark.parametrize("bad", [-1, 0])
def test_max_files_below_one_is_an_error(tmp_path: Path, bad: int) -> None:
    (tmp_path / "a.txt").write_text("text\n")
    with pytest.raises(ValueError, match="max_files"):
        DataConfig(max_files=bad)
    with pytest.raises(ValueError, match="max_files"):
        stdlib_documents(bad)
    with pytest.raises(ValueError, match="max_files"):
        user_documents([tmp_path], max_files=bad)
    with pytest.raises(ValueError, match="max_files"):
        load_documents("stdlib", max_files=bad)
    assert len(stdlib_documents(1)[0]) == 1  # the smallest valid value still works


# ----------------------------------------------------------------------------- token cache


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
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
    good = np.random.default_rng(seed).integers(0, vocab, length).astype(dtype)
    corrupt = good.copy()
    corrupt[data.draw(st.integers(0, length - 1))] = data.draw(
        st.integers(vocab, int(np.iinfo(dtype).max))
    )
    path = tmp_path / f"tokens-{vocab}-{length}-{seed}.npy"
    np.save(path, corrupt)
    with pytest.warns(UserWarning, match=re.escape(str(path)) + ".*outside the vocabulary"):
        loaded = cached_array(path, lambda: good, vocab_size=vocab)
    np.testing.assert_array_equal(loaded, good)

    def fail() -> np.ndarray:
        raise AssertionError("a sound cache must not be recomputed")

    np.testing.assert_array_equal(cached_array(path, fail, vocab_size=vocab), good)


def test_unreadable_or_misshapen_token_cache_is_rebuilt(tmp_path: Path) -> None:
    good = np.arange(10, dtype=np.uint16)
    path = tmp_path / "t.npy"
    for bad in (b"\x93NUMPY garbage", np.zeros((2, 5), np.uint16), np.zeros(10, np.float32)):
        if isinstance(bad, bytes):
            path.write_bytes(bad)
        else:
            np.save(path, bad)
        with pytest.warns(UserWarning, match=re.escape(str(path))):
            np.testing.assert_array_equal(cached_array(path, lambda: good, vocab_size=10), good)
    # a freshly computed stream with an id outside the vocabulary is refused, naming the file
    path.unlink()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*token id 9"):
        cached_array(path, lambda: good, vocab_size=9)


def test_build_corpus_rebuilds_a_flipped_token_cache(tmp_path: Path, small_tokenizer) -> None:
    tokenizer, tok_dir = small_tokenizer
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    config = DataConfig(source=source, tokenizer=tok_dir, block_size=4, val_fraction=0.4)
    corpus = build_corpus(config)
    expected = np.asarray(corpus.train.tokens).copy()
    (cache_file,) = (cache_root() / "tokens").glob("train-*.npy")
    raw = bytearray(cache_file.read_bytes())
    raw[-2:] = b"\xff\xff"  # the last uint16 id becomes 65535 >= the 512-token vocabulary
    cache_file.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=re.escape(str(cache_file))):
        again = build_corpus(config)
    train_texts = [TEXTS[int(n.rsplit("#", 1)[1]) - 1] for n in again.train_files]
    np.testing.assert_array_equal(again.train.tokens, reference_stream(tokenizer, train_texts))
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


def test_epoch_sampler_resumes_mid_epoch() -> None:
    full = list(EpochSampler(50, seed=3, epoch=2))
    resumed = EpochSampler(50, seed=3, epoch=0)
    resumed.set_epoch(2, start=17)
    assert list(resumed) == full[17:] and len(resumed) == 33
    assert full == epoch_permutation(50, 3, 2).tolist()


# ----------------------------------------------------------------------------- end to end


def test_build_corpus_on_stdlib_subset_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    config = DataConfig(vocab_size=SMALL_VOCAB, block_size=32, max_files=60, val_fraction=0.1)
    corpus = build_corpus(config)
    assert corpus.vocab_size == len(corpus.tokenizer) == SMALL_VOCAB
    assert len(corpus.train_files) + len(corpus.validation_files) == 60
    assert not set(corpus.train_files) & set(corpus.validation_files)
    assert corpus.validation_files and len(corpus.validation) > 0
    docs, _ = stdlib_documents(60)
    by_name = {d.name: d.text() for d in docs}
    expected = reference_stream(corpus.tokenizer, [by_name[n] for n in corpus.train_files])
    np.testing.assert_array_equal(corpus.train.tokens, expected)
    batch = next(iter(torch.utils.data.DataLoader(corpus.train, batch_size=3)))
    assert batch.shape == (3, 32) and batch.dtype == torch.long

    def fail(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(tok_mod, "train_bpe_tokenizer", fail)
    monkeypatch.setattr(data_mod, "tokenize_documents", fail)
    again = build_corpus(config)
    assert tokenizer_fingerprint(again.tokenizer) == tokenizer_fingerprint(corpus.tokenizer)
    np.testing.assert_array_equal(again.train.tokens, corpus.train.tokens)
    np.testing.assert_array_equal(again.validation.tokens, corpus.validation.tokens)
    assert isinstance(again.train.tokens, np.memmap)

    prompts = corpus.held_out_prompts(n=3, prompt_tokens=24)
    assert prompts == again.held_out_prompts(n=3, prompt_tokens=24)
    assert 1 <= len(prompts) <= 3
    val_texts = [by_name[n] for n in corpus.validation_files]
    for prompt in prompts:
        assert prompt.strip() and any(prompt in text for text in val_texts)
        assert len(corpus.tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= 24


def test_held_out_prompts_start_at_a_def(small_tokenizer) -> None:
    tokenizer, _ = small_tokenizer
    docs = [data_mod.Document(f"d{i}", content=t) for i, t in enumerate(TEXTS)]
    prompts = held_out_prompts(docs, tokenizer, n=10, prompt_tokens=6)
    assert len(prompts) == len(TEXTS)
    assert prompts == held_out_prompts(docs, tokenizer, n=10, prompt_tokens=6)
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
