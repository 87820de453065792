"""Warping, sampling and verification (``cpd_mtp.decoding.sampling``).

Warping against Hugging Face's own logits processors applied to the same scores; ``sample``
against frequencies; ``verify`` against brute-force acceptance rules and exact enumeration.
"""

from __future__ import annotations

import pytest
import torch
from decoding_builders import hf_warp

from cpd_mtp.decoding.sampling import apply_warpers, build_warpers, sample, verify, warp_log_probs


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


def test_verify_greedy_first_argmax_on_ties():
    # Ties: torch.argmax returns the first maximum; the draft of the second tied token fails.
    target = torch.log_softmax(torch.tensor([[[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]]]), -1)
    accepted, nxt = verify(torch.tensor([[0]]), target, greedy=True)
    assert accepted.tolist() == [1] and nxt.tolist() == [1]
    accepted, nxt = verify(torch.tensor([[1]]), target, greedy=True)
    assert accepted.tolist() == [0] and nxt.tolist() == [0]


def test_apply_warpers_equals_hf_processors_on_any_leading_shape():
    """(B, m + 1, V) scores warped at once equal HF's processors applied row by row."""
    g = torch.Generator().manual_seed(3)
    log_probs = torch.log_softmax(torch.randn(2, 3, 9, generator=g) * 2, dim=-1)
    warpers = build_warpers(0.8, 4, 0.7)
    assert [type(w).__name__ for w in warpers] == [
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
    ]
    ours = apply_warpers(warpers, log_probs)
    for b in range(2):
        ref = hf_warp(log_probs[b], 0.8, 4, 0.7)  # (3, V): HF's (batch, V) layout
        assert torch.equal(torch.isinf(ours[b]), torch.isinf(ref))
        torch.testing.assert_close(ours[b][torch.isfinite(ref)], ref[torch.isfinite(ref)])
    assert len(build_warpers(1.0, 0, 1.0)) == 0


def test_verify_greedy_equals_a_brute_force_walk():
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        batch, m, vocab = 4, int(torch.randint(0, 4, (1,), generator=g)), 3
        target = torch.log_softmax(torch.randn(batch, m + 1, vocab, generator=g), dim=-1)
        drafts = torch.randint(0, vocab, (batch, m), generator=g)
        accepted, nxt = verify(drafts, target, greedy=True)
        for row in range(batch):
            best = target[row].argmax(-1).tolist()
            k = 0
            while k < m and int(drafts[row, k]) == best[k]:
                k += 1
            assert int(accepted[row]) == k and int(nxt[row]) == best[k]


def test_verify_sampling_emits_the_target_distribution():
    """Whatever q the drafts come from, the first emitted token (the accepted draft, or the
    residual draw after a rejection) is distributed as the target p_0, and so is the second
    given the first was accepted (the bonus draw from p_1)."""
    n, vocab = 40_000, 4
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]).log()  # (m + 1, V)
    q = torch.tensor([[0.4, 0.4, 0.1, 0.1]]).log()  # (m, V)
    g = torch.Generator().manual_seed(5)
    drafts = sample(q.expand(n, -1), g)[:, None]  # (n, 1)
    accepted, nxt = verify(
        drafts, p.expand(n, -1, -1), q.expand(n, -1, -1), greedy=False, generator=g
    )
    first = torch.where(accepted == 1, drafts[:, 0], nxt)
    freq = torch.bincount(first, minlength=vocab).double() / n
    torch.testing.assert_close(freq, p[0].exp().double(), atol=0.012, rtol=0)  # ~5 sigma
    bonus = nxt[accepted == 1]
    freq = torch.bincount(bonus, minlength=vocab).double() / bonus.numel()
    torch.testing.assert_close(freq, p[1].exp().double(), atol=0.02, rtol=0)
    # Acceptance probability sum_v min(p, q) = 0.1 + 0.2 + 0.1 + 0.1 = 0.5.
    assert abs(float(accepted.double().mean()) - 0.5) < 0.0125
