"""The autoregressive baseline: Hugging Face ``generate`` on the same model, same output type."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from cpd_mtp.decoding.inputs import check_inputs, resolve_special_tokens
from cpd_mtp.decoding.output import GenerationOutput
from cpd_mtp.decoding.sampling import check_warping
from cpd_mtp.decoding.stats import DecodingStats

__all__ = ["autoregressive_generate"]


@torch.no_grad()
def autoregressive_generate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
) -> GenerationOutput:
    """The baseline: Hugging Face ``model.generate`` (one forward per token) on the same model.

    Takes the arguments of ``cpd_mtp.decoding.generate`` (sampling draws from torch's global
    RNG: seed it with ``torch.manual_seed``) and returns the same ``GenerationOutput``, with
    ``tokens_per_forward`` 1 and no drafts. ``min_new_tokens`` is 0 and no other logits
    processor is applied, whatever ``model.generation_config`` holds.

    Args:
        input_ids: (B, T) prompt ids, left-padded when B > 1.
        attention_mask: (B, T) 1 for real tokens, 0 for (left) padding.

    Returns:
        ``GenerationOutput`` with ``sequences`` (B, T + L).
    """
    start_time = time.perf_counter()
    mask = check_inputs(input_ids, attention_mask, max_new_tokens, model.head.config.vocab_size)
    if do_sample:
        check_warping(temperature, top_k, top_p)
    eos, pad_token_id = resolve_special_tokens(model, eos_token_id, pad_token_id, input_ids.device)
    kwargs: dict[str, Any] = {
        "attention_mask": mask.long(),
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": 0,
        "do_sample": do_sample,
        "num_beams": 1,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos.tolist() or None,
        "repetition_penalty": 1.0,
    }
    if do_sample:
        kwargs |= {
            "temperature": temperature,
            "top_k": top_k if top_k is not None else 0,
            "top_p": top_p if top_p is not None else 1.0,
        }
    # HF's own loop, one forward per token (the model's ``generate`` would speculate).
    sequences = model.generate(input_ids, speculative=False, **kwargs)
    new = sequences[:, input_ids.shape[1] :]  # (B, L)
    # Each row's new tokens run up to and including its first EOS.
    per_row = new.new_full((new.shape[0],), new.shape[1])
    if eos.numel():
        is_eos = torch.isin(new, eos)
        per_row = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1) + 1, per_row)
    stats = DecodingStats(
        forwards=new.shape[1],
        row_forwards=per_row.tolist(),  # one forward per token
        new_tokens_per_row=per_row.tolist(),
    )
    return GenerationOutput.from_stats(sequences, stats, time.perf_counter() - start_time)
