"""Checks and defaults shared by both decoders: the prompt, the budget, EOS and padding."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "SCORE_ONLY_WARPERS",
    "caller_stacklevel",
    "check_inputs",
    "check_warpers",
    "eos_tensor",
    "is_int",
    "is_left_padding",
    "reject_unsupported",
    "resolve_special_tokens",
    "special_token_ids",
    "warn_past_max_positions",
]

# Hugging Face warpers that read the scores alone (not the ids so far): applying one to the
# target and the drafts alike keeps speculative sampling exact.
SCORE_ONLY_WARPERS = (
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "MinPLogitsWarper",
    "TypicalLogitsWarper",
    "EpsilonLogitsWarper",
    "EtaLogitsWarper",
)


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an int to Python, not to a budget)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Validate the prompt and the budget; a ``ValueError`` names the bad argument.

    Args:
        input_ids: (B, T) int64 prompt ids, T >= 1, within [0, ``vocab_size``).
        attention_mask: (B, T) 1 for real tokens, 0 for left padding; None: all real.
        max_new_tokens: an int >= 0.

    Returns:
        (B, T) bool attention mask.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            f"input_ids must be a (B, T) int64 tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one prompt token")
    if not is_int(max_new_tokens):
        raise ValueError(
            f"max_new_tokens must be an int, got {max_new_tokens!r} ({type(max_new_tokens).__name__})"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if vocab_size is not None and input_ids.numel():
        bad = (input_ids < 0) | (input_ids >= vocab_size)
        if bool(bad.any()):
            raise ValueError(
                f"input_ids holds {int(input_ids[bad][0])}, outside the vocabulary [0, {vocab_size})"
            )
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real tokens)")
    mask = attention_mask.to(device=input_ids.device).bool()
    if not is_left_padding(mask):
        row, col = _first_hole(mask)
        raise ValueError(
            "generate needs left padding (zeros only before a row's first real token, and a "
            f"real last token): row {row} of attention_mask has a 0 at column {col}"
        )
    return mask


def is_left_padding(mask: torch.Tensor) -> bool:
    """Whether a (B, T) mask is left padding: each row is zeros, then ones to the end."""
    mask = mask.bool()
    return bool(mask[:, -1].all()) and bool((mask[:, 1:] >= mask[:, :-1]).all())


def _first_hole(mask: torch.Tensor) -> tuple[int, int]:
    """(row, column) of the first 0 after a real token, or of a 0 in the last column."""
    after_real = ~mask[:, 1:] & mask[:, :-1]  # (B, T - 1): a 0 right after a 1
    holes = torch.cat([after_real, (~mask[:, -1])[:, None]], dim=1).nonzero()
    row, col = (int(v) for v in holes[0])
    return row, (col + 1 if col < mask.shape[1] - 1 else col)


def warn_past_max_positions(model: Any, prompt_length: int, max_new_tokens: int) -> None:
    """Warn when the prompt plus the new tokens run past the trunk's ``max_position_embeddings``,
    as transformers' tokenizer warns of a prompt longer than the model's maximum."""
    config = getattr(getattr(model, "trunk", model), "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_length + max_new_tokens > limit:
        what = "the prompt" if prompt_length > limit else "the prompt plus max_new_tokens"
        warnings.warn(
            f"{what} ({prompt_length} + {max_new_tokens} tokens) runs past the model's "
            f"max_position_embeddings ({limit}): the model was not trained on positions beyond "
            "it, so its output there may degrade or fail",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )


def caller_stacklevel() -> int:
    """The ``stacklevel`` of ``warnings.warn`` that points at the user's line: the first frame
    outside cpd_mtp, torch and transformers (decorators such as ``torch.no_grad`` and
    ``model.generate`` sit between a library warning and its caller)."""
    import inspect
    from pathlib import Path

    import transformers

    import cpd_mtp

    library = tuple(str(Path(module.__file__).parent) for module in (cpd_mtp, torch, transformers))
    frame, level = inspect.currentframe(), 0
    # Level 1 is the function that calls warnings.warn, the frame above this one.
    while frame is not None:
        if level >= 2 and not frame.f_code.co_filename.startswith(library):
            return level
        frame, level = frame.f_back, level + 1
    return max(level - 1, 1)


def eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor:
    """One EOS id, several, or None (no EOS) as a (k,) int64 tensor, k >= 0."""
    if eos_token_id is None:
        ids: list[int] = []
    elif isinstance(eos_token_id, int):
        ids = [eos_token_id]
    else:
        ids = [int(i) for i in eos_token_id]
    return torch.tensor(ids, dtype=torch.long, device=device)


def special_token_ids(
    model: Any, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None
) -> tuple[int | list[int] | None, int | None]:
    """EOS and pad ids as Hugging Face ``generate`` resolves them.

    The arguments, else the model's ``generation_config`` (which HF ``generate`` reads alone, so
    a None there stays None); a model without one falls back to its config, then the wrapped
    LM's text config.
    """
    sources = [getattr(model, "generation_config", None)]
    if sources[0] is None:
        config = getattr(model, "config", None)
        sources = [config]
        if config is not None and hasattr(config, "get_text_config"):
            sources.append(config.get_text_config(decoder=True))

    def first(name: str) -> Any:
        for source in sources:
            value = getattr(source, name, None) if source is not None else None
            if value is not None:
                return value
        return None

    if eos_token_id is None:
        eos_token_id = first("eos_token_id")
    if pad_token_id is None:
        pad_token_id = first("pad_token_id")
    return eos_token_id, pad_token_id


def resolve_special_tokens(
    model: Any,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """(k,) EOS ids and the pad id; the pad defaults to the first EOS id, else 0."""
    eos_token_id, pad_token_id = special_token_ids(model, eos_token_id, pad_token_id)
    eos = eos_tensor(eos_token_id, device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos.numel() else 0
    return eos, pad_token_id


def check_warpers(warpers: Any) -> None:
    """Raise a ``ValueError`` unless ``warpers`` is a list of ``SCORE_ONLY_WARPERS``."""
    names = [type(w).__name__ for w in warpers]
    bad = [name for name in names if name not in SCORE_ONLY_WARPERS]
    if bad:
        raise ValueError(
            f"the speculative decoder cannot apply {', '.join(bad)} exactly (it serves "
            f"{', '.join(SCORE_ONLY_WARPERS)}); use model.generate, which runs Hugging Face's "
            "own loop for it"
        )


def reject_unsupported(arguments: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming the ``generate`` arguments the decoder does not take."""
    if arguments:
        raise ValueError(
            f"cpd_mtp.generate does not serve {', '.join(sorted(arguments))}: use "
            "model.generate(...), which decodes speculatively when it can and runs Hugging "
            "Face's own loop otherwise"
        )
