"""Every private transformers API cpd_mtp touches, behind one door, with the tested range.

cpd_mtp reaches into transformers where no public API does what it needs: the steps of
``GenerationMixin.generate`` that resolve a call (so ``model.generate`` can decode
speculatively exactly where Hugging Face's loop would run), the resolved special-token tensors,
a config's attention implementation, and the initialisation flags of ``post_init``. Those names
change between minor releases, so they live here only, and importing this module checks the
installed version against :data:`TESTED`: outside it, one warning names what may break and the
fallback (``model.generate(..., speculative=False)`` runs Hugging Face's own loop;
``cpd_mtp.generate`` needs none of these).

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

__all__ = [
    "OUTPUT_CACHE_FIELD",
    "TESTED",
    "attention_implementation",
    "cache_keyword",
    "check_version",
    "experts_implementation",
    "generation_steps",
    "mark_initialized",
    "output_cache",
    "set_attention_implementation",
    "set_source_path",
    "special_token_tensors",
]

# The transformers releases cpd_mtp's private calls were tested with: [low, high).
TESTED = ("5.23", "5.30")
_WARNED: set[str] = set()


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_version(version: str | None = None) -> bool:
    """Whether ``version`` (the installed transformers by default) lies in :data:`TESTED`;
    outside it, warn once, naming the fallback."""
    import warnings

    import transformers

    version = version or transformers.__version__
    low, high = TESTED
    inside = _release(low) <= _release(version) < _release(high)
    if not inside and version not in _WARNED:
        _WARNED.add(version)
        warnings.warn(
            f"transformers {version} is outside the range cpd_mtp was tested with "
            f"(>= {low}, < {high}): model.generate's speculative path calls private "
            "GenerationMixin methods that may have changed; if it fails, pass "
            "speculative=False (Hugging Face's own loop) or call cpd_mtp.generate",
            UserWarning,
            stacklevel=2,
        )
    return inside


# ---------------------------------------------------------------------- generate's steps
class generation_steps:
    """The private steps of ``GenerationMixin.generate`` that ``model.generate`` replays to
    resolve a call exactly as Hugging Face would (see ``cpd_mtp.hf.generation``)."""

    @staticmethod
    def config(model: Any, given: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(generation config, model kwargs): the call's config over the model's."""
        return model._prepare_generation_config(given, **kwargs)

    @staticmethod
    def special_tokens(model: Any, config: Any, has_mask: bool, device: Any, batch: int) -> None:
        """Resolve EOS / pad / BOS into tensors on ``config``, in place."""
        model._prepare_special_tokens(config, has_mask, device=device, batch_size=batch)

    @staticmethod
    def lengths(
        model: Any,
        config: Any,
        input_ids: Any,
        has_default_max_length: bool,
        has_default_min_length: bool,
    ) -> Any:
        """``max_length`` / ``min_length`` resolved and validated, as generate does."""
        length = input_ids.shape[1]
        config = model._prepare_generated_length(
            generation_config=config,
            has_default_max_length=has_default_max_length,
            has_default_min_length=has_default_min_length,
            model_input_name="input_ids",
            inputs_tensor=input_ids,
            input_ids_length=length,
        )
        model._validate_generated_length(config, length, has_default_max_length)
        return config

    @staticmethod
    def logits_processors(model: Any, config: Any, input_ids: Any, model_kwargs: dict) -> Any:
        """The ``LogitsProcessorList`` generate would build for this call."""
        from transformers import LogitsProcessorList

        return model._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=input_ids.shape[1],
            encoder_input_ids=input_ids,
            logits_processor=LogitsProcessorList(),
            device=input_ids.device,
            model_kwargs=model_kwargs,
        )

    @staticmethod
    def stopping_criteria(model: Any, config: Any, user: list, tokenizer: Any) -> Any:
        """The ``StoppingCriteriaList`` generate would build (the user's included)."""
        from transformers import StoppingCriteriaList

        return model._get_stopping_criteria(
            generation_config=config,
            stopping_criteria=StoppingCriteriaList(user),
            tokenizer=tokenizer,
        )


def special_token_tensors(config: Any) -> tuple[Any, Any]:
    """(EOS ids, pad id) as tensors (or None) after ``generation_steps.special_tokens``."""
    return config._eos_token_tensor, config._pad_token_tensor


# ---------------------------------------------------------------------- configs and modules
def attention_implementation(config: Any) -> str | None:
    """The attention kernel a model config selects (``"eager"``, ``"sdpa"``, ...)."""
    return getattr(config, "_attn_implementation", None)


def experts_implementation(config: Any) -> str | None:
    """The experts kernel a model config selects (mixture-of-experts models)."""
    return getattr(config, "_experts_implementation", None)


def set_attention_implementation(
    config: Any, attention: str | None, experts: str | None = None, *, only_unset: Any = None
) -> None:
    """Set a config's attention (and experts) implementation; with ``only_unset``, only where
    that config has not chosen its own."""
    if only_unset is None or attention_implementation(only_unset) is None:
        config._attn_implementation_internal = attention
    if experts is not None and (only_unset is None or experts_implementation(only_unset) is None):
        config._experts_implementation_internal = experts


def mark_initialized(module: Any) -> None:
    """Flag every submodule, parameter and buffer as initialised, so ``post_init`` keeps them."""
    for sub in module.modules():
        sub._is_hf_initialized = True
    for tensor in (*module.parameters(), *module.buffers()):
        tensor._is_hf_initialized = True


def set_source_path(config: Any, path: str) -> None:
    """Record where a model was loaded from, as ``from_pretrained`` does."""
    config._name_or_path = path


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


check_version()
