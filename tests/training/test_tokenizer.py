"""Tests for cpd_mtp.training.tokenizer, each against a direct reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_builders import (  # noqa: F401 (the fixtures are used by name)
    SMALL_VOCAB,
    STDLIB,
    TEXTS,
    _isolated_cache,
    small_tokenizer,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpd_mtp.training import tokenizer as tok_mod
from cpd_mtp.training.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    load_or_train_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
)
from cpd_mtp.utils.files import cache_root


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


def test_interrupted_tokenizer_write_leaves_no_cache_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def crash(self, directory, *args, **kwargs):
        (Path(directory) / "tokenizer.json").write_text("{half")
        raise KeyboardInterrupt

    monkeypatch.setattr(tok_mod.PreTrainedTokenizerFast, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        load_or_train_tokenizer(TEXTS, "fp-crash", 300)
    path = tok_mod.tokenizer_cache_path("fp-crash", 300)
    assert not path.exists() and list(path.parent.iterdir()) == []
