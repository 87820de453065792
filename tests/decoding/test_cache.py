"""Cache compaction (``cpd_mtp.decoding.cache``) against a per-row reference."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from cpd_mtp.decoding.cache import compact


def test_compact_right_aligns_each_rows_real_slots():
    g = torch.Generator().manual_seed(0)
    batch, heads, slots, dim = 3, 2, 7, 4
    mask = torch.rand(batch, slots, generator=g) > 0.4
    mask[:, -1] = True
    keys = torch.randn(batch, heads, slots, dim, generator=g)
    values = torch.randn(batch, heads, slots, dim, generator=g)
    cache = DynamicCache()
    cache.update(keys.clone(), values.clone(), layer_idx=0)
    new_mask = compact(cache, mask)
    width = int(mask.sum(1).max())
    assert new_mask.shape == (batch, width)
    for row in range(batch):
        real = mask[row].nonzero().squeeze(1)
        n = real.numel()
        assert new_mask[row].tolist() == [False] * (width - n) + [True] * n
        layer = cache.layers[0]
        torch.testing.assert_close(layer.keys[row, :, width - n :], keys[row][:, real])
        torch.testing.assert_close(layer.values[row, :, width - n :], values[row][:, real])
