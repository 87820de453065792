"""``CPDMTPModelConfig``, registered with ``AutoConfig`` on import (a light module).

``import cpd_mtp`` imports this module whenever transformers is installed, so that
``AutoConfig`` knows ``model_type = "cpd_mtp"``. It stays light (transformers' configuration
code only): the model class (``cpd_mtp.hf.modeling``, which loads transformers' modelling and
generation code) is registered with ``AutoModelForCausalLM`` the first time a
``CPDMTPModelConfig`` is built, which every Auto path (``AutoModelForCausalLM.from_pretrained``,
``from_config``, ``pipeline``) does before it looks the model class up.
"""

from __future__ import annotations

import importlib
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from cpd_mtp.config import CPDMTPConfig
from cpd_mtp.hf.compat import (
    attention_implementation,
    experts_implementation,
    set_attention_implementation,
)

__all__ = ["CPDMTPModelConfig"]


class CPDMTPModelConfig(PretrainedConfig):
    """Configuration of ``CPDMTPForCausalLM``: the wrapped LM's config plus the head's.

    Args:
        text_config: the wrapped causal LM's config, a ``PretrainedConfig`` or a dict holding its
            ``model_type`` (rebuilt through ``AutoConfig.for_model``). Defaults to a Llama config.
        head_config: ``CPDMTPConfig.to_dict()`` of the head. Its ``hidden_size`` and
            ``vocab_size`` must match ``text_config``; when None, the ``CPDMTPConfig`` defaults
            for that size are used.
        freeze_trunk: heads-only training. The trunk *and* the shared unembedding W_U get
            ``requires_grad=False`` (after construction and after ``from_pretrained``); the
            gate and the experts stay trainable.
        tie_word_embeddings: mirrors ``text_config.tie_word_embeddings`` (set automatically); it
            says whether W_U is the trunk's input embedding matrix.
    """

    model_type = "cpd_mtp"
    sub_configs_defaults = {  # noqa: RUF012 (transformers reads it as a class attribute)
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }
    # `cp_output` is not a tensor: keep it out of Trainer's prediction gathering.
    keys_to_ignore_at_inference = ["cache", "past_key_values", "cp_output"]  # noqa: RUF012

    text_config: dict | PretrainedConfig | None = None
    head_config: dict | None = None
    freeze_trunk: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        # Registers the model class with the Auto classes before any of them needs it.
        importlib.import_module("cpd_mtp.hf.modeling")
        given = self.text_config
        kernels = None
        if isinstance(given, PretrainedConfig):
            # The base __post_init__ pushes this config's (unset) attention / experts
            # implementation down to the sub-config; keep the wrapped model's choice.
            kernels = (attention_implementation(given), experts_implementation(given))
        super().__post_init__(**kwargs)
        text = self.text_config
        if kernels is not None:
            set_attention_implementation(text, kernels[0], kernels[1], only_unset=self)
        self.tie_word_embeddings = bool(getattr(text, "tie_word_embeddings", False))
        hidden, vocab = int(text.hidden_size), int(text.vocab_size)
        if self.head_config is None:
            head = CPDMTPConfig(hidden_size=hidden, vocab_size=vocab)
        else:
            head = CPDMTPConfig.from_dict(dict(self.head_config))
        if (head.hidden_size, head.vocab_size) != (hidden, vocab):
            raise ValueError(
                f"head_config has (hidden_size, vocab_size) = {(head.hidden_size, head.vocab_size)}"
                f" but the wrapped {text.model_type!r} model has {(hidden, vocab)}"
            )
        self.head_config = head.to_dict()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        """``PretrainedConfig.from_pretrained``, refusing a folder that holds another model.

        transformers would only warn ("You are using a model of type llama to instantiate a
        model of type cpd_mtp") and then build the default config: a 7B-parameter trunk, which
        ``CPDMTPForCausalLM.from_pretrained`` then allocates.

        Raises:
            ValueError: the folder (or GGUF file) holds a model of another type, in one line.
        """
        found, _ = cls.get_config_dict(pretrained_model_name_or_path, **dict(kwargs))
        model_type = found.get("model_type")
        if model_type != cls.model_type:
            source = pretrained_model_name_or_path
            if kwargs.get("gguf_file"):
                source = f"{source}/{kwargs['gguf_file']}"
            raise ValueError(
                f"{source} holds a plain {model_type!r} model, not a cpd_mtp model: pass the "
                f"folder a retrofit exported (cpd-mtp retrofit --model {source} --out DIR, then "
                "DIR/final), or load it with cpd_mtp.load_causal_lm and wrap it with "
                "CPDMTPForCausalLM.from_causal_lm"
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def cp_config(self) -> CPDMTPConfig:
        """The head's hyper-parameters as a ``CPDMTPConfig``."""
        return CPDMTPConfig.from_dict(dict(self.head_config))


AutoConfig.register(CPDMTPModelConfig.model_type, CPDMTPModelConfig, exist_ok=True)
