"""Loading a pretrained causal LM to retrofit: a local Hugging Face folder or a GGUF file.

``load_causal_lm(source)`` returns a plain, serialisable ``transformers`` model and its
tokenizer. A GGUF file is read with transformers' GGUF loader (the ``gguf`` package, in the
``hf`` extra), which dequantises every tensor to float; the loaded model is then rebuilt as an
ordinary model of its architecture, because transformers refuses to ``save_pretrained`` a model
that it loaded from GGUF.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cpd_mtp.utils.extras import require

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be a torch dtype or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _plain_copy(model: Any) -> Any:
    """The same weights in a freshly built model of the same class (serialisable)."""
    transformers = require("transformers", "loading a GGUF model")
    plain = transformers.AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # A tied lm_head has no entry of its own; anything else missing is a real mismatch.
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"could not rebuild the GGUF model as a plain {type(plain).__name__}: "
            f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
        )
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


# Files that hold a model's weights, and a tokenizer, in a Hugging Face folder.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_folder(path: Path, *, tokenizer: bool = True) -> None:
    """One-line ``ValueError``s for a folder that cannot be a model: no weights, no tokenizer."""
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(
            f"{path} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])})"
        )
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the model's "
            "tokenizer beside it (tokenizer.save_pretrained)"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars (loading weights, reading a GGUF file, writing shards)
    on or off for the duration, then as they were; off whenever transformers' bars are off
    (``transformers.utils.logging.disable_progress_bar()``)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    # transformers' own switch (``disable_progress_bar()``) silences the GGUF reader's bar too,
    # which calls tqdm itself.
    enabled = enabled and was_enabled
    gguf_utils, gguf_tqdm = None, None
    if not enabled:
        hf_logging.disable_progress_bar()
        # The GGUF reader calls tqdm itself, not through transformers' switch.
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils

            gguf_tqdm = gguf_utils.tqdm
            gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_utils is not None:
            gguf_utils.tqdm = gguf_tqdm
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def load_tokenizer_only(source: str | os.PathLike[str]) -> Any:
    """The tokenizer of a model folder or a ``.gguf`` file, without loading the model (so the
    data can be checked first).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: no tokenizer can be read from it; one line.
    """
    transformers = require("transformers", "cpd_mtp.load_causal_lm")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model source does not exist: {path}")
    try:
        if path.is_file() and path.suffix.lower() == ".gguf":
            require("gguf", "loading a .gguf model")
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True
            )
        elif path.is_dir():
            if not any((path / name).is_file() for name in TOKENIZER_FILES):
                raise ValueError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            raise ValueError(f"{path} is neither a model folder nor a .gguf file")
    except (OSError, struct.error, KeyError, EOFError) as err:
        raise ValueError(f"cannot read the tokenizer of {path}: {_first_line(err)}") from err
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batched prompts need a pad id
    return tokenizer


def load_causal_lm(
    source: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    *,
    progress: bool = True,
    tokenizer: bool = True,
) -> tuple[Any, Any]:
    """A pretrained causal LM and its tokenizer, from a local folder or a ``.gguf`` file.

    Args:
        source: a local Hugging Face model folder (``config.json`` and weights, a tokenizer
            beside them), or a ``.gguf`` file (its tokenizer is read from the same file).
        dtype: the weights' dtype (``torch.float32``, ``"bfloat16"``, ...); None keeps the
            folder's dtype, and float32 for a GGUF file (dequantised weights).
        progress: transformers' progress bars while loading.
        tokenizer: False skips the tokenizer (None is returned in its place, and a folder
            need not hold one): for a caller that has its own, such as a drafter-only export.

    Returns:
        ``(model, tokenizer)``: a plain ``transformers`` causal LM in eval mode, on the CPU,
        whose ``save_pretrained`` works, and its tokenizer.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` is neither a model folder nor a ``.gguf`` file, a GGUF file cut
            short or corrupt, a folder without weights or tokenizer, or a bad dtype; in one
            line.
        cpd_mtp.utils.extras.MissingExtraError: ``transformers`` (or ``gguf`` for a GGUF file)
            is not installed.
    """
    transformers = require("transformers", "cpd_mtp.load_causal_lm")
    from safetensors import SafetensorError

    path = Path(source).expanduser()
    torch_dtype = _resolve_dtype(dtype)
    load_tokenizer, tokenizer = tokenizer, None
    if not path.exists():
        raise FileNotFoundError(f"model source does not exist: {path}")
    if path.is_file() and path.suffix.lower() == ".gguf":
        require("gguf", "loading a .gguf model")
        kwargs = {"gguf_file": path.name, "local_files_only": True}
        try:
            with transformers_progress(progress):
                loaded = transformers.AutoModelForCausalLM.from_pretrained(
                    str(path.parent), **kwargs
                )
                if load_tokenizer:
                    tokenizer = transformers.AutoTokenizer.from_pretrained(
                        str(path.parent), **kwargs
                    )
        except (struct.error, ValueError, OSError, EOFError, IndexError, KeyError) as err:
            raise ValueError(
                f"cannot read the GGUF file {path} ({path.stat().st_size:,} bytes; cut short or "
                f"corrupt?): {_first_line(err)}"
            ) from err
        model = _plain_copy(loaded)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    elif path.is_dir() and (path / "config.json").is_file():
        check_model_folder(path, tokenizer=load_tokenizer)
        kwargs = {"local_files_only": True}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        try:
            with transformers_progress(progress):
                model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
                if load_tokenizer:
                    tokenizer = transformers.AutoTokenizer.from_pretrained(
                        str(path), local_files_only=True
                    )
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
            raise ValueError(f"cannot load the model in {path}: {_first_line(err)}") from err
        model = model.eval()
    else:
        raise ValueError(
            f"model source {path} is neither a model folder (with config.json) nor a .gguf file"
        )
    if tokenizer is None:
        return model, None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batched prompts need a pad id
    return model, tokenizer
