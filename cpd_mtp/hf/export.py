"""Crash-safe, verifiable model exports.

An export is written into a temporary folder next to its target and renamed into place only
when complete, with ``cpd_mtp_export.json`` recording every file's size and SHA-256. An
existing export at the target is moved aside first and deleted only after the new one is in
place, so a kill or an error at any point leaves the previous export readable.
``CPDMTPForCausalLM.from_pretrained`` checks the record when a local export carries one
(:func:`verify_export`) and refuses NaN or inf weights (:func:`check_finite`).

Two kinds of export:

- **merged** (:func:`save_export`): the whole model, trunk and head, as Hugging Face
  ``save_pretrained`` writes it. Self-contained.
- **drafter-only** (:func:`save_drafter`): what a retrofit trained, and nothing else: the head's
  gate, experts and draft ids (``drafter.safetensors``), the model config with the full head
  config, the tokenizer, and the identity of the base model the head drafts for
  (``drafter.json``: where it came from, and :func:`drafter_fingerprint` of its weights).
  :func:`read_drafter` reads and checks those files; ``CPDMTPForCausalLM.from_pretrained``
  loads the base again (or takes ``base_model=``), checks its fingerprint
  (:func:`check_base_fingerprint`) and attaches the head in base mode.

This module reads and writes folders; building models is ``cpd_mtp.hf.modeling``'s.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpd_mtp.head import SHARED_KEYS, CPDMTPHead
from cpd_mtp.utils.files import swap_in_directory
from cpd_mtp.utils.records import check_files, read_record, seal

EXPORT_RECORD = "cpd_mtp_export.json"
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
# A drafter-only export: the base model's identity, and the head's own tensors.
DRAFTER_RECORD = "drafter.json"
DRAFTER_WEIGHTS = "drafter.safetensors"
DRAFTER_FORMAT = "cpd_mtp drafter-only export"
DRAFTER_VERSION = 1
FINGERPRINT_SCHEME = (
    "sha256-bf16-v1: SHA-256 over W_U (the output embedding) then the input embedding, each as "
    "its shape then its values cast to bfloat16 (row-major, little-endian)"
)

__all__ = [
    "DRAFTER_RECORD",
    "DRAFTER_WEIGHTS",
    "EXPORT_RECORD",
    "DrafterFiles",
    "ExportError",
    "atomic_export",
    "base_source",
    "check_base_fingerprint",
    "check_finite",
    "drafter_base",
    "drafter_fingerprint",
    "is_drafter_export",
    "read_drafter",
    "save_drafter",
    "save_export",
    "set_special_tokens",
    "verify_export",
]


class ExportError(RuntimeError):
    """An export is corrupt (a file differs from its record) or holds non-finite weights."""


def set_special_tokens(model: Any, tokenizer: Any) -> None:
    """Copy the tokenizer's bos/eos/pad ids into the model's configs, in place.

    Written to ``model.config``, its ``text_config`` (when it has one) and
    ``model.generation_config``, so ``generate`` and pipelines stop on the tokenizer's eos and
    pad with its pad instead of the wrapped architecture's defaults.
    """
    ids = {name: getattr(tokenizer, name) for name in SPECIAL_TOKENS}
    configs = [model.config, getattr(model.config, "text_config", None)]
    configs.append(getattr(model, "generation_config", None))
    for config in configs:
        if config is not None:
            for name, value in ids.items():
                setattr(config, name, value)


def write_record(directory: Path) -> dict[str, Any]:
    """Fsync every file under ``directory`` and record its size and SHA-256 in ``EXPORT_RECORD``."""
    return seal(directory, EXPORT_RECORD)


def verify_export(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Check every file of an export against its ``EXPORT_RECORD``; None when there is none.

    Raises:
        ExportError: naming the file that is missing or does not match its size or SHA-256, or
            the record itself when it is unreadable or malformed.
    """
    directory = Path(directory)
    if not (directory / EXPORT_RECORD).is_file():
        return None
    what = f"export {directory}"
    record = read_record(directory, EXPORT_RECORD, ExportError, what)
    check_files(directory, record, ExportError, what)
    return record


def check_finite(model: torch.nn.Module, source: str | os.PathLike[str] | None = None) -> None:
    """Raise ``ExportError`` naming the first parameter or buffer with a NaN or inf entry.

    Partitioned (ZeRO-3, zero local elements) and meta tensors are skipped.
    """
    _check_finite_tensors([*model.named_parameters(), *model.named_buffers()], source)


def _check_finite_tensors(tensors: Any, source: str | os.PathLike[str] | None = None) -> None:
    """:func:`check_finite` over ``(name, tensor)`` pairs."""
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.is_meta:
            continue
        if not bool(torch.isfinite(tensor).all()):
            where = f" loaded from {source}" if source is not None else ""
            raise ExportError(f"weight {name}{where} holds NaN or inf values; refusing to use it")


@contextlib.contextmanager
def atomic_export(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; on success it becomes ``target``.

    On leaving the block the folder's files are fsynced and recorded (``EXPORT_RECORD``), an
    existing ``target`` is renamed aside, the new folder renamed to ``target``, and only then the
    old one deleted. An exception inside the block leaves ``target`` as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had our pid
    tmp.mkdir()  # not mkdtemp: the export keeps the usual (umask) permissions
    backup = target.with_name(f".{target.name}.old{os.getpid()}")
    try:
        yield tmp
        write_record(tmp)
        swap_in_directory(tmp, target, backup)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def save_export(
    model: Any,
    tokenizer: Any,
    target: str | os.PathLike[str],
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to ``target`` through :func:`atomic_export`.

    The merged export: the whole model, trunk included, loadable without anything else. For a
    retrofit (a base-mode head on a frozen model) :func:`save_drafter` writes only the head.
    The tokenizer's bos/eos/pad ids are written into the model's configs first
    (:func:`set_special_tokens`). ``extra_files`` maps file names to text written alongside.
    """
    set_special_tokens(model, tokenizer)
    with atomic_export(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(target)


# ---------------------------------------------------------------------- drafter-only exports
_FINGERPRINT_CHUNK = 1 << 24  # elements cast to bfloat16 at a time


def _embedding_weight(module: Any, what: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"the model's {what} has no weight tensor to fingerprint")
    if weight.is_meta or (weight.numel() == 0 and hasattr(weight, "ds_shape")):
        raise ValueError(
            f"the model's {what} is not materialised (meta device, or partitioned by ZeRO-3): "
            "gather it before fingerprinting or exporting"
        )
    return weight.detach()


def drafter_fingerprint(causal_lm: Any) -> str:
    """The identity of the base weights a drafter reads: a hex SHA-256 of W_U and the embedding.

    Hashed: the output embedding W_U (``get_output_embeddings().weight``, which the head's
    experts unembed with) then the input embedding (``get_input_embeddings().weight``), each as
    its shape then its values cast to bfloat16, row-major, little-endian
    (:data:`FINGERPRINT_SCHEME`). The cast makes it the same for a float32 and a bfloat16 load of
    the same weights (bfloat16 keeps float32's exponent: casting either load gives the same
    bits), on any device; a float16 load rounds twice and can differ. A tied model hashes the
    one matrix twice, so a tied and an untied copy holding the same values agree. The rest of
    the trunk is not hashed: the fingerprint tells a model apart from other models (another
    checkpoint, a fine-tune of the embeddings, another vocabulary), it does not prove the
    decoder layers unchanged.

    Args:
        causal_lm: a Hugging Face causal LM, or a ``CPDMTPForCausalLM`` (whose output embedding
            is its head, with W_U as ``weight``), with materialised weights.

    Returns:
        64 hex digits.

    Raises:
        ValueError: the model has no such embeddings, or they are on the meta device or
            partitioned by ZeRO-3 (gather them first).
    """
    modules = (
        ("output embedding", causal_lm.get_output_embeddings()),
        ("input embedding", causal_lm.get_input_embeddings()),
    )
    digest = hashlib.sha256(b"cpd_mtp drafter base fingerprint v1\n")
    for role, module in modules:
        weight = _embedding_weight(module, role)
        digest.update(f"{role} {list(weight.shape)}\n".encode())
        flat = weight.reshape(-1)
        for start in range(0, flat.numel(), _FINGERPRINT_CHUNK):
            chunk = flat[start : start + _FINGERPRINT_CHUNK].to("cpu", torch.bfloat16)
            digest.update(chunk.contiguous().view(torch.int16).numpy().astype("<i2", copy=False))
    return digest.hexdigest()


def is_drafter_export(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` is a drafter-only export (it holds a ``DRAFTER_RECORD``)."""
    return (Path(directory) / DRAFTER_RECORD).is_file()


def save_drafter(
    model: Any,
    tokenizer: Any,
    path: str | os.PathLike[str],
    *,
    base_source: str | os.PathLike[str],
    extra_files: dict[str, str] | None = None,
    progress: bool = True,
) -> None:
    """Write the drafter-only export of a retrofit: the head, not the base model it drafts for.

    Written through :func:`atomic_export` (so crash-safe and checked by :func:`verify_export`):

    - ``drafter.safetensors`` (:data:`DRAFTER_WEIGHTS`): the head's own tensors, every entry
      of ``model.head.state_dict()`` but the shared unembedding ``weight`` (W_U, the base's)
      and the shared input embedding ``token_embedding`` of a token-conditioned head (the
      base's too, never in the head's state dict), under ``head.`` (``head.gate.weight``,
      ``head.experts.*``, ``head.draft_ids``, ``head.token_proj.weight``). No tensor of the
      trunk.
    - ``config.json``: the model config (``CPDMTPModelConfig``) with the head's full
      ``CPDMTPConfig`` as ``head_config`` and ``freeze_trunk`` true; ``generation_config.json``;
      the tokenizer. The tokenizer's bos/eos/pad ids are first written into the model's configs
      (:func:`set_special_tokens`), as :func:`save_export` does.
    - ``drafter.json`` (:data:`DRAFTER_RECORD`): ``base_source`` as given, its absolute path
      (``base_source_absolute``, when it names an existing path) and ``base_fingerprint``, the
      :func:`drafter_fingerprint` of ``model``'s W_U and input embedding.

    ``CPDMTPForCausalLM.from_pretrained(path)`` loads ``base_source`` again and attaches the
    head; ``from_pretrained(path, base_model=...)`` attaches it to another copy of the base.

    Args:
        model: a base-mode ``CPDMTPForCausalLM`` (``next_token="base"``) whose trunk and W_U are
            the base model's unchanged weights (a retrofit: ``from_causal_lm(base, ...,
            next_token="base", freeze_trunk=True)``).
        tokenizer: the base model's tokenizer.
        path: the export folder (replaced atomically when it exists).
        base_source: the path (an HF folder or a ``.gguf`` file) or hub id the base was loaded
            from, recorded as given. A relative path is resolved against the working directory
            when the export is loaded, then against the absolute path recorded here.
        extra_files: file names mapped to text written alongside (e.g. a training config).
        progress: transformers' progress bars while writing.

    Raises:
        ValueError: ``model`` is not a ``CPDMTPForCausalLM`` in base mode, ``base_source`` is
            empty, an extra file would replace a file of the export, or a weight is still
            partitioned by ZeRO-3 (gather first).
    """
    from safetensors.torch import save

    from cpd_mtp.hf.loading import transformers_progress

    if not isinstance(getattr(model, "head", None), CPDMTPHead):
        raise ValueError(f"save_drafter needs a CPDMTPForCausalLM, got {type(model).__name__}")
    head_config = model.head.config
    if head_config.next_token != "base":
        raise ValueError(
            f"save_drafter exports a base-mode drafter, but this head has next_token="
            f"{head_config.next_token!r} (its own next-token distribution): use save_export"
        )
    source = os.fspath(base_source)
    if not source.strip():
        raise ValueError("base_source must name the base model (a path or a hub id), got ''")
    reserved = {DRAFTER_RECORD, DRAFTER_WEIGHTS, EXPORT_RECORD, "config.json"}
    clashes = sorted(reserved & set(extra_files or {}))
    if clashes:
        raise ValueError(f"extra_files would replace files of the export: {clashes}")

    fingerprint = drafter_fingerprint(model)
    state = {}
    for name, tensor in model.head.state_dict().items():
        if name in SHARED_KEYS:  # W_U and the embedding: the base's, known by the fingerprint
            continue
        if tensor.is_meta or (tensor.numel() == 0 and hasattr(tensor, "ds_shape")):
            raise ValueError(f"head.{name} is not materialised (meta, or ZeRO-3): gather it first")
        state[f"head.{name}"] = tensor.detach().to("cpu").contiguous().clone()

    set_special_tokens(model, tokenizer)
    config = copy.deepcopy(model.config)
    config.head_config = head_config.to_dict()  # every field, from the head itself
    config.freeze_trunk = True
    config.architectures = [type(model).__name__]
    local = Path(source).expanduser()
    record = {
        "format": DRAFTER_FORMAT,
        "version": DRAFTER_VERSION,
        "weights": DRAFTER_WEIGHTS,
        "base_source": source,
        "base_source_absolute": str(local.absolute()) if local.exists() else None,
        "base_fingerprint": fingerprint,
        "fingerprint_scheme": FINGERPRINT_SCHEME,
        "base_model_type": getattr(model.config.text_config, "model_type", None),
        "head_tensors": sorted(state),
    }
    with transformers_progress(progress), atomic_export(path) as tmp:
        # Bytes written here, not save_file: the file gets the umask's permissions as the rest.
        (tmp / DRAFTER_WEIGHTS).write_bytes(save(state, metadata={"format": "pt"}))
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / DRAFTER_RECORD).write_text(json.dumps(record, indent=1))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


def _read_drafter_record(directory: Path) -> dict[str, Any]:
    try:
        record = json.loads((directory / DRAFTER_RECORD).read_text())
        if record.get("format") != DRAFTER_FORMAT:
            raise ValueError(f"format is {record.get('format')!r}")
        if not isinstance(record.get("version"), int) or record["version"] > DRAFTER_VERSION:
            raise ValueError(f"version {record.get('version')!r} is newer than this cpd_mtp's")
        for key in ("base_source", "base_fingerprint"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{key} is {record.get(key)!r:.80}")
        if record.get("weights") != DRAFTER_WEIGHTS:
            raise ValueError(f"weights is {record.get('weights')!r:.80}, not {DRAFTER_WEIGHTS}")
    except (OSError, ValueError, AttributeError) as err:
        raise ExportError(
            f"drafter export {directory} has an unreadable {DRAFTER_RECORD}: {err}"
        ) from err
    return record


def _resolve_base_source(record: dict[str, Any], directory: Path) -> Path:
    """The recorded base: ``base_source`` against the working directory, then its absolute path."""
    given = record["base_source"]
    candidates = [Path(given).expanduser()]
    absolute = record.get("base_source_absolute")
    if isinstance(absolute, str) and not candidates[0].is_absolute():
        candidates.append(Path(absolute))
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = " nor ".join(str(c.absolute()) for c in candidates)
    tried = f"neither {tried} exists" if len(candidates) > 1 else f"{tried} does not exist"
    raise FileNotFoundError(
        f"the drafter export {directory} was trained on base {given!r}, which is not here "
        f"({tried}): pass base_model= a path to that base or the loaded model"
    )


def drafter_base(directory: str | os.PathLike[str]) -> Path:
    """The base model a drafter-only export records, resolved as ``from_pretrained`` does.

    Raises:
        FileNotFoundError: the recorded base is not here.
        ExportError: the export's record is unreadable.
    """
    directory = Path(directory)
    return _resolve_base_source(_read_drafter_record(directory), directory)


@dataclass
class DrafterFiles:
    """What a drafter-only export holds, read and checked (:func:`read_drafter`).

    Attributes:
        directory: the export folder.
        record: ``drafter.json``: the base's source and fingerprint.
        stored: ``config.json`` as a dict (the model config, special token ids).
        head_values: the head's ``CPDMTPConfig`` fields.
        state: the head's own tensors, keys without the ``head.`` prefix.
    """

    directory: Path
    record: dict[str, Any]
    stored: dict[str, Any]
    head_values: dict[str, Any]
    state: dict[str, torch.Tensor]


def read_drafter(
    directory: str | os.PathLike[str], head_config: dict[str, Any] | None = None
) -> DrafterFiles:
    """Read a drafter-only export's files, before any base model is loaded.

    Args:
        directory: the export folder written by :func:`save_drafter`.
        head_config: the head's ``CPDMTPConfig`` fields; None reads them from ``config.json``.

    Raises:
        ExportError: an unreadable record or weights file (cut short, say), a head that is not
            in base mode, a tensor that is not the head's own, or a head tensor holding NaN or
            inf (named).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    record = _read_drafter_record(directory)
    try:
        stored = json.loads((directory / "config.json").read_text())
        values = dict(head_config if head_config is not None else stored["head_config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ExportError(
            f"drafter export {directory} has an unreadable config.json: {err}"
        ) from None
    if values.get("next_token") != "base":
        raise ExportError(
            f"drafter export {directory} holds a head with next_token="
            f"{values.get('next_token')!r}; a drafter drafts for its base (next_token='base')"
        )
    weights = directory / DRAFTER_WEIGHTS
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{weights} is unreadable (cut short or corrupt?): {first}") from None
    outside = sorted(
        k for k in state if not k.startswith("head.") or k.removeprefix("head.") in SHARED_KEYS
    )
    if outside:
        raise ExportError(
            f"drafter export {directory}: {weights.name} holds tensors that are not the head's "
            f"own: {outside[:3]}"
        )
    # The export's own weights; the base's are the base's (a merged export checks them all).
    _check_finite_tensors(sorted(state.items()), directory)
    state = {key.removeprefix("head."): tensor for key, tensor in state.items()}
    return DrafterFiles(directory, record, stored, values, state)


def check_base_fingerprint(base: Any, files: DrafterFiles, described: str) -> None:
    """Refuse, in one line, a base whose :func:`drafter_fingerprint` is not the recorded one."""
    got, want = drafter_fingerprint(base), files.record["base_fingerprint"]
    if got != want:
        raise ValueError(
            f"the base model {described} is not the one the drafter in {files.directory} was "
            f"trained on: its W_U/embedding fingerprint is {got[:12]}..., the drafter's base "
            f"{files.record['base_source']!r} has {want[:12]}...; pass base_model= (a path or a "
            "loaded model) holding that base's weights"
        )


def base_source(files: DrafterFiles) -> Path:
    """The recorded base of a drafter export, resolved as :func:`drafter_base` does."""
    return _resolve_base_source(files.record, files.directory)
