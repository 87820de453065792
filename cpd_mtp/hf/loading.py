"""Loading a pretrained causal LM to retrofit: a local Hugging Face folder or a GGUF file.

``load_causal_lm(source)`` returns a plain, serialisable ``transformers`` model and its
tokenizer. A GGUF file is read with transformers' GGUF loader (the ``gguf`` package, in the
``hf`` extra), which dequantises every tensor to float; the loaded model is then rebuilt as an
ordinary model of its architecture, because transformers refuses to ``save_pretrained`` a model
that it loaded from GGUF.
"""

from __future__ import annotations

import os
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


def load_causal_lm(
    source: str | os.PathLike[str], dtype: torch.dtype | str | None = None
) -> tuple[Any, Any]:
    """A pretrained causal LM and its tokenizer, from a local folder or a ``.gguf`` file.

    Args:
        source: a local Hugging Face model folder (``config.json`` and weights, a tokenizer
            beside them), or a ``.gguf`` file (its tokenizer is read from the same file).
        dtype: the weights' dtype (``torch.float32``, ``"bfloat16"``, ...); None keeps the
            folder's dtype, and float32 for a GGUF file (dequantised weights).

    Returns:
        ``(model, tokenizer)``: a plain ``transformers`` causal LM in eval mode, on the CPU,
        whose ``save_pretrained`` works, and its tokenizer.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` is neither a model folder nor a ``.gguf`` file, or a bad dtype.
        cpd_mtp.utils.extras.MissingExtraError: ``transformers`` (or ``gguf`` for a GGUF file)
            is not installed.
    """
    transformers = require("transformers", "cpd_mtp.load_causal_lm")
    path = Path(source).expanduser()
    torch_dtype = _resolve_dtype(dtype)
    if not path.exists():
        raise FileNotFoundError(f"model source does not exist: {path}")
    if path.is_file() and path.suffix.lower() == ".gguf":
        require("gguf", "loading a .gguf model")
        kwargs = {"gguf_file": path.name, "local_files_only": True}
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        model = _plain_copy(loaded)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    elif path.is_dir() and (path / "config.json").is_file():
        kwargs = {"local_files_only": True}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        raise ValueError(
            f"model source {path} is neither a model folder (with config.json) nor a .gguf file"
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batched prompts need a pad id
    return model, tokenizer
