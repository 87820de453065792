"""The trunk's key/value cache during speculative decoding: full history, compacted rows.

The cache is a ``DynamicCache`` whose layers all keep the full history, also for sliding-window
trunks (Mistral, Qwen2, Gemma): the model config still applies the window in the attention
mask, but a sliding cache layer would have dropped the keys that cropping rejected drafts must
bring back.

With a batch, rows accept different numbers of drafts, so a row's rejected slots become holes
inside the shared cache. ``compact`` right-aligns each row's real slots, as in Hugging Face's
own left-padded decoding, so that slot distance equals position distance in every row (the
sliding-window mask is computed on slots).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["compact", "decoding_cache", "keep_slots"]


def decoding_cache(model: Any) -> DynamicCache | None:
    """A ``DynamicCache`` for the model's trunk whose attention layers keep the whole history.

    ``DynamicCache(config=...)`` builds sliding-window layers for sliding-window trunks; those
    drop keys older than the window, which cropping rejected drafts cannot restore. Full layers
    keep them; the sliding window is still applied by the trunk's attention mask (built from
    its config). Other layer types (e.g. linear attention) are kept. None when the model has no
    trunk config (the trunk then builds its own cache).
    """
    config = getattr(getattr(model, "trunk", None), "config", None)
    if config is None:
        return None
    cache = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            cache.layers[i] = DynamicLayer()
    return cache


def compact(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Right-align every row's real slots in the cache, in place; returns the new mask.

    Args:
        cache: the trunk's cache; each attention layer holds keys / values of shape
            (B, heads, S, head_dim) with S cache slots.
        mask: (B, S) bool, True for a row's real (accepted) slots.

    Returns:
        (B, S') mask after moving, in each row, the masked slots (padding, holes) to the left
        (a stable partition: real slots keep their order) and dropping the S - S' leading
        columns that are masked in every row.
    """
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # masked (0) first
    mask = mask.gather(1, order)
    drop = int((~mask).sum(dim=1).min())
    order, mask = order[:, drop:], mask[:, drop:]
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.numel() == 0:
            continue
        if keys.shape[2] != order.shape[1] + drop:
            raise RuntimeError(
                f"cache layer {type(layer).__name__} holds {keys.shape[2]} slots, the attention "
                f"mask {order.shape[1] + drop}: this cache type is not supported for batched "
                "speculative decoding"
            )
        index = order[:, None, :, None].to(keys.device)
        layer.keys = keys.gather(2, index.expand(-1, keys.shape[1], -1, keys.shape[3]))
        layer.values = values.gather(2, index.expand(-1, values.shape[1], -1, values.shape[3]))
    return mask


def keep_slots(cache: Any, start: int, index: torch.Tensor) -> None:
    """Keep the first ``start`` slots and, after them, the slots ``start + index``, in place.

    After a tree forward the last N slots of every row hold the tree's nodes; the accepted path
    is kept in path order and the other nodes are dropped.

    Args:
        cache: the trunk's cache (attention layers with keys / values (B, heads, S, head_dim)).
        start: slots before the tree (the prefix, kept whole).
        index: (B, L) the kept tree slots of each row, counted from ``start``.
    """
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.numel() == 0:
            continue
        gather = index[:, None, :, None].to(keys.device)
        tail = gather.expand(-1, keys.shape[1], -1, keys.shape[3])
        layer.keys = torch.cat([keys[:, :, :start], keys[:, :, start:].gather(2, tail)], dim=2)
        tail = gather.expand(-1, values.shape[1], -1, values.shape[3])
        layer.values = torch.cat(
            [values[:, :, :start], values[:, :, start:].gather(2, tail)], dim=2
        )
