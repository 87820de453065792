"""Base mode: the CP head only drafts; the model's outputs are the original model's, exactly.

References: the original Hugging Face model itself (its logits and its greedy ``generate``) and
the exact enumerated distribution of autoregressive sampling from it.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from conftest import build_tiny_llama_config as tiny_llama_config
from decoding_builders import PAD, VOCAB, left_padded, periodic, trained_model
from test_speculative import (
    SAMPLE_NEW,
    SAMPLE_VOCAB,
    SAMPLES,
    SAMPLING_PROMPT,
    chi_square_p_value,
    exact_continuation_distribution,
    sample_continuations,
)
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import cpd_mtp.head as head_module
from cpd_mtp.decoding import generate
from cpd_mtp.hf.modeling import CPDMTPForCausalLM


def base_from_trained(n_future: int, rank: int) -> LlamaForCausalLM:
    """A plain Llama whose trunk and lm_head are those of a briefly trained CP model, so its
    greedy continuations are the periodic patterns and the CP head drafts them well."""
    source = trained_model(n_future, rank)
    base = LlamaForCausalLM(source.config.text_config)
    base.model.load_state_dict(source.trunk.state_dict())
    with torch.no_grad():
        base.lm_head.weight.copy_(source.head.weight)
    base.generation_config.pad_token_id = PAD
    base.generation_config.eos_token_id = None
    return base.eval()


def retrofit(base, n_future: int, rank: int, draft_ids=None, head_from=None):
    """(original, base-mode model): the original is a deep copy taken before wrapping."""
    original = copy.deepcopy(base)
    kwargs = {"draft_vocab_size": len(draft_ids)} if draft_ids is not None else {}
    model = CPDMTPForCausalLM.from_causal_lm(
        base, n_future=n_future, rank=rank, next_token="base", **kwargs
    )
    if head_from is not None:
        state = {k: v for k, v in head_from.head.state_dict().items() if k != "weight"}
        model.head.load_state_dict(state, strict=False)
    if draft_ids is not None:
        model.head.set_draft_vocab(torch.tensor(draft_ids))
    return original, model.eval()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_equal_the_wrapped_model_bit_for_bit(tied, dtype):
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2)
    config.tie_word_embeddings = tied
    base = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    original, model = retrofit(base, n_future=3, rank=2)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        expected = original(ids).logits
        assert torch.equal(model(ids).logits, expected)
        assert torch.equal(
            model(ids, logits_to_keep=1).logits, original(ids, logits_to_keep=1).logits
        )
        with_labels = model(ids, labels=ids)
        assert torch.equal(with_labels.logits, expected)
        assert torch.isfinite(with_labels.loss)
    # HF generate on it is HF generate on the original.
    out = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = original.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("draft_tree", ["chain", 6])
@pytest.mark.parametrize("draft_ids", [None, list(range(2, 12))])
@pytest.mark.parametrize("trained_head", [True, False])
def test_greedy_speculative_decoding_equals_the_original_models_greedy(
    draft_ids, trained_head, draft_tree
):
    base = base_from_trained(4, 2)
    head_from = trained_model(4, 2) if trained_head else None
    original, model = retrofit(base, 4, 2, draft_ids, head_from=head_from)
    if not trained_head:  # a random drafter, often wrong
        torch.manual_seed(3)
        with torch.no_grad():
            for name, param in model.head.named_parameters():
                if name != "weight":
                    param.normal_(0.0, 0.3)
    g = torch.Generator().manual_seed(7)
    prompts = [periodic(1, length, g)[0] for length in (5, 9, 7)]
    # Context drafts continue these periodic prompts perfectly: without them an untrained
    # head's drafts are rejected often.
    kwargs = {"draft_tree": draft_tree, "context_drafts": trained_head}
    outs = []
    for prompt in prompts:  # batch 1
        outs.append(generate(model, prompt[None], 24, **kwargs))
        ref = original.generate(prompt[None], max_new_tokens=24, do_sample=False)
        assert torch.equal(outs[-1].sequences, ref)
    ids, mask = left_padded(prompts)  # a left-padded batch
    outs.append(generate(model, ids, 24, attention_mask=mask, pad_token_id=PAD, **kwargs))
    ref = original.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    assert torch.equal(outs[-1].sequences, ref)
    accepted = sum(sum(o.accepted_counts) for o in outs)
    proposed = sum(sum(o.proposed_counts) for o in outs)
    if trained_head:  # the trained drafter is mostly right
        assert accepted > 0.25 * proposed and outs[-1].tokens_per_forward > 1.2
    elif draft_tree == "chain":  # an untrained one is often wrong: the rejection branch ran
        assert accepted < proposed  # (6 candidates of 16 ids often hold the verifier's token)


def test_one_expert_product_per_iteration(monkeypatch):
    """Drafting at the anchor is one product of all n·r expert rows with W_U's rows."""
    base = base_from_trained(4, 2)
    _, model = retrofit(base, 4, 2, list(range(1, 16)), head_from=trained_model(4, 2))
    calls = []
    real = head_module._unembed_accurate

    def counting(u, weight):
        calls.append((tuple(u.shape), tuple(weight.shape)))
        return real(u, weight)

    monkeypatch.setattr(head_module, "_unembed_accurate", counting)
    # A fixed chain: "auto" sizes each step's tree by measured forward times, and on a loaded
    # machine a step may draft nothing (then it computes no product).
    prompt = periodic(1, 6, torch.Generator().manual_seed(1))
    out = generate(model, prompt, 20, draft_tree="chain")
    assert len(calls) == out.iterations  # one per iteration, none for verification
    for u_shape, w_shape in calls:
        assert u_shape[0] == 1 and u_shape[1] <= 4 and u_shape[2:] == (2, 32)  # (1, m+1, r, d)
        assert w_shape == (15, 32)  # the K draft rows of W_U


@functools.cache
def base_sampling_model(draft_ids: tuple[int, ...] | None) -> CPDMTPForCausalLM:
    torch.manual_seed(11)
    config = tiny_llama_config(vocab_size=SAMPLE_VOCAB, hidden_size=16, num_layers=2, num_heads=2)
    base = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        base.lm_head.weight.normal_(0.0, 0.5)
    _, model = retrofit(base, 3, 3, list(draft_ids) if draft_ids else None)
    model.generation_config.eos_token_id = None  # the enumerated reference has no stop token
    torch.manual_seed(12)
    with torch.no_grad():
        for name, param in model.head.named_parameters():
            if name != "weight":
                param.normal_(0.0, 0.3)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("draft_tree", ["chain", 5])
@pytest.mark.parametrize("draft_ids", [None, (0, 2, 3)])
@pytest.mark.parametrize("warping", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 3}])
def test_sampling_is_distributed_as_the_original_model(warping, draft_ids, draft_tree):
    """Chi-square goodness of fit of 24,000 sampled continuations against the exact
    distribution of autoregressive sampling from the original model's logits (the same
    test, and power, as the marginal mode's in test_speculative.py), with chains and with
    trees of 5 draft nodes (several children per node, context drafts)."""
    model = base_sampling_model(draft_ids)
    counts, out = sample_continuations(model, draft_tree=draft_tree, **warping)
    exact = exact_continuation_distribution(
        model,
        SAMPLING_PROMPT,
        SAMPLE_NEW,
        warping.get("temperature", 1.0),
        warping.get("top_k"),
        warping.get("top_p"),
    )
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-9)
    assert chi_square_p_value(counts, exact, SAMPLES) > 1e-3
    assert 0 < sum(out.accepted_counts) < sum(out.proposed_counts)


def test_mode_and_draft_vocabulary_survive_save_and_load(tmp_path):
    base = base_from_trained(3, 2)
    original, model = retrofit(base, 3, 2, [1, 4, 5, 9], head_from=None)
    model.save_pretrained(tmp_path)
    loaded = CPDMTPForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.head.config.next_token == "base"
    assert loaded.head.config.draft_vocab_size == 4
    assert loaded.head.draft_ids.tolist() == [1, 4, 5, 9]
    ids = torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)


def test_bad_draft_vocabularies_are_value_errors():
    base = base_from_trained(3, 2)
    with pytest.raises(ValueError, match="next_token='base'"):
        CPDMTPForCausalLM.from_causal_lm(copy.deepcopy(base), 3, 2, draft_vocab_size=4)
    _, model = retrofit(base, 3, 2, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="4 distinct ids"):
        model.head.set_draft_vocab(torch.tensor([1, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.head.set_draft_vocab(torch.tensor([1, 2, 3, 16]))
    with pytest.raises(ValueError, match="next_token must be one of"):
        CPDMTPForCausalLM.from_causal_lm(copy.deepcopy(base), 3, 2, next_token="draft")
