"""Opening whatever folder a user points a command at: one door, one-line errors.

``cpd-mtp retrofit`` writes a drafter-only export by default (``drafter.safetensors`` and the
identity of its base) or, with ``--merged``, the whole model; ``cpd-mtp train`` writes a
merged ``CPDMTPForCausalLM``. Every command that takes ``--model`` (``generate``, ``measure``,
the Medusa converter) opens those folders through :func:`open_export`, which tells the kinds
apart, checks what can be checked before any weight is read (the checksum record, the drafter
file's header, the weights' presence, the tokenizer), and turns every failure into a
``ValueError`` of one line naming the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

__all__ = ["ExportKind", "export_kind", "open_export"]

ExportKind = Literal["drafter", "merged", "plain"]


def export_kind(path: str | os.PathLike[str]) -> ExportKind:
    """What a model folder holds: a drafter-only export, a merged ``cpd_mtp`` model, or a plain
    Hugging Face model of another type.

    Raises:
        ValueError: ``path`` is not a folder with a readable ``config.json``.
    """
    from cpd_mtp.hf.export import is_drafter_export

    folder = Path(path)
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{folder} is not a saved model folder (no config.json)")
    if is_drafter_export(folder):
        return "drafter"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{config} is unreadable: {err}") from None
    return "merged" if model_type == "cpd_mtp" else "plain"


def check_drafter_files(folder: Path) -> None:
    """The drafter file is present and whole: its safetensors header and every tensor read
    (a few MB), before the base model is loaded; a ``ValueError`` in one line otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cpd_mtp.hf.export import DRAFTER_WEIGHTS

    weights = folder / DRAFTER_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{folder} is a drafter-only export without its {DRAFTER_WEIGHTS}")
    try:
        load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{weights} is unreadable (cut short or corrupt?): {first}") from None


def open_export(
    path: str | os.PathLike[str],
    *,
    base_model: Any = None,
    tokenizer: bool = True,
    progress: bool = False,
) -> tuple[Any, Any]:
    """A saved ``CPDMTPForCausalLM`` (drafter-only or merged) in eval mode, and its tokenizer.

    Args:
        path: the folder ``retrofit`` or ``train`` wrote (``OUT/final``).
        base_model: for a drafter-only export, another copy of its base (a path or a loaded
            model); None loads the base the export records.
        tokenizer: also load the folder's tokenizer (left padding, as batched decoding wants).
        progress: transformers' progress bars (and the GGUF reader's) while loading.

    Returns:
        ``(model, tokenizer)``; the tokenizer is None when not asked for.

    Raises:
        ValueError: one line naming the folder: not a model folder, a plain model that is not a
            ``cpd_mtp`` export, missing or corrupt weights, a drafter whose base is missing or
            differs, no tokenizer.
    """
    from safetensors import SafetensorError

    from cpd_mtp.hf.export import ExportError, verify_export
    from cpd_mtp.hf.loading import TOKENIZER_FILES, check_model_folder, transformers_progress

    folder = Path(path)
    kind = export_kind(folder)
    if kind == "plain":
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get(
            "model_type"
        )
        raise ValueError(
            f"{folder} holds a plain {model_type!r} model, not a cpd_mtp export: give it a "
            f"drafting head first (cpd-mtp retrofit --model {folder} --out DIR) and use DIR/final"
        )
    try:
        verify_export(folder)  # every file against its checksum, before any is read
    except ExportError as err:
        raise ValueError(str(err)) from None
    if kind == "drafter":
        check_drafter_files(folder)
    else:
        check_model_folder(folder, tokenizer=False)
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the "
            "model's tokenizer beside it (tokenizer.save_pretrained)"
        )
    if base_model is not None and kind != "drafter":
        raise ValueError(f"{folder} is a merged export (it holds its base): drop the base model")

    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    options: dict[str, Any] = {} if base_model is None else {"base_model": base_model}
    try:
        with transformers_progress(progress):
            model = CPDMTPForCausalLM.from_pretrained(folder, local_files_only=True, **options)
    except (ValueError, FileNotFoundError) as err:  # these already name the folder
        raise ValueError(" ".join(str(err).split())) from None
    except (OSError, RuntimeError, KeyError, SafetensorError, ExportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"{folder}: cannot load the model ({type(err).__name__}: {first})"
        ) from None
    loaded_tokenizer = None
    if tokenizer:
        from transformers import AutoTokenizer

        try:
            loaded_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            why = " ".join(str(err).split())
            raise ValueError(f"{folder}: cannot load the tokenizer ({why})") from None
        loaded_tokenizer.padding_side = "left"
    return model.eval(), loaded_tokenizer
