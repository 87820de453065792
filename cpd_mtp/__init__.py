"""cpd_mtp: rank-r CP-decomposition multi-token prediction heads.

The model (``CPDMTPConfig``, ``CPDMTPHead``, its loss and its marginal) needs torch alone.
The Hugging Face integration and decoding need the ``hf`` extra; they load on first use, and
without the extra that use raises ``MissingExtraError`` naming ``pip install 'cpd_mtp[hf]'``.
"""

from __future__ import annotations

import importlib
from typing import Any

from cpd_mtp.config import CPDMTPConfig
from cpd_mtp.head import CPDMTPHead, CPDMTPHeadOutput
from cpd_mtp.utils.extras import require

__version__ = "0.1.0"

# Lazy names: the module that defines each one.
_LAZY = {
    "CPDMTPForCausalLM": "cpd_mtp.hf",
    "CPDMTPModelConfig": "cpd_mtp.hf",
    "generate": "cpd_mtp.decoding",
}

__all__ = ["CPDMTPConfig", "CPDMTPHead", "CPDMTPHeadOutput"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require("transformers", f"cpd_mtp.{name}")
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cpd_mtp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
