"""PEFT on a ``CPDMTPForCausalLM``: LoRA on the trunk, the head's gate and experts trained in
full, and W_U still the one shared parameter.

References: the base model's own parameters (identity, ``data_ptr``, values before training),
the set of names PEFT's LoRA and ``modules_to_save`` create, and the logits of the trained
model against those of the adapter reloaded onto a fresh copy of the base.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

peft = pytest.importorskip("peft")

from cpd_mtp.hf import CPDMTPForCausalLM  # noqa: E402
from cpd_mtp.hf.modeling import CPDMTPCausalLMOutputWithPast  # noqa: E402
from cpd_mtp.hf.peft import (  # noqa: E402
    ATTENTION_PROJECTIONS,
    check_peft_config,
    get_peft_model,
    lora_config,
)

hf_logging.set_verbosity_error()
torch.set_num_threads(1)

VOCAB, LAYERS = 128, 2


def _base(tiny_llama_config, tied: bool) -> CPDMTPForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=VOCAB, num_layers=LAYERS, tie_word_embeddings=tied)
    return CPDMTPForCausalLM.from_causal_lm(
        AutoModelForCausalLM.from_config(config), n_future=3, rank=2, expert_type="lowrank"
    )


def _expected_trainable(model: CPDMTPForCausalLM) -> set[str]:
    """What LoRA on q/k/v/o plus full copies of the gate and experts must train, by name."""
    lora = {
        f"base_model.model.trunk.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight"
        for i in range(LAYERS)
        for proj in ATTENTION_PROJECTIONS
        for ab in "AB"
    }
    head = {
        f"base_model.model.head.{module}.modules_to_save.default.{name}"
        for module, sub in (("gate", model.head.gate), ("experts", model.head.experts))
        for name, _ in sub.named_parameters()
    }
    return lora | head


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lora_trains_trunk_adapters_and_head_but_keeps_w_u(tiny_llama_config, tmp_path, tied):
    model = _base(tiny_llama_config, tied)
    model.save_pretrained(tmp_path / "base")
    w_u = model.head.weight
    w_u_before, ptr = w_u.detach().clone(), w_u.data_ptr()
    expected = _expected_trainable(model)

    wrapped = get_peft_model(model, lora_config(r=4))
    inner = wrapped.get_base_model()
    # W_U is the same tensor as before, and as the trunk's input embedding when tied.
    assert inner.head.weight is w_u and inner.head.weight.data_ptr() == ptr
    embedding = inner.trunk.embed_tokens.weight
    assert (embedding.data_ptr() == ptr) is tied
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert not w_u.requires_grad

    # A few optimizer steps: every trainable parameter moves, W_U does not.
    params = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    wrapped.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (4, 16), generator=gen)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert moved == expected
    assert torch.equal(w_u, w_u_before) and inner.head.weight is w_u
    if tied:
        assert inner.trunk.embed_tokens.weight is w_u

    # The adapter (LoRA + gate + experts, no W_U) reloads onto a fresh base: same logits.
    wrapped.save_pretrained(tmp_path / "adapter")
    saved = peft.utils.load_peft_weights(str(tmp_path / "adapter"))
    assert saved and not any(t.shape == w_u.shape for t in saved.values())
    fresh = CPDMTPForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    wrapped.eval(), reloaded.eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
    with torch.no_grad():
        want, got = wrapped(input_ids=ids), reloaded(input_ids=ids)
    assert isinstance(got, CPDMTPCausalLMOutputWithPast) and got.logits.shape == (2, 12, VOCAB)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    # ... and differ from the untrained base's, so the comparison says something.
    with torch.no_grad():
        untrained = CPDMTPForCausalLM.from_pretrained(tmp_path / "base")(input_ids=ids).logits
    assert not torch.allclose(untrained, got.logits, atol=1e-3)
    fresh_head = reloaded.get_base_model().head
    if tied:
        assert fresh_head.weight is reloaded.get_base_model().trunk.embed_tokens.weight


def test_return_dict_follows_the_config(tiny_llama_config):
    """PEFT passes ``return_dict=None``: the model's config decides."""
    wrapped = get_peft_model(_base(tiny_llama_config, True), lora_config())
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        out = wrapped(input_ids=ids, labels=ids)
        assert isinstance(out, CPDMTPCausalLMOutputWithPast)
        assert out.logits.shape == (1, 6, VOCAB) and out.loss is not None
        # The logits are the marginal's log-probabilities: they normalise.
        torch.testing.assert_close(out.logits.logsumexp(-1), torch.zeros(1, 6))
        wrapped.get_base_model().config.return_dict = False
        loss, logits = wrapped(input_ids=ids, labels=ids)[:2]
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(loss, out.loss)


@pytest.mark.parametrize("entry", ["head", "embed_tokens"])
def test_config_that_would_untie_w_u_is_refused(tiny_llama_config, entry):
    model = _base(tiny_llama_config, True)
    bad = peft.LoraConfig(target_modules=list(ATTENTION_PROJECTIONS), modules_to_save=[entry])
    with pytest.raises(ValueError, match="holds the shared unembedding W_U"):
        check_peft_config(model, bad)
    with pytest.raises(ValueError, match=r"modules_to_save=\['head.gate', 'head.experts'\]"):
        get_peft_model(model, bad)
    # Nothing was wrapped: the refusal came first.
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_plain_peft_unties_w_u_with_modules_to_save_head(tiny_llama_config):
    """Why the check exists: PEFT itself copies W_U with the head, without a word."""
    model = _base(tiny_llama_config, True)
    bad = peft.LoraConfig(target_modules=list(ATTENTION_PROJECTIONS), modules_to_save=["head"])
    wrapped = peft.get_peft_model(model, bad)
    inner = wrapped.get_base_model()
    embedding = inner.trunk.embed_tokens.weight
    assert inner.head.weight.data_ptr() != embedding.data_ptr()


def test_untied_model_may_save_the_whole_head(tiny_llama_config):
    """Without a tie there is nothing to break: W_U is trained as a copy, as asked."""
    model = _base(tiny_llama_config, False)
    config = peft.LoraConfig(target_modules=list(ATTENTION_PROJECTIONS), modules_to_save=["head"])
    check_peft_config(model, config)  # no error


def test_a_token_conditioned_heads_projection_is_trained_too(tiny_llama_config):
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=VOCAB, num_layers=LAYERS, tie_word_embeddings=True)
    model = CPDMTPForCausalLM.from_causal_lm(
        AutoModelForCausalLM.from_config(config), n_future=3, rank=2, next_token="base",
        token_conditioned=True,
    )  # fmt: skip
    given = lora_config(r=4)
    wrapped = get_peft_model(model, given)
    assert "head.token_proj" not in given.modules_to_save  # the caller's config is untouched
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert "base_model.model.head.token_proj.modules_to_save.default.weight" in trainable
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    wrapped.train()
    wrapped(input_ids=ids, labels=ids).loss.backward()
    proj = wrapped.get_base_model().head.token_proj.modules_to_save["default"].weight
    assert proj.grad is not None and proj.grad.abs().sum() > 0
