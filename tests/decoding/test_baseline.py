"""``autoregressive_generate``: Hugging Face ``generate`` on the same model, counted."""

from __future__ import annotations

import torch
from decoding_builders import hf_greedy, left_padded, prompt_tokens, trained_model

from cpd_mtp.decoding import autoregressive_generate


def test_autoregressive_baseline_matches_and_counts():
    model = trained_model(2, 1)
    ids, mask = left_padded([prompt_tokens(8, 4), prompt_tokens(9, 2)])
    ar = autoregressive_generate(model, ids, 7, attention_mask=mask)
    assert torch.equal(ar.sequences, hf_greedy(model, ids, mask, 7))
    assert ar.forwards == 7 and ar.new_tokens == 14 and ar.tokens_per_forward == 1.0
