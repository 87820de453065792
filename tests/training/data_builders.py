"""Shared builders for the data, sources and tokenizer tests."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL_VOCAB = 512
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "import os\n\nprint(os.getcwd())  # café ☕\n",
    "class A:\n    x = 1\n\n    def f(self):\n        return self.x * 2\n",
    "plain text, with\ttabs and  double  spaces\r\nand CRLF",
    "# ünïcödé 漢字 🚀\nvalue = '\ufffd'\n",
]


def train_small_tokenizer(directory: Path):
    """A small BPE trained on 40 stdlib files plus TEXTS, saved to ``directory``.

    Returns (tokenizer, directory); test modules wrap it in a module-scoped fixture.
    """
    from cpd_mtp.training.tokenizer import train_bpe_tokenizer

    paths = sorted(p for p in STDLIB.glob("*.py"))[:40]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths] + TEXTS
    tokenizer = train_bpe_tokenizer(texts, SMALL_VOCAB)
    tokenizer.save_pretrained(str(directory))
    return tokenizer, directory


def reference_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """Tokenize one text at a time through the transformers API, eos after each."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.int64)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own cpd_mtp cache (import this fixture into the test module)."""
    monkeypatch.setenv("CPD_MTP_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))
