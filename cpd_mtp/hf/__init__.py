"""The Hugging Face integration: ``CPDMTPForCausalLM`` and its config (the ``hf`` extra).

Importing this package (or any module in it) without ``transformers`` raises
``MissingExtraError`` naming ``pip install 'cpd_mtp[hf]'``.
"""

from __future__ import annotations

import importlib
from typing import Any

from cpd_mtp.utils.extras import require

require("transformers", "cpd_mtp.hf")

__all__ = ["CPDMTPForCausalLM", "CPDMTPModelConfig"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``cpd_mtp.hf.export`` does not load the model code it does not use.
    if name in __all__:
        return getattr(importlib.import_module("cpd_mtp.hf.modeling"), name)
    raise AttributeError(f"module 'cpd_mtp.hf' has no attribute {name!r}")
