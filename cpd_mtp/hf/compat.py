"""What differs between the transformers versions cpd_mtp supports, decided in one place.

transformers 5.25 renamed the key/value cache of model forwards and outputs from
``past_key_values`` to ``cache`` (the old keyword warns, and is to be removed in 5.40). Each
model class says which name it takes in its ``forward`` signature, so the choice is made per
class: a model of this version gets ``cache``, an older one (or a remote-code model that kept
the old name) gets ``past_key_values``, and neither warns.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["OUTPUT_CACHE_FIELD", "cache_keyword", "output_cache"]

# The field of Hugging Face's model outputs that holds the cache in the installed version.
OUTPUT_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


@functools.cache
def _cache_keyword_of(forward: Any) -> str:
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(module: Any) -> str:
    """``"cache"`` when ``module.forward`` takes a ``cache`` argument, else ``"past_key_values"``."""
    return _cache_keyword_of(type(module).forward)


def output_cache(outputs: Any) -> Any | None:
    """The cache a model output holds (None when it holds none), under either name."""
    fields = getattr(outputs, "__dataclass_fields__", {})
    for name in ("cache", "past_key_values"):
        if name in fields:
            return getattr(outputs, name)
    return None
