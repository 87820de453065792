"""LoRA on the trunk, the CP head's gate and experts trained in full, W_U left shared.

``CPDMTPHead`` holds the gate, the experts and W_U (``head.weight``), which *is* the trunk's
``lm_head.weight`` and, in a model with tied embeddings, its input embedding matrix. PEFT's
``modules_to_save`` trains a module by training a deep copy of it, so
``modules_to_save=["head"]`` copies W_U too: the copy is trained and saved while the input
embedding keeps the original, and the tie is silently gone. Naming only the head's gate and
experts keeps W_U where it is (frozen, shared, not in the adapter file):

    config = lora_config()                      # LoRA on q/k/v/o, head.gate + head.experts
    model = get_peft_model(cp_model, config)    # peft.get_peft_model, tie checked

``check_peft_config`` refuses a config that would copy a tied W_U.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from cpd_mtp.utils.extras import require

require("peft", "cpd_mtp.hf.peft")

import peft  # noqa: E402 (after the extra check, for its clear error)

from cpd_mtp.head import CPDMTPHead  # noqa: E402

__all__ = [
    "ATTENTION_PROJECTIONS",
    "HEAD_MODULES_TO_SAVE",
    "check_peft_config",
    "get_peft_model",
    "lora_config",
]

# Llama, Mistral, Qwen2, Gemma, SmolLM2, ... name their attention projections so.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The head's trainable parts, without W_U. PEFT matches a name by suffix, so the "head." part
# keeps the trunk's own `gate` / `experts` modules (Mixtral, Qwen2-MoE routers) out.
HEAD_MODULES_TO_SAVE = ("head.gate", "head.experts")
# A token-conditioned head's projection C of the next token's embedding (``get_peft_model``
# adds it when the head has one).
TOKEN_PROJ = "head.token_proj"


def lora_config(
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
    modules_to_save: Sequence[str] = (),
    **kwargs: Any,
) -> peft.LoraConfig:
    """A ``peft.LoraConfig`` for a ``CPDMTPForCausalLM``: LoRA on the trunk, head parts saved.

    Args:
        r: LoRA's rank.
        lora_alpha: LoRA's scale.
        lora_dropout: LoRA's dropout.
        target_modules: the trunk modules LoRA adapts (GPT-2: ``("c_attn", "c_proj")``).
        modules_to_save: more modules to train in full, after ``HEAD_MODULES_TO_SAVE``.
        **kwargs: any other ``LoraConfig`` field.

    Returns:
        The config, with ``task_type="CAUSAL_LM"`` unless given.
    """
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return peft.LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        modules_to_save=[*HEAD_MODULES_TO_SAVE, *modules_to_save],
        **kwargs,
    )


def _cp_head(model: nn.Module) -> CPDMTPHead:
    heads = [m for m in model.modules() if isinstance(m, CPDMTPHead)]
    if len(heads) != 1:
        raise ValueError(
            f"expected a model with one CPDMTPHead, {type(model).__name__} has {len(heads)}"
        )
    return heads[0]


def _tied_users(model: nn.Module, head: CPDMTPHead) -> list[str]:
    """Names of the modules other than the head whose parameters include W_U."""
    return [
        name
        for name, module in model.named_modules()
        if module is not head and any(p is head.weight for p in module.parameters(recurse=False))
    ]


def check_peft_config(model: nn.Module, config: peft.PeftConfig) -> None:
    """Raise ``ValueError`` when ``config`` would untie the shared W_U of ``model``.

    It would when W_U is tied (the trunk's input embedding is the same parameter) and a
    ``modules_to_save`` entry names a module holding it (``"head"``, the embedding): PEFT
    trains a copy of such a module, and the two uses of W_U then see different matrices.

    Args:
        model: a ``CPDMTPForCausalLM`` (before ``get_peft_model``).
        config: the PEFT config to check.
    """
    head = _cp_head(model)
    tied = _tied_users(model, head)
    if not tied:
        return
    for key in getattr(config, "modules_to_save", None) or ():
        for name, module in model.named_modules():
            # PEFT's own rule: a module is saved when its name ends with the entry.
            if name.endswith(key) and any(p is head.weight for p in module.parameters()):
                raise ValueError(
                    f"modules_to_save entry {key!r} matches module {name!r}, which holds the "
                    f"shared unembedding W_U (tied to {tied[0]}.weight); PEFT would train a copy "
                    "and untie it. Save only the head's trainable parts: "
                    f"modules_to_save={list(HEAD_MODULES_TO_SAVE)}"
                )


def get_peft_model(model: nn.Module, config: peft.PeftConfig, **kwargs: Any) -> peft.PeftModel:
    """``peft.get_peft_model`` with W_U's sharing checked before and after.

    Args:
        model: a ``CPDMTPForCausalLM``; PEFT modifies it in place.
        config: e.g. ``lora_config()``; for a token-conditioned head, ``head.token_proj`` is
            added to its ``modules_to_save`` (in a copy) unless the whole head is saved.
        **kwargs: passed to ``peft.get_peft_model``.

    Returns:
        The PEFT model. W_U is still the parameter it was before (the same tensor as the trunk's
        input embedding when they were tied), frozen.

    Raises:
        ValueError: ``check_peft_config`` refuses the config.
        RuntimeError: W_U was replaced anyway.
    """
    check_peft_config(model, config)
    head = _cp_head(model)
    saved = list(getattr(config, "modules_to_save", None) or [])
    if head.token_proj is not None and TOKEN_PROJ not in saved and "head" not in saved:
        # A token-conditioned head's C is trained with the gate and the experts.
        config = copy.deepcopy(config)
        config.modules_to_save = [*saved, TOKEN_PROJ]
    weight, tied = head.weight, _tied_users(model, head)
    wrapped = peft.get_peft_model(model, config, **kwargs)
    after = _cp_head(wrapped)
    if after.weight is not weight or (tied and not _tied_users(wrapped, after)):
        raise RuntimeError("PEFT replaced the shared unembedding W_U; check modules_to_save")
    return wrapped
