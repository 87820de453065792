"""Where documents come from: the embedded standard-library corpus and user paths.

A source is ``"stdlib"`` (the ``.py`` files of the running interpreter's standard library,
``site-packages`` excluded) or user paths: plain-text files, globs, directories, JSONL and Parquet
files (a configurable text field), and directories written by ``datasets``' ``save_to_disk``.
Every loader returns a ``datasets.Dataset`` with the columns ``name`` and ``text``, one row per
document in a deterministic order, and a fingerprint of the corpus computed from file names,
sizes and modification times (fast, no content hashing). Loaded files are cached as Arrow
tables under the cpd_mtp cache directory, so a second run reads no text.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cpd_mtp.training.tokenizer import stable_hash
from cpd_mtp.utils.extras import require
from cpd_mtp.utils.files import cache_root

datasets = require("datasets", "cpd_mtp.training")

PathLike = str | os.PathLike[str]
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
DOCUMENT_FEATURES = datasets.Features(
    {"name": datasets.Value("string"), "text": datasets.Value("string")}
)
_GLOB_CHARS = re.compile(r"[*?\[]")
_STRING_TYPES = ("string", "large_string", "null")


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


def _read_files(paths: list[str], names: list[str], stamps: list[object]) -> Iterator[dict]:
    """Rows of :func:`files_dataset`; ``stamps`` only enters the cache key (file changes)."""
    for path, name in zip(paths, names, strict=True):
        yield {"name": name, "text": Path(path).read_text(encoding="utf-8", errors="replace")}


def files_dataset(
    paths: Sequence[Path], names: Sequence[str], cache_dir: PathLike | None = None
) -> datasets.Dataset:
    """One document per file (read as UTF-8, undecodable bytes replaced), in the given order.

    Cached by ``datasets`` under ``cache_root(cache_dir)/datasets``, keyed by the files' names,
    sizes and modification times, so an unchanged set of files is not read again.
    """
    stamps = [_stat_key(p, n) for p, n in zip(paths, names, strict=True)]
    return datasets.Dataset.from_generator(
        _read_files,
        features=DOCUMENT_FEATURES,
        cache_dir=str(cache_root(cache_dir) / "datasets"),
        gen_kwargs={"paths": [str(p) for p in paths], "names": list(names), "stamps": stamps},
    )


def stdlib_documents(
    max_files: int | None = None, cache_dir: PathLike | None = None
) -> tuple[datasets.Dataset, str]:
    """The embedded corpus, documents named by stdlib-relative path, plus its fingerprint.

    Empty files (``__init__.py``) are kept: each is one eos token in the stream.
    """
    check_max_files(max_files)
    root = stdlib_root()
    paths = discover_stdlib_files(root)[:max_files]
    names = [p.relative_to(root).as_posix() for p in paths]
    keys = [_stat_key(p, n) for p, n in zip(paths, names, strict=True)]
    return files_dataset(paths, names, cache_dir), stable_hash("stdlib", keys)


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


def _check_text(value: object, where: str, text_field: str) -> None:
    """A record's text must be a string or missing (None); anything else is an error
    (``str()`` would silently train on ``"42"`` or ``"{'a': 1}"``)."""
    if value is not None and not isinstance(value, str):
        raise ValueError(
            f"{where}: field {text_field!r} is a {type(value).__name__}, not a string: "
            f"{value!r:.80}"
        )


def _locate_jsonl_problem(path: Path, text_field: str) -> None:
    """Raise a ValueError naming the file and line of the first bad record, if there is one.

    ``datasets``' JSON loader reports neither, so this runs only when loading failed or the
    loaded column looks wrong (a missing field reads as null, a mixed one as JSON).
    """
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
            _check_text(record[text_field], f"{path}:{line_no}", text_field)


def _is_string_column(dataset: datasets.Dataset, text_field: str) -> bool:
    feature = dataset.features[text_field]
    return isinstance(feature, datasets.Value) and feature.dtype in _STRING_TYPES


def _named_documents(
    dataset: datasets.Dataset, text_field: str, prefix: str, where: str, first: int = 0
) -> datasets.Dataset:
    """``dataset``'s text column as documents named ``{prefix}{row + first}``.

    A non-string column is a ValueError naming ``where`` and the first offending row. The
    result wraps the loaded (memory-mapped) column without a copy, and is in-memory to
    ``datasets``, so nothing is ever written next to the user's files; missing (null) texts
    are dropped later, with the empty ones.
    """
    if not _is_string_column(dataset, text_field):
        column = dataset.data.column(text_field)
        row = pc.index(pc.is_valid(column), True).as_py()
        if row >= 0:
            _check_text(dataset[row][text_field], f"{where} {row}", text_field)
        raise ValueError(f"{where}s: field {text_field!r} is {dataset.features[text_field]}")
    text = dataset.data.column(text_field).cast(pa.string())
    names = pa.array([f"{prefix}{i + first}" for i in range(len(dataset))], pa.string())
    table = datasets.table.InMemoryTable(pa.table({"name": names, "text": text}))
    # Only names it for datasets' bookkeeping: our maps pass their own fingerprints.
    return datasets.Dataset(table, fingerprint=stable_hash("documents", prefix, len(dataset)))


def _jsonl_documents(path: Path, text_field: str, cache: str) -> datasets.Dataset:
    """Records named ``{path}#{record number}`` (1-based; the line number without blank lines)."""
    try:
        loaded = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache)
    except Exception:
        _locate_jsonl_problem(path, text_field)
        if path.read_text(encoding="utf-8", errors="replace").strip():
            raise
        return _empty_documents()  # blank lines only: no records
    if text_field not in loaded.column_names or not _is_string_column(loaded, text_field):
        _locate_jsonl_problem(path, text_field)
    elif loaded.data.column(text_field).null_count:
        _locate_jsonl_problem(path, text_field)  # a null is fine, a missing field is not
    return _named_documents(loaded, text_field, f"{path}#", f"{path}: record", first=1)


def _parquet_documents(path: Path, text_field: str, cache: str) -> datasets.Dataset:
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache)
    if text_field not in loaded.column_names:
        raise ValueError(
            f"{path}: Parquet file has no column {text_field!r} ({loaded.column_names})"
        )
    return _named_documents(loaded, text_field, f"{path}#", f"{path}: row")


def _hf_dataset_documents(path: Path, text_field: str) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    parts = []
    for split, dataset in sorted(splits, key=lambda item: item[0]):
        if text_field not in dataset.column_names:
            raise ValueError(
                f"{path}: dataset has no column {text_field!r} ({dataset.column_names})"
            )
        prefix = f"{path}#{split}/" if split else f"{path}#"
        where = f"{path}: split {split!r}, row" if split else f"{path}: row"
        parts.append(_named_documents(dataset, text_field, prefix, where))
    return datasets.concatenate_datasets(parts)


def _empty_documents() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"name": [], "text": []}, features=DOCUMENT_FEATURES)


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def user_documents(
    sources: Sequence[PathLike],
    text_field: str = "text",
    max_files: int | None = None,
    cache_dir: PathLike | None = None,
) -> tuple[datasets.Dataset, str]:
    """Documents from user paths (files, globs, directories, JSONL, Parquet, HF dataset dirs).

    Plain-text files are one document each; JSONL records, Parquet rows and dataset rows are one
    document each, in file order. Missing (null) texts and empty documents are dropped, and so
    are binary files matched by a glob or met while walking a directory. A malformed JSONL line,
    a non-string text field or ``max_files`` below 1 is a ValueError naming the file (and line
    or row). The fingerprint covers every underlying file's path, size and modification time.
    """
    check_max_files(max_files)
    cache = str(cache_root(cache_dir) / "datasets")
    parts: list[datasets.Dataset] = []
    texts: list[Path] = []  # consecutive plain-text files, loaded together

    def flush() -> None:
        if texts:
            parts.append(files_dataset(texts, [p.as_posix() for p in texts], cache_dir))
            texts.clear()

    keys: list[tuple[str, int, int]] = []
    for entry in sources:
        for path, walked in _expand_entry(entry):
            keys.extend(_stat_key(f, f.as_posix()) for f in _files_under(path))
            suffix = path.suffix.lower()
            if path.is_dir() or suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES:
                flush()
                if path.is_dir():
                    parts.append(_hf_dataset_documents(path, text_field))
                elif suffix in JSONL_SUFFIXES:
                    parts.append(_jsonl_documents(path, text_field, cache))
                else:
                    parts.append(_parquet_documents(path, text_field, cache))
            elif not (walked and _looks_binary(path)):
                texts.append(path)
    flush()
    named = [os.fspath(s) for s in sources]
    docs = datasets.concatenate_datasets(parts) if parts else _empty_documents()
    texts = docs.data.column("text")
    if len(texts) == texts.null_count:
        raise ValueError(f"the data source {named} holds no documents")
    nonempty = pc.fill_null(pc.greater(pc.binary_length(texts), 0), False)
    keep = pc.indices_nonzero(nonempty).to_numpy().astype(np.int64)[:max_files]
    if len(keep) == 0:
        raise ValueError(f"the data source {named} is empty: its documents hold no text")
    if len(keep) < len(docs):
        docs = docs.select(keep)
    return docs, stable_hash("user", keys, text_field, max_files)


def load_documents(
    source: PathLike | Sequence[PathLike] = "stdlib",
    text_field: str = "text",
    max_files: int | None = None,
    cache_dir: PathLike | None = None,
) -> tuple[datasets.Dataset, str]:
    """The documents of ``source`` (``"stdlib"`` or user paths) and the corpus fingerprint.

    Returns a ``datasets.Dataset`` with string columns ``name`` and ``text``.
    """
    if isinstance(source, str | os.PathLike) and os.fspath(source) == "stdlib":
        return stdlib_documents(max_files, cache_dir)
    sources = [source] if isinstance(source, str | os.PathLike) else list(source)
    if not sources:
        raise ValueError("the data source is an empty list")
    return user_documents(sources, text_field, max_files, cache_dir)
