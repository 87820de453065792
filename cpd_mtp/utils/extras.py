"""Optional dependencies: a missing one is an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# The extra of pyproject.toml that brings each optional top-level module.
EXTRA_OF = {
    "transformers": "hf",
    "safetensors": "hf",
    "tokenizers": "hf",
    "accelerate": "hf",
    "gguf": "hf",
    "deepspeed": "train",
    "wandb": "train",
    "datasets": "train",
    "omegaconf": "train",
    "tqdm": "train",
    "matplotlib": "bench",
    "cut_cross_entropy": "bench",
    "liger_kernel": "bench",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or raise ``MissingExtraError`` saying ``pip install 'cpd_mtp[extra]'``.

    Args:
        module: the top-level module name, e.g. ``"transformers"``.
        feature: what needs it, for the message, e.g. ``"cpd_mtp.hf"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRA_OF.get(module.split(".")[0], "all")
        raise MissingExtraError(
            f"{feature} needs the optional dependency {module!r}, which is not installed; "
            f"install it with: pip install 'cpd_mtp[{extra}]'"
        ) from err
