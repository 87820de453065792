"""Token-conditioned heads through save and load: merged exports and drafter-only exports.

The head reads the model's own input embedding but never saves it: a merged export holds it
once (the trunk's), a drafter-only export not at all, and loading hands the loaded trunk's
embedding to the head. References: the model before saving (its C, its greedy tokens) and the
original model's own greedy ``generate``, for a tied and an untied tiny Llama.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cpd_mtp.hf.export import DRAFTER_WEIGHTS, save_drafter, save_export
from cpd_mtp.hf.loading import load_causal_lm
from cpd_mtp.hf.modeling import CPDMTPForCausalLM
from cpd_mtp.training.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"def g{i}(y):\n    return y - {i} * {i + 1}\n" for i in range(200)]
    return train_bpe_tokenizer(texts, vocab_size=300)


def save_base(folder: Path, tokenizer, tied: bool) -> Path:
    torch.manual_seed(1)
    config = build_tiny_llama_config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def conditioned(base) -> CPDMTPForCausalLM:
    """A token-conditioned base-mode model around ``base`` with C (and the head) moved away from
    their initialisation, so a C or an embedding lost on the way would change the drafts."""
    model = CPDMTPForCausalLM.from_causal_lm(
        base,
        n_future=3,
        rank=2,
        next_token="base",
        token_conditioned=True,
        freeze_trunk=True,
        draft_vocab_size=64,
    )
    model.head.set_draft_vocab(torch.arange(64) * 4)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in (*model.head.gate.parameters(), *model.head.experts.parameters()):
            param.add_(0.1 * torch.randn(param.shape, generator=g))
        model.head.token_proj.weight.normal_(0.0, 0.3, generator=g)
    return model.eval()


def greedy(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=12, do_sample=False, **kwargs)


def draft_pieces(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's gate and experts at the prompts' last positions, for every possible root."""
    with torch.no_grad():
        anchor = model.trunk_hidden(ids)[0][:, -1]  # (2, d)
        vocab = model.head.config.vocab_size
        roots = torch.arange(vocab).repeat(2)
        return model.head.draft_state(anchor.repeat_interleave(vocab, 0), roots)


def check_attached(model: CPDMTPForCausalLM, want_c: torch.Tensor, tied: bool) -> None:
    embedding = model.trunk.get_input_embeddings().weight
    assert model.head.token_embedding is embedding  # the trunk's own, not a copy
    assert (model.head.weight is embedding) == tied
    assert torch.equal(model.head.token_proj.weight, want_c.to(model.head.token_proj.weight))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_merged_and_drafter_only_exports_keep_c_and_reattach_the_embedding(
    tied, tokenizer, tmp_path
):
    folder = save_base(tmp_path / "base", tokenizer, tied)
    base, base_tokenizer = load_causal_lm(folder, progress=False)
    original = copy.deepcopy(base).eval()
    model = conditioned(base)
    check_attached(model, model.head.token_proj.weight, tied)
    c = model.head.token_proj.weight.detach().clone()
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(3))
    want = original.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(greedy(model, ids), want)
    drafts = draft_pieces(model, ids)

    save_export(model, base_tokenizer, tmp_path / "merged")
    save_drafter(model, base_tokenizer, tmp_path / "drafter", base_source=str(folder))
    merged_keys = set(load_file(str(tmp_path / "merged" / "model.safetensors")))
    assert "head.token_proj.weight" in merged_keys
    assert not any("token_embedding" in k for k in merged_keys)  # held once, by the trunk
    drafter_keys = set(load_file(str(tmp_path / "drafter" / DRAFTER_WEIGHTS)))
    assert "head.token_proj.weight" in drafter_keys
    assert not drafter_keys & {"head.weight", "head.token_embedding"}

    for path in (tmp_path / "merged", tmp_path / "drafter"):
        loaded = CPDMTPForCausalLM.from_pretrained(path).eval()
        assert loaded.config.head_config["token_conditioned"] is True
        check_attached(loaded, c, tied)
        assert torch.equal(
            loaded.trunk.get_input_embeddings().weight, base.get_input_embeddings().weight
        )
        assert torch.equal(greedy(loaded, ids), want)
        # The same drafting distributions as before saving, for every root.
        for got, before in zip(draft_pieces(loaded, ids), drafts):
            assert torch.equal(got, before)

    # The drafter attached to another loaded copy of the base, in another dtype.
    copy_base, _ = load_causal_lm(folder, progress=False)
    attached = CPDMTPForCausalLM.from_pretrained(tmp_path / "drafter", base_model=copy_base)
    check_attached(attached, c, tied)
    assert attached.trunk.get_input_embeddings().weight is copy_base.get_input_embeddings().weight
    half = CPDMTPForCausalLM.from_pretrained(tmp_path / "drafter", dtype=torch.bfloat16).eval()
    check_attached(half, c, tied)
    assert half.head.token_embedding.dtype == half.head.token_proj.weight.dtype == torch.bfloat16
    assert greedy(half, ids).shape == want.shape


def test_a_new_input_embedding_reaches_the_head():
    config = build_tiny_llama_config(vocab_size=40, hidden_size=16, num_heads=2)
    model = CPDMTPForCausalLM.from_causal_lm(
        AutoModelForCausalLM.from_config(config), 3, 2, next_token="base", token_conditioned=True
    )
    new = torch.nn.Embedding(40, 16)
    model.set_input_embeddings(new)
    assert model.head.token_embedding is new.weight
    # A model moved to another dtype keeps one embedding, read by both.
    model.to(torch.float64)
    assert model.head.token_embedding is model.trunk.get_input_embeddings().weight
    assert model.head.token_embedding.dtype == torch.float64


def test_a_conditioned_head_has_no_medusa_form():
    from cpd_mtp import CPDMTPHead
    from cpd_mtp.hf.medusa import medusa_state

    head = CPDMTPHead.from_linear(
        torch.nn.Linear(8, 20, bias=False),
        3,
        1,
        expert_type="linear",
        next_token="base",
        token_conditioned=True,
    )
    with pytest.raises(ValueError, match="token_conditioned head: its experts read"):
        medusa_state(head)


@pytest.mark.parametrize("tied", [False, True])
def test_a_freshly_converted_conditioned_model_starts_with_c_zero(tied):
    """``from_causal_lm(..., token_conditioned=True)``: C = 0, so the new head reads z = h and
    drafts exactly as the same head without conditioning."""
    torch.manual_seed(3)
    config = build_tiny_llama_config(
        vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, tie_word_embeddings=tied
    )
    base = AutoModelForCausalLM.from_config(config)
    model = CPDMTPForCausalLM.from_causal_lm(
        base, n_future=3, rank=2, next_token="base", token_conditioned=True
    )
    assert model.head.token_proj is not None and not model.head.token_proj.weight.any()
    hidden, root = torch.randn(4, 32), torch.randint(0, 64, (4,))
    assert torch.equal(model.head.conditioned_state(hidden, root), hidden)
