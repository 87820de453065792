"""Warping and sampling (``cpd_mtp.decoding.sampling``).

Warping against Hugging Face's own logits processors applied to the same scores; ``sample``
against frequencies.
"""

from __future__ import annotations

import pytest
import torch
from decoding_builders import hf_warp

from cpd_mtp.decoding.sampling import sample, warp_log_probs


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (0.7, 3, None), (1.3, None, 0.8), (0.5, 5, 0.6), (2.0, 1, 0.3)],
)
def test_warp_matches_transformers_warpers(temperature, top_k, top_p):
    log_probs = torch.log_softmax(
        torch.randn(64, 11, generator=torch.Generator().manual_seed(0)) * 2, -1
    )
    ours = warp_log_probs(log_probs, temperature, top_k, top_p)
    ref = hf_warp(log_probs, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite])


def test_warping_accepts_the_boundaries():
    """top_p = 1, top_k = 0 and ints where floats are expected are valid, warped as in HF."""
    log_probs = torch.log_softmax(torch.randn(3, 7, generator=torch.Generator().manual_seed(1)), -1)
    for kwargs in ({"top_p": 1.0}, {"top_p": 1}, {"top_k": 0}, {"temperature": 2}):
        ref = hf_warp(
            log_probs,
            float(kwargs.get("temperature", 1.0)),
            kwargs.get("top_k"),
            kwargs.get("top_p"),
        )
        torch.testing.assert_close(warp_log_probs(log_probs, **kwargs), ref)


def test_sample_never_draws_removed_tokens_and_matches_frequencies():

    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    log_probs = probs.log().expand(20_000, -1)
    draws = sample(log_probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / 20_000
    assert freq[[0, 2, 5]].sum() == 0
    # 5 sigma of a binomial proportion with n = 20000 is at most 0.018.
    torch.testing.assert_close(freq, probs.double(), atol=0.018, rtol=0)
