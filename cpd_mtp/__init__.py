"""cpd_mtp: rank-r CP-decomposition multi-token prediction heads.

The head and its config import quickly; the Hugging Face integration (which imports
``transformers``) and decoding load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from cpd_mtp.config import CPDMTPConfig
from cpd_mtp.head import CPDMTPHead, CPDMTPHeadOutput

__version__ = "0.1.0"

_LAZY = {
    "CPDMTPForCausalLM": "cpd_mtp.hf.modeling",
    "CPDMTPModelConfig": "cpd_mtp.hf.modeling",
    "tiny_llama_config": "cpd_mtp.hf.modeling",
    "generate": "cpd_mtp.decoding.speculative",
}

__all__ = ["CPDMTPConfig", "CPDMTPHead", "CPDMTPHeadOutput", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cpd_mtp' has no attribute {name!r}")
