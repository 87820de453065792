"""Tests for cpd_mtp.training.sources, each against a direct reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from data_builders import STDLIB, TEXTS, _isolated_cache  # noqa: F401 (autouse fixture)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpd_mtp.training.data import DataConfig
from cpd_mtp.training.sources import (
    discover_stdlib_files,
    load_documents,
    stdlib_documents,
    user_documents,
)


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
    assert fp == fp2 and list(docs["name"]) == list(docs2["name"])
    assert len(docs) == 30 and not Path(docs[0]["name"]).is_absolute()
    assert stdlib_documents(max_files=31)[1] != fp
    # the texts are the files, read as UTF-8 with undecodable bytes replaced (empty ones kept)
    for row in docs:
        assert row["text"] == (STDLIB / row["name"]).read_text(encoding="utf-8", errors="replace")


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


def test_user_sources_give_the_same_documents(tmp_path: Path) -> None:
    texts = [t.replace("\r\n", "\n") for t in TEXTS]  # text files are read with universal newlines
    specs = _write_sources(tmp_path, texts)
    text_files = sorted((tmp_path / "texts").rglob("*.txt"))
    sources = {
        "files": text_files,
        "glob": str(tmp_path / "texts" / "**" / "*.txt"),
        "dir": tmp_path / "texts",
        **specs,
    }
    for kind, source in sources.items():
        docs, fingerprint = load_documents(source, text_field="body")
        assert docs.column_names == ["name", "text"], kind
        in_order = list(docs["text"])
        assert sorted(in_order) == sorted(texts), kind
        if kind in specs:  # records keep their order
            assert in_order == texts, kind
        assert load_documents(source, text_field="body")[1] == fingerprint
    names = list(load_documents(specs["jsonl"], text_field="body")[0]["name"])
    assert names == [f"{specs['jsonl']}#{i}" for i in range(1, len(texts) + 1)]
    names = list(load_documents(specs["parquet"], text_field="body")[0]["name"])
    assert names == [f"{specs['parquet']}#{i}" for i in range(len(texts))]


def test_directory_walk_skips_hidden_and_binary(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# title\n")
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "empty.txt").write_text("")
    docs, _ = load_documents(tmp_path)
    assert [Path(n).name for n in docs["name"]] == ["a.md"]


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    (tmp_path / "real.txt").write_text("some text")
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        load_documents([missing])
    with pytest.raises(FileNotFoundError, match=r"\*\.zzz"):
        load_documents(str(tmp_path / "*.zzz"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no documents"):
        load_documents(tmp_path / "empty_dir")
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="empty"):
        load_documents([tmp_path / "e1.txt", tmp_path / "e2.jsonl"])
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


def test_jsonl_record_without_the_field_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "partial.jsonl"
    path.write_text('{"text": "a"}\n{"text": null}\n\n{"other": "b"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: record has no text field")):
        load_documents(path)
    path.write_text('{"text": "a"}\n{"text": null}\n{"text": "b"}\n')  # null is a missing value
    assert list(load_documents(path)[0]["text"]) == ["a", "b"]


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
    docs = load_documents(nulls, text_field="body")[0]
    assert list(docs["text"]) == ["a", "b"]
    assert list(docs["name"]) == [f"{nulls}#0", f"{nulls}#2"]


def test_glob_skips_binary_files_like_the_walk(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text\n")
    (tmp_path / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    walked = [Path(n).name for n in load_documents(tmp_path)[0]["name"]]
    globbed = [Path(n).name for n in load_documents(str(tmp_path / "*.txt"))[0]["name"]]
    assert globbed == walked == ["a.txt"]


def test_changed_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("first\n")
    docs, fp = load_documents(path)
    path.write_text("second, longer\n")
    docs2, fp2 = load_documents(path)
    assert list(docs["text"]) == ["first\n"] and list(docs2["text"]) == ["second, longer\n"]
    assert fp != fp2


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
