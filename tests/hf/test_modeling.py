"""Tests of the Hugging Face drop-in ``CPDMTPForCausalLM`` (tiny models built from config).

References are independent of the wrapper: the original HF model's logits and loss, the head
applied to the trunk's hidden states, and a hand-written greedy loop.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from transformers.utils import logging as hf_logging

from cpd_mtp.hf.modeling import (
    CPDMTPCausalLMOutputWithPast,
    CPDMTPForCausalLM,
    CPDMTPModelConfig,
)

hf_logging.set_verbosity_error()
torch.set_num_threads(1)

VOCAB = 96
ARCHS = ["llama", "llama_tied", "gpt2"]


def make_config(
    arch: str,
    vocab_size: int = VOCAB,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
):
    if arch in ("llama", "llama_tied"):  # full multi-head attention, MLP of 4 d
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=512,
            tie_word_embeddings=arch == "llama_tied",
        )
    if arch == "gpt2":  # GPT-2 ties its embeddings by default
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    if arch in ("qwen2", "mistral"):  # same shape, grouped-query attention
        config_class = Qwen2Config if arch == "qwen2" else MistralConfig
        return config_class(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    raise ValueError(arch)


def make_lm(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(make_config(arch)).eval()


def make_model(arch: str, seed: int = 0, **head_kwargs) -> CPDMTPForCausalLM:
    lm = make_lm(arch, seed)
    head_kwargs = {"n_future": 3, "rank": 2, **head_kwargs}
    return CPDMTPForCausalLM.from_causal_lm(lm, **head_kwargs).eval()


def identity_model(lm: nn.Module) -> CPDMTPForCausalLM:
    """n = 1, r = 1, linear expert set to the identity, no balancing: a plain LM head."""
    model = CPDMTPForCausalLM.from_causal_lm(
        lm, n_future=1, rank=1, expert_type="linear", balance="none"
    )
    with torch.no_grad():
        model.head.experts.proj.copy_(torch.eye(model.config.text_config.hidden_size)[None])
    return model.eval()


def batch(seed: int = 1, shape: tuple[int, int] = (2, 9)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, shape, generator=generator)


# ---------------------------------------------------------------------- logits and loss
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_are_head_of_trunk_hidden_and_normalised(arch: str) -> None:
    model = make_model(arch)
    ids = batch()
    with torch.no_grad():
        out = model(input_ids=ids)
        hidden, _ = model.trunk_hidden(ids)
        expected = model.head(hidden)
    assert isinstance(out, CPDMTPCausalLMOutputWithPast)
    assert out.logits.shape == (*ids.shape, VOCAB)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(out.logits.logsumexp(-1), torch.zeros(ids.shape), rtol=0, atol=1e-5)
    # the trunk's last hidden state is the one HF feeds its lm_head (after the final norm)
    lm_hidden = model.trunk(input_ids=ids).last_hidden_state
    torch.testing.assert_close(hidden, lm_hidden)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_is_head_loss_on_trunk_hidden(arch: str) -> None:
    model = make_model(arch)
    ids = batch()
    labels = ids.clone()
    labels[0, -3:] = -100
    out = model(input_ids=ids, labels=labels)
    hidden, _ = model.trunk_hidden(ids)
    reference = model.head(hidden, labels=labels)
    torch.testing.assert_close(out.loss, reference.loss)
    torch.testing.assert_close(out.logits, reference.logits)
    assert out.cp_output is not None
    torch.testing.assert_close(out.cp_output.joint_nll, reference.joint_nll)
    assert out.cp_output.per_head_nll.shape == (3,)


@pytest.mark.parametrize("arch", [*ARCHS, "qwen2", "mistral"])
def test_identity_head_reproduces_original_model(arch: str) -> None:
    lm = make_lm(arch)
    ids = batch()
    labels = ids.clone()
    labels[1, :2] = -100
    labels[0, 5] = -100
    with torch.no_grad():
        ref = lm(input_ids=ids, labels=labels)
    ref_log_probs = torch.log_softmax(ref.logits.float(), dim=-1)
    lm_head_weight = lm.get_output_embeddings().weight
    model = identity_model(lm)
    assert model.head.weight is lm_head_weight
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref_log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_padding_labels_are_marginalised() -> None:
    """A right-padded row with -100 labels has the loss of the unpadded sequence."""
    model = make_model("llama", n_future=3, rank=2, balance="none")
    ids = batch(shape=(1, 7))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], dim=1).long()
    labels = padded.clone()
    labels[:, 7:] = -100
    with torch.no_grad():
        short = model(input_ids=ids, labels=ids)
        long = model(input_ids=padded, attention_mask=mask, labels=labels)
    torch.testing.assert_close(long.loss, short.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(long.logits[:, :7], short.logits, rtol=1e-5, atol=1e-5)


def test_return_logits_false_and_logits_to_keep() -> None:
    model = make_model("llama")
    ids = batch()
    with torch.no_grad():
        full = model(input_ids=ids, labels=ids)
        no_logits = model(input_ids=ids, labels=ids, return_logits=False)
        last = model(input_ids=ids, labels=ids, logits_to_keep=1)
        picked = model(input_ids=ids, logits_to_keep=torch.tensor([0, 4]))
    assert no_logits.logits is None
    torch.testing.assert_close(no_logits.loss, full.loss)
    torch.testing.assert_close(last.loss, full.loss)
    torch.testing.assert_close(last.logits, full.logits[:, -1:])
    torch.testing.assert_close(picked.logits, full.logits[:, [0, 4]])
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], full.loss)


def test_return_dict_none_is_resolved_from_the_config() -> None:
    """``return_dict=None`` (what PEFT passes) follows ``config.return_dict`` like HF models."""
    model = make_model("llama")
    ids = batch()
    with torch.no_grad():
        as_dict = model(input_ids=ids, labels=ids, return_dict=True, use_cache=False)
        resolved = model(input_ids=ids, labels=ids, return_dict=None, use_cache=False)
        assert isinstance(resolved, CPDMTPCausalLMOutputWithPast)
        torch.testing.assert_close(resolved.logits, as_dict.logits, rtol=0, atol=0)
        torch.testing.assert_close(resolved.loss, as_dict.loss, rtol=0, atol=0)
        model.config.return_dict = False
        as_tuple = model(input_ids=ids, labels=ids, return_dict=None, use_cache=False)
        default = model(input_ids=ids, use_cache=False)
        explicit = model(input_ids=ids, use_cache=False, return_dict=True)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], as_dict.loss, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], as_dict.logits, rtol=0, atol=0)
    assert isinstance(default, tuple) and len(default) == 1
    assert isinstance(explicit, CPDMTPCausalLMOutputWithPast)  # an explicit value wins


@settings(max_examples=8, deadline=None)
@given(
    n_future=st.integers(1, 4),
    rank=st.integers(1, 3),
    expert_type=st.sampled_from(["linear", "resblock", "lowrank"]),
    arch=st.sampled_from(["llama", "gpt2"]),
    seed=st.integers(0, 2**16),
)
def test_wrapper_matches_head_for_any_head_config(
    n_future: int, rank: int, expert_type: str, arch: str, seed: int
) -> None:
    model = make_model(
        arch, seed=seed, n_future=n_future, rank=rank, expert_type=expert_type, expert_inner_size=4
    )
    ids = batch(seed, shape=(2, 6))
    labels = ids.clone()
    labels[:, 0] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        hidden, _ = model.trunk_hidden(ids)
        reference = model.head(hidden, labels=labels)
    torch.testing.assert_close(out.loss, reference.loss)
    torch.testing.assert_close(out.logits, reference.logits)
    torch.testing.assert_close(out.logits.logsumexp(-1), torch.zeros(ids.shape), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- weights
@pytest.mark.parametrize("arch", ARCHS)
def test_unembedding_is_shared_and_tie_survives(arch: str) -> None:
    lm = make_lm(arch)
    lm_head_weight = lm.get_output_embeddings().weight
    tied = lm_head_weight is lm.get_input_embeddings().weight
    assert tied == (arch != "llama")
    model = CPDMTPForCausalLM.from_causal_lm(lm, n_future=2, rank=2)
    assert model.head.weight is lm_head_weight
    assert model.get_output_embeddings() is model.head
    assert model.get_input_embeddings() is lm.get_input_embeddings()
    assert (model.head.weight is model.get_input_embeddings().weight) == tied
    assert model.config.tie_word_embeddings == tied
    # W_U appears once among the parameters, and no unused lm_head module is kept
    assert sum(p is lm_head_weight for p in model.parameters()) == 1
    assert not hasattr(model, "lm_head")
    model.tie_weights()
    assert model.head.weight is lm_head_weight
    # a gradient step through the loss reaches the shared tensor
    model(input_ids=batch(), labels=batch()).loss.backward()
    assert lm_head_weight.grad is not None and lm_head_weight.grad.abs().sum() > 0


def test_lm_head_with_bias_is_rejected() -> None:
    lm = make_lm("llama")
    lm.lm_head = nn.Linear(32, VOCAB, bias=True)
    with pytest.raises(ValueError, match="bias"):
        CPDMTPForCausalLM.from_causal_lm(lm, n_future=2, rank=2)


def test_bad_head_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        CPDMTPForCausalLM.from_causal_lm(make_lm("llama"), n_future=0, rank=2)
    with pytest.raises(ValueError, match="hidden_size"):
        CPDMTPModelConfig(
            text_config=make_config("llama").to_dict(),
            head_config={"hidden_size": 16, "vocab_size": VOCAB},
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bad_labels_raise(arch: str) -> None:
    model = make_model(arch)
    ids = batch()
    with pytest.raises(ValueError, match="shape"):
        model(input_ids=ids, labels=ids[:, :-1])
    with pytest.raises(ValueError, match="shape"):
        model(input_ids=ids, labels=ids[None])
    bad = ids.clone()
    bad[0, 3] = VOCAB
    with pytest.raises(ValueError, match="outside"):
        model(input_ids=ids, labels=bad)
    bad[0, 3] = -5
    with pytest.raises(ValueError, match="outside"):
        model(input_ids=ids, labels=bad)


# ---------------------------------------------------------------------- freezing
def test_freeze_trunk_trains_only_gate_and_experts() -> None:
    model = CPDMTPForCausalLM.from_causal_lm(make_lm("llama"), 2, 2, freeze_trunk=True)
    assert model.config.freeze_trunk
    assert not any(p.requires_grad for p in model.trunk.parameters())
    assert not model.head.weight.requires_grad
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        name
        for name, _ in model.named_parameters()
        if name.startswith(("head.gate", "head.experts"))
    }
    model(input_ids=batch(), labels=batch()).loss.backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert model.head.gate.weight.grad is not None
    model.set_freeze_trunk(False)
    assert all(p.requires_grad for p in model.parameters())
    assert not model.config.freeze_trunk


# ---------------------------------------------------------------------- save / load
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("freeze", [False, True])
def test_save_load_round_trip(arch: str, freeze: bool, tmp_path) -> None:
    model = make_model(arch, expert_type="lowrank", expert_inner_size=8, freeze_trunk=freeze)
    with torch.no_grad():  # make W_U and the head differ from any fresh initialisation
        for p in model.head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = CPDMTPForCausalLM.from_pretrained(tmp_path).eval()

    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert loaded.config.head_config == model.config.head_config
    assert loaded.config.cp_config == model.config.cp_config
    assert loaded.config.freeze_trunk == freeze
    assert loaded.config.text_config.model_type == model.config.text_config.model_type
    # loading records the weights' dtype in the config; everything else is unchanged
    text_before = {**model.config.text_config.to_diff_dict(), "dtype": None}
    text_after = {**loaded.config.text_config.to_diff_dict(), "dtype": None}
    assert text_after == text_before
    assert type(loaded.trunk) is type(model.trunk)
    tied = model.config.tie_word_embeddings
    assert loaded.config.tie_word_embeddings == tied
    assert (loaded.head.weight is loaded.get_input_embeddings().weight) == tied
    for (name, p), (name2, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert name == name2 and p.requires_grad == q.requires_grad, name
    ids = batch()
    with torch.no_grad():
        a = model(input_ids=ids, labels=ids)
        b = loaded(input_ids=ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)

    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(auto, CPDMTPForCausalLM)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CPDMTPModelConfig)


def test_fresh_model_from_config(tmp_path) -> None:
    config = CPDMTPModelConfig(
        text_config=make_config("llama_tied").to_dict(),
        head_config={"hidden_size": 32, "vocab_size": VOCAB, "n_future": 2, "rank": 3},
    )
    assert config.text_config.model_type == "llama"
    torch.manual_seed(0)
    model = CPDMTPForCausalLM(config)
    assert model.head.weight is model.get_input_embeddings().weight
    assert model.head.config.rank == 3
    model.save_pretrained(tmp_path)
    loaded = CPDMTPForCausalLM.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


# ---------------------------------------------------------------------- generation
@pytest.mark.parametrize("speculative", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_greedy_matches_hand_loop(arch: str, speculative: bool) -> None:
    """``generate`` (speculative by default, or Hugging Face's loop) is greedy decoding."""
    model = make_model(arch)
    prompt = batch(shape=(2, 5))
    steps = 6
    model.generation_config.eos_token_id = None  # never stop early: compare all steps
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        speculative=speculative,
    )
    assert (model.last_generation_stats is not None) == speculative
    assert out.shape == (2, 5 + steps)
    tokens = prompt
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=tokens, use_cache=False).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, tokens)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trunk_hidden_with_cache_matches_full_forward(arch: str) -> None:
    model = make_model(arch)
    ids = batch(shape=(2, 8))
    with torch.no_grad():
        full, none = model.trunk_hidden(ids)
        assert none is None
        first, cache = model.trunk_hidden(ids[:, :5], use_cache=True)
        assert cache.get_seq_length() == 5
        rest, cache = model.trunk_hidden(ids[:, 5:], cache=cache, use_cache=True)
        assert cache.get_seq_length() == 8
        # what a speculative decoder does after a rejection (transformers 5: crop(-k) drops k)
        cache.crop(-2)
        assert cache.get_seq_length() == 6
        again, cache = model.trunk_hidden(ids[:, 6:], cache=cache, use_cache=True)
    assert full.shape == (2, 8, 32)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, full[:, 6:], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- training
class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_trainer_runs(arch: str, tmp_path) -> None:
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = make_model(arch).train()
    data = _TokenDataset(batch(shape=(8, 12)))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = trainer.evaluate()["eval_loss"]
    assert after != before


def _zero3_round_trip(out_dir: str, tied: bool) -> None:
    """Convert, save, reload and train under Hugging Face ZeRO-3, then reload outside ZeRO.

    Runs in its own process (see ``test_hf_zero3_convert_save_reload_train``): the
    TrainingArguments come first, so every model below is built under ``deepspeed.zero.Init``
    and its parameters are partitioned (``.shape`` is (0,)).
    """
    import deepspeed
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    def gathered_state(model: nn.Module) -> dict[str, torch.Tensor]:
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

    zero3 = {
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        # torch's AdamW: DeepSpeed's FusedAdam would be compiled first (minutes on CPU)
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
    }
    args = TrainingArguments(
        output_dir=f"{out_dir}/trainer",
        deepspeed=zero3,
        use_cpu=True,
        report_to=[],
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    assert is_deepspeed_zero3_enabled()
    torch.manual_seed(0)
    config = make_config(
        "llama_tied" if tied else "llama", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2
    )
    lm = AutoModelForCausalLM.from_config(config)
    assert lm.get_output_embeddings().weight.shape == (0,)  # really partitioned
    model = CPDMTPForCausalLM.from_causal_lm(lm, n_future=2, rank=2)
    assert (model.head.weight is model.get_input_embeddings().weight) == tied
    converted = gathered_state(model)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        model.save_pretrained(f"{out_dir}/converted")

    loaded = CPDMTPForCausalLM.from_pretrained(f"{out_dir}/converted")
    assert loaded.head.weight.shape == (0,)  # loaded under zero.Init too
    reloaded = gathered_state(loaded)
    assert reloaded.keys() == converted.keys()
    for key, value in converted.items():
        assert torch.equal(reloaded[key], value), key

    rows = torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(1))
    trainer = Trainer(model=loaded, args=args, train_dataset=_TokenDataset(rows))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(map(math.isfinite, losses)), losses
    engine = trainer.model_wrapped
    engine.eval()
    with torch.no_grad():
        zero_logits = engine(input_ids=rows[:2]).logits
    trained = gathered_state(trainer.model)
    assert any(not torch.equal(trained[k], converted[k]) for k in converted)  # it trained
    trainer.save_model(f"{out_dir}/trained")
    saved = load_file(f"{out_dir}/trained/model.safetensors")
    for key, value in saved.items():
        assert torch.equal(value, trained[key]), key

    unset_hf_deepspeed_config()  # from here on, plain (unpartitioned) models
    assert not is_deepspeed_zero3_enabled()
    plain = CPDMTPForCausalLM.from_pretrained(f"{out_dir}/trained").eval()
    assert (plain.head.weight is plain.get_input_embeddings().weight) == tied
    for key, value in plain.state_dict().items():
        assert torch.equal(value, trained[key]), key
    with torch.no_grad():
        plain_logits = plain(input_ids=rows[:2]).logits
    torch.testing.assert_close(plain_logits, zero_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_hf_zero3_convert_save_reload_train(tied: bool, tmp_path) -> None:
    """``from_causal_lm`` and ``from_pretrained`` under HF ZeRO-3 (partitioned parameters).

    A world of one on CPU (gloo), in a child process so DeepSpeed's and accelerate's global
    state does not leak into the other tests.
    """
    pytest.importorskip("deepspeed")
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(root / ".venv" / "torch_extensions"))
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_modeling; "
        f"test_modeling._zero3_round_trip({str(tmp_path)!r}, tied={tied})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_gradient_checkpointing_gives_same_gradients() -> None:
    model = make_model("llama").train()
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


def test_missing_head_weights_are_initialised(tmp_path) -> None:
    """Loading a checkpoint without the head (e.g. a plain trunk) draws a fresh, sane head."""
    from safetensors.torch import load_file, save_file

    model = make_model("llama", expert_type="linear")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("head.")},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    loaded, info = CPDMTPForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {
        "head.weight",
        "head.gate.weight",
        "head.gate.bias",
        "head.experts.proj",
    }
    eye = torch.eye(32).expand_as(loaded.head.experts.proj)
    torch.testing.assert_close(loaded.head.experts.proj, eye, rtol=0, atol=0.05)
    assert torch.equal(loaded.head.gate.bias, torch.zeros(2))
    assert 0.01 < float(loaded.head.weight.detach().std()) < 0.03  # initializer_range = 0.02
    for key, value in weights.items():
        if key.startswith("trunk."):
            assert torch.equal(loaded.state_dict()[key], value), key
