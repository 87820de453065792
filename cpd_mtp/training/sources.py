"""Where documents come from: the embedded standard-library corpus and user paths.

A source is ``"stdlib"`` (the ``.py`` files of the running interpreter's standard library,
``site-packages`` excluded) or user paths: plain-text files, globs, directories, JSONL and Parquet
files (a configurable text field), and directories written by ``datasets``' ``save_to_disk``.
Every loader returns the documents, sorted for determinism, and a fingerprint of the corpus
computed from file names, sizes and modification times (fast, no content hashing).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cpd_mtp.training.tokenizer import stable_hash

PathLike = str | os.PathLike[str]
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Document:
    """One document: a file read on demand (``path``) or an in-memory record (``content``)."""

    name: str
    path: Path | None = None
    content: str | None = None

    def text(self) -> str:
        """The document's text; files are read as UTF-8 with undecodable bytes replaced."""
        if self.content is not None:
            return self.content
        assert self.path is not None
        return self.path.read_text(encoding="utf-8", errors="replace")

    def is_empty(self) -> bool:
        """Whether the document has no text at all."""
        if self.content is not None:
            return not self.content
        assert self.path is not None
        return self.path.stat().st_size == 0


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def discover_stdlib_files(root: PathLike | None = None) -> list[Path]:
    """All ``.py`` files under the stdlib directory, without ``site-packages``, sorted."""
    base = Path(root) if root is not None else stdlib_root()
    found: list[Path] = []
    for directory, subdirs, files in os.walk(base):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "__pycache__")]
        found.extend(Path(directory, f) for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(base).as_posix())


def _stat_key(path: Path, name: str) -> tuple[str, int, int]:
    stat = path.stat()
    return (name, stat.st_size, stat.st_mtime_ns)


def check_max_files(max_files: int | None) -> None:
    """Raise ValueError unless ``max_files`` is None (all documents) or an integer >= 1."""
    if max_files is None:
        return
    if isinstance(max_files, bool) or not isinstance(max_files, int) or max_files < 1:
        raise ValueError(
            f"max_files must be a positive integer or None (all documents), got {max_files!r}"
        )


def stdlib_documents(max_files: int | None = None) -> tuple[list[Document], str]:
    """The embedded corpus as documents named by stdlib-relative path, plus its fingerprint."""
    check_max_files(max_files)
    root = stdlib_root()
    paths = discover_stdlib_files(root)[:max_files]
    docs = [Document(p.relative_to(root).as_posix(), path=p) for p in paths]
    keys = [_stat_key(d.path, d.name) for d in docs if d.path is not None]
    return docs, stable_hash("stdlib", keys)


def _is_hf_dataset_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in HF_DATASET_MARKERS)


def _looks_binary(path: Path) -> bool:
    with path.open("rb") as handle:
        return b"\x00" in handle.read(8192)


def _expand_entry(entry: PathLike) -> list[tuple[Path, bool]]:
    """Files (or HF dataset dirs) named by one source entry; the flag marks files found by a
    glob or a directory walk, whose binary files are skipped (a file named outright is not)."""
    text = os.path.expanduser(os.fspath(entry))
    if _GLOB_CHARS.search(text):
        matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
        if not matches:
            raise FileNotFoundError(f"no files match the data pattern {text!r}")
        return [(m, True) for m in matches if m.is_file() or _is_hf_dataset_dir(m)]
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"data path does not exist: {path}")
    if path.is_file() or _is_hf_dataset_dir(path):
        return [(path, False)]
    found = []
    for directory, subdirs, files in os.walk(path):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(Path(directory, f) for f in sorted(files) if not f.startswith("."))
    return [(p, True) for p in found]


def _text_or_none(value: object, where: str, text_field: str) -> str | None:
    """A record's text: a string, or None for a missing value; anything else is an error
    (``str()`` would silently train on ``"42"`` or ``"{'a': 1}"``)."""
    if value is None or isinstance(value, str):
        return value
    raise ValueError(
        f"{where}: field {text_field!r} is a {type(value).__name__}, not a string: {value!r:.80}"
    )


def _jsonl_documents(path: Path, text_field: str) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{line_no}: record has no text field {text_field!r}")
            text = _text_or_none(record[text_field], f"{path}:{line_no}", text_field)
            if text is not None:
                docs.append(Document(f"{path}#{line_no}", content=text))
    return docs


def _parquet_documents(path: Path, text_field: str) -> list[Document]:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if text_field not in schema.names:
        raise ValueError(f"{path}: Parquet file has no column {text_field!r} ({schema.names})")
    column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    texts = [_text_or_none(t, f"{path}: row {i}", text_field) for i, t in enumerate(column)]
    return [Document(f"{path}#{i}", content=t) for i, t in enumerate(texts) if t is not None]


def _hf_dataset_documents(path: Path, text_field: str) -> list[Document]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    docs = []
    for split, dataset in sorted(splits, key=lambda item: item[0]):
        if text_field not in dataset.column_names:
            raise ValueError(
                f"{path}: dataset has no column {text_field!r} ({dataset.column_names})"
            )
        prefix = f"{path}#{split}/" if split else f"{path}#"
        where = f"{path}: split {split!r}, row" if split else f"{path}: row"
        texts = [
            _text_or_none(t, f"{where} {i}", text_field) for i, t in enumerate(dataset[text_field])
        ]
        docs.extend(
            Document(f"{prefix}{i}", content=t) for i, t in enumerate(texts) if t is not None
        )
    return docs


def _documents_from_path(path: Path, walked: bool, text_field: str) -> list[Document]:
    if path.is_dir():
        return _hf_dataset_documents(path, text_field)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _jsonl_documents(path, text_field)
    if suffix in PARQUET_SUFFIXES:
        return _parquet_documents(path, text_field)
    if walked and _looks_binary(path):
        return []
    return [Document(path.as_posix(), path=path)]


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def user_documents(
    sources: Sequence[PathLike], text_field: str = "text", max_files: int | None = None
) -> tuple[list[Document], str]:
    """Documents from user paths (files, globs, directories, JSONL, Parquet, HF dataset dirs).

    Plain-text files are one document each; JSONL lines, Parquet rows and dataset rows are one
    document each. Empty documents are dropped, and so are binary files matched by a glob or
    met while walking a directory. A malformed JSONL line, a non-string text field or
    ``max_files`` below 1 is a ValueError naming the file (and line or row). The fingerprint
    covers every underlying file's path, size and modification time.
    """
    check_max_files(max_files)
    docs: list[Document] = []
    keys: list[tuple[str, int, int]] = []
    for entry in sources:
        for path, walked in _expand_entry(entry):
            docs.extend(_documents_from_path(path, walked, text_field))
            keys.extend(_stat_key(f, f.as_posix()) for f in _files_under(path))
    named = [os.fspath(s) for s in sources]
    if not docs:
        raise ValueError(f"the data source {named} holds no documents")
    docs = [d for d in docs if not d.is_empty()][:max_files]
    if not docs:
        raise ValueError(f"the data source {named} is empty: its documents hold no text")
    return docs, stable_hash("user", keys, text_field, max_files)


def load_documents(
    source: PathLike | Sequence[PathLike] = "stdlib",
    text_field: str = "text",
    max_files: int | None = None,
) -> tuple[list[Document], str]:
    """The documents of ``source`` (``"stdlib"`` or user paths) and the corpus fingerprint."""
    if isinstance(source, str | os.PathLike) and os.fspath(source) == "stdlib":
        return stdlib_documents(max_files)
    sources = [source] if isinstance(source, str | os.PathLike) else list(source)
    if not sources:
        raise ValueError("the data source is an empty list")
    return user_documents(sources, text_field, max_files)
