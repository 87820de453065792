"""cpd_mtp: rank-r CP-decomposition multi-token prediction heads.

The model (``CPDMTPConfig``, ``CPDMTPHead``, its loss and its marginal) needs torch alone.
The Hugging Face integration and decoding need the ``hf`` extra; they load on first use, and
without the extra that use raises ``MissingExtraError`` naming ``pip install 'cpd_mtp[hf]'``.

When transformers is installed, importing ``cpd_mtp`` registers ``CPDMTPModelConfig`` and
``CPDMTPForCausalLM`` with the Auto classes, so ``AutoModelForCausalLM.from_pretrained(folder)``
and ``pipeline("text-generation", model=folder)`` load an export. Only the light config module
is imported here; the model class is imported the first time a ``CPDMTPModelConfig`` is built.
"""

from __future__ import annotations

import importlib
import importlib.util
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
    "load_causal_lm": "cpd_mtp.hf.loading",
}

__all__ = ["CPDMTPConfig", "CPDMTPHead", "CPDMTPHeadOutput"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require("transformers", f"cpd_mtp.{name}")
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cpd_mtp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def _register_auto_classes() -> None:
    """Register the config (and, through it, the model) with transformers, when installed."""
    try:
        installed = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # an import hook refusing it, a broken install
        installed = False
    if installed:
        importlib.import_module("cpd_mtp.hf.configuration")


_register_auto_classes()
