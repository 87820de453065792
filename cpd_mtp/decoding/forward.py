"""The trunk forward of one speculative step: a chain under a 2-D mask, a tree under a 4-D one.

A chain of drafts is fed as Hugging Face's own decoding feeds tokens: a 2-D attention mask over
the cache slots and explicit position ids. A tree needs a 4-D mask (each node sees the prefix,
its ancestors and itself) with the model's sliding window applied by us, since a 4-D mask is
passed to the attention as it is. Models whose attention cannot take such a mask are found by
``tree_attention_support`` (a small probe: a tree forward must equal the same paths fed as
chains) and decoded with chains.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

from cpd_mtp.decoding.cache import decoding_cache
from cpd_mtp.decoding.tree import DraftTree, tree_attention_mask

__all__ = ["feed_chain", "feed_tree", "tree_attention_support", "tree_mask"]

logger = logging.getLogger(__name__)

# Attention kernels that take an arbitrary additive 4-D mask.
_MASKED_ATTENTION = ("eager", "sdpa")
_SUPPORT: weakref.WeakKeyDictionary[Any, tuple[bool, str]] = weakref.WeakKeyDictionary()


def _trunk_config(model: Any) -> Any:
    return getattr(getattr(model, "trunk", model), "config", None)


def tree_mask(
    model: Any, prefix_mask: torch.Tensor, tree: DraftTree, n_valid: torch.Tensor
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The 4-D mask of a tree forward in the form the model takes.

    Full attention: one (b, 1, N, S + N) mask. A sliding window W on every layer (Mistral): the
    mask with the window. Layers of both kinds (``config.layer_types``, Qwen2 with
    ``use_sliding_window``, Gemma): a dict ``{"full_attention": ..., "sliding_attention": ...}``,
    which those models accept in place of their own mask mapping.
    """
    config = _trunk_config(model)
    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    window = getattr(config, "sliding_window", None)
    full = tree_attention_mask(prefix_mask, tree, n_valid, dtype)
    if not window:
        return full
    sliding = tree_attention_mask(prefix_mask, tree, n_valid, dtype, sliding_window=int(window))
    layer_types = getattr(config, "layer_types", None)
    if layer_types and set(layer_types) != {"sliding_attention"}:
        if "sliding_attention" not in layer_types:
            return full
        return {"full_attention": full, "sliding_attention": sliding}
    return sliding


def feed_tree(
    model: Any,
    tree: DraftTree,
    prefix_mask: torch.Tensor,
    n_valid: torch.Tensor,
    cache: Any,
) -> tuple[torch.Tensor, Any]:
    """One forward over every node of the (b, N) trees after the cached prefix.

    Returns the (b, N, d) hidden states and the cache, extended by N slots per row.
    """
    return model.trunk_hidden(
        tree.tokens,
        attention_mask=tree_mask(model, prefix_mask, tree, n_valid),
        position_ids=n_valid[:, None] + tree.depth,
        cache=cache,
        use_cache=True,
    )


def feed_chain(
    model: Any, tokens: torch.Tensor, prefix_mask: torch.Tensor, n_valid: torch.Tensor, cache: Any
) -> tuple[torch.Tensor, Any]:
    """One forward over (b, m + 1) chain tokens after the cached prefix, under a 2-D mask."""
    live, fed = tokens.shape
    step = torch.arange(fed, device=tokens.device)
    mask = torch.cat([prefix_mask, prefix_mask.new_ones(live, fed)], dim=1).long()
    return model.trunk_hidden(
        tokens,
        attention_mask=mask,
        position_ids=n_valid[:, None] + step[None],
        cache=cache,
        use_cache=True,
    )


def tree_attention_support(model: Any, sample_ids: torch.Tensor) -> tuple[bool, str]:
    """Whether the model computes a tree forward as its paths' chain forwards (and why not).

    The first answer per model is kept. The probe: a 3-token prefix, then the tree
    [a; b, c] (b and c both children of a) in one forward, against [a, b] and [a, c] fed as
    chains; the hidden states must agree to the dtype's rounding.

    Args:
        model: a ``CPDMTPForCausalLM``.
        sample_ids: (k,) token ids (k >= 6) to probe with.
    """
    known = _SUPPORT.get(model)
    if known is not None:
        return known
    # ``CPDMTPForCausalLM.attention_implementation`` (the trunk config's kernel).
    implementation = getattr(model, "attention_implementation", lambda: "eager")()
    if implementation not in _MASKED_ATTENTION:
        answer = (False, f"its attention implementation {implementation!r} takes no 4-D mask")
    else:
        try:
            answer = _probe(model, sample_ids)
        except Exception as error:  # any failure means: decode with chains
            answer = (False, f"a tree forward failed ({type(error).__name__}: {error})")
    _SUPPORT[model] = answer
    if not answer[0]:
        logger.info("draft trees are off for this model, decoding with chains: %s", answer[1])
    return answer


@torch.no_grad()
def _probe(model: Any, sample_ids: torch.Tensor) -> tuple[bool, str]:
    ids = sample_ids[:6].reshape(1, -1)
    prefix, a, b, c = ids[:, :3], ids[0, 3], ids[0, 4], ids[0, 5]
    mask = torch.ones(1, 3, dtype=torch.bool, device=ids.device)
    n_valid = torch.full((1,), 3, device=ids.device)

    def prefilled() -> Any:
        positions = torch.arange(3, device=ids.device)[None]
        _, cache = model.trunk_hidden(
            prefix,
            attention_mask=mask.long(),
            position_ids=positions,
            cache=decoding_cache(model),
            use_cache=True,
        )
        return cache

    tree = DraftTree(
        tokens=torch.stack([a, b, c])[None],
        parents=torch.tensor([[-1, 0, 0]], device=ids.device),
        depth=torch.tensor([[0, 1, 1]], device=ids.device),
        valid=torch.ones(1, 3, dtype=torch.bool, device=ids.device),
    )
    hidden, _ = feed_tree(model, tree, mask, n_valid, prefilled())
    first, _ = feed_chain(model, torch.stack([a, b])[None], mask, n_valid, prefilled())
    second, _ = feed_chain(model, torch.stack([a, c])[None], mask, n_valid, prefilled())
    want = torch.stack([first[0, 0], first[0, 1], second[0, 1]]).float()
    got = hidden[0].float()
    scale = want.abs().max().clamp(min=1e-6)
    tolerance = 1e-3 if hidden.dtype == torch.float32 else 5e-2
    error = float((got - want).abs().max() / scale)
    if error > tolerance:
        return False, f"a tree forward differs from its paths fed as chains (relative {error:.2g})"
    return True, "a tree forward equals its paths fed as chains"
