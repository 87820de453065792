"""Batching prompts of different lengths for the decoders: left padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["left_pad"]


def left_pad(
    prompts: Sequence[torch.Tensor], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D prompts into (B, T) ids and a (B, T) attention mask (1 = real token)."""
    width = max(int(p.numel()) for p in prompts)
    device = prompts[0].device
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        length = int(prompt.numel())
        ids[i, width - length :] = prompt.reshape(-1)
        mask[i, width - length :] = 1
    return ids, mask
