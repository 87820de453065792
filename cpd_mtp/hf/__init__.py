"""The Hugging Face integration: ``CPDMTPForCausalLM`` and its config (the ``hf`` extra).

Importing this package (or any module in it) without ``transformers`` raises
``MissingExtraError`` naming ``pip install 'cpd_mtp[hf]'``.
"""

from __future__ import annotations

import importlib
from typing import Any

from cpd_mtp.utils.extras import require

require("transformers", "cpd_mtp.hf")

__all__ = [
    "CPDMTPForCausalLM",
    "CPDMTPMetricsCallback",
    "CPDMTPModelConfig",
    "add_metrics_callback",
]

_MODULES = {
    "CPDMTPForCausalLM": "cpd_mtp.hf.modeling",
    "CPDMTPModelConfig": "cpd_mtp.hf.configuration",
    "CPDMTPMetricsCallback": "cpd_mtp.hf.callbacks",
    "add_metrics_callback": "cpd_mtp.hf.callbacks",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that ``cpd_mtp.hf.export`` does not load the model code it does not use.
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module 'cpd_mtp.hf' has no attribute {name!r}")
