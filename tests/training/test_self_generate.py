"""Self-generation (``cpd_mtp.training.self_generate``): the model's own greedy answers (HF
``generate`` on the original model is the reference) and the trunk's own states for them (a
teacher-forced forward), kept in resumable chunks; a deadline cuts a batch, which a later run
makes again."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny_llama_config
from transformers import AutoModelForCausalLM

from cpd_mtp.hf.modeling import CPDMTPForCausalLM
from cpd_mtp.training import self_generate
from cpd_mtp.training.self_generate import generate_examples

VOCAB, EOS, PAD = 48, 1, 0


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = build_tiny_llama_config(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2)
    original = AutoModelForCausalLM.from_config(config).eval()
    model = CPDMTPForCausalLM.from_causal_lm(
        AutoModelForCausalLM.from_config(config), n_future=2, rank=1, next_token="base"
    ).eval()
    model.trunk.load_state_dict(original.model.state_dict())
    with torch.no_grad():
        model.head.weight.copy_(original.lm_head.weight)
    return original, model


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]  # fmt: skip


def test_answers_and_states_are_the_models_own(models, tmp_path):
    original, model = models
    asked = prompts(7)
    out = generate_examples(model, asked, 10, tmp_path, eos_token_id=EOS, pad_token_id=PAD,
                            batch_size=3, store_dtype="float32")  # fmt: skip
    assert len(out) == 7 and out.made == out.generated_tokens > 0
    by_prompt = {tuple(ids[:p].tolist()): (ids, s) for ids, p, s in
                 zip(out.ids, out.prompt_lengths, out.states)}  # fmt: skip
    for prompt in asked:  # batched in sorted windows: found by their prompt
        ids, states = by_prompt[tuple(prompt)]
        with torch.no_grad():
            want = original.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                     eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
            hidden = original.model(input_ids=torch.from_numpy(ids)[None]).last_hidden_state[0]
        assert ids.tolist() == want[0, : len(ids)].tolist()
        assert states.shape == (len(ids) - 1, 32)
        torch.testing.assert_close(torch.from_numpy(states), hidden[:-1], rtol=1e-4, atol=1e-4)


def test_a_rerun_reads_the_chunks_and_generates_nothing(models, tmp_path, monkeypatch):
    _, model = models
    first = generate_examples(model, prompts(5, 1), 6, tmp_path, eos_token_id=EOS,
                              pad_token_id=PAD, batch_size=2)  # fmt: skip
    import cpd_mtp.decoding

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached chunk was generated again")

    monkeypatch.setattr(cpd_mtp.decoding, "generate", no_generation)
    again = generate_examples(model, prompts(5, 1), 6, tmp_path, eos_token_id=EOS,
                              pad_token_id=PAD, batch_size=2)  # fmt: skip
    assert again.made == 0 and [x.tolist() for x in again.ids] == [x.tolist() for x in first.ids]
    for a, b in zip(first.states, again.states):
        np.testing.assert_array_equal(a, b)


def test_a_deadline_cuts_a_batch_which_a_later_run_makes_again(models, tmp_path):
    _, model = models
    ticks = iter(range(10**6))
    clock = lambda: float(next(ticks))  # noqa: E731  every reading is one "second" later
    cut = generate_examples(model, prompts(4, 2), 12, tmp_path, eos_token_id=[], pad_token_id=PAD,
                            batch_size=4, deadline=6.0, clock=clock)  # fmt: skip
    assert cut.cut and len(cut) == 4 and cut.generated_tokens < 4 * 12
    full = generate_examples(model, prompts(4, 2), 12, tmp_path, eos_token_id=[], pad_token_id=PAD,
                             batch_size=4)  # fmt: skip
    assert not full.cut and full.generated_tokens == 4 * 12 and full.made == 4 * 12
    reused = generate_examples(model, prompts(4, 2), 12, tmp_path, eos_token_id=[],
                               pad_token_id=PAD, batch_size=4, reuse_cut=True)  # fmt: skip
    assert reused.made == 0  # the full chunk replaced the cut one
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        generate_examples(model, prompts(1), 0, tmp_path, eos_token_id=EOS, pad_token_id=PAD)


def test_a_damaged_chunk_is_made_again(models, tmp_path):
    _, model = models
    generate_examples(model, prompts(2, 3), 5, tmp_path, eos_token_id=[], pad_token_id=PAD,
                      batch_size=2)  # fmt: skip
    (ids_file,) = tmp_path.rglob("ids.npy")
    ids_file.write_bytes(ids_file.read_bytes()[:-8])  # cut short
    again = generate_examples(model, prompts(2, 3), 5, tmp_path, eos_token_id=[],
                              pad_token_id=PAD, batch_size=2)  # fmt: skip
    assert again.made == 10
    assert self_generate.RECORD == "chunk.json"
