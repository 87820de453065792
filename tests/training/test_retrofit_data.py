"""A retrofit's data (``cpd_mtp.training.retrofit_data``): prompts mixed in the asked share,
held-out prompts never in training, chat messages refused without a template, and training
windows that hold the answer (labels) with the states of their own context."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cpd_mtp.training.retrofit_data import ExampleBatches, _interleave, make_prompts
from cpd_mtp.training.self_generate import GeneratedExamples
from cpd_mtp.training.tokenizer import train_bpe_tokenizer


@pytest.mark.parametrize("share", [0.0, 0.25, 0.75, 1.0])
def test_prompts_mix_chat_and_code_in_the_share_asked(share):
    chat, code = [("c", i) for i in range(100)], [("k", i) for i in range(100)]
    mixed = _interleave(chat, code, share, 40)
    kinds = [kind for kind, _ in mixed]
    assert len(mixed) == 40 and kinds.count("chat") == round(40 * share)
    for n in (4, 8, 20):  # every stretch holds its share, to within one
        assert abs(kinds[:n].count("chat") - n * share) <= 1
    assert [p for k, p in mixed if k == "chat"] == chat[: kinds.count("chat")]  # in order
    assert len(_interleave(chat[:3], code, 1.0, 10)) == 10  # the other side fills in


def settings(**overrides) -> SimpleNamespace:
    values = {"chat_share": 0.5, "prompts": None, "prompt_field": "prompt", "held_out": 0.2,
              "prompt_length": 4, "cache_dir": None}  # fmt: skip
    return SimpleNamespace(**{**values, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe_tokenizer(["hello world, how are you today? fine thanks."] * 50, 300)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


def test_your_own_prompts_are_split_and_the_held_out_never_trained_on(tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"question {i} about the world"})
                              for i in range(60)))  # fmt: skip
    blocks = np.arange(200).reshape(20, 10) % 250
    out = make_prompts(settings(prompts=str(path)), tokenizer, blocks, ["hello world"], seed=0,
                       total=30, measure_prompts=3)  # fmt: skip
    assert out.count("chat") == 15 and out.count("code") == 15
    trained = {tuple(ids) for ids, kind in zip(out.train, out.kinds) if kind == "chat"}
    held = {tuple(ids.tolist()) for ids in out.held_out["chat"]}
    assert held and trained.isdisjoint(held) and len(out.held_out["chat"]) <= 3
    assert all(len(ids) == 4 for ids, kind in zip(out.train, out.kinds) if kind == "code")
    assert tokenizer.decode(out.held_out["chat"][0]).startswith("<user>question")


def test_chat_messages_need_a_chat_template(tmp_path):
    plain = train_bpe_tokenizer(["hello world"] * 50, 300)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(ValueError, match="no chat template to put them through"):
        make_prompts(settings(prompts=str(path)), plain, None, [], seed=0, total=4,
                     measure_prompts=1)  # fmt: skip


def test_a_window_is_the_answer_in_its_own_context():
    examples = GeneratedExamples(
        ids=[np.array([5, 6, 7, 8, 9, 10]), np.array([3, 4, 11])],
        prompt_lengths=[3, 2],
        states=[np.arange(5 * 2, dtype=np.float32).reshape(5, 2), np.ones((2, 2), np.float32)],
    )
    batches = ExampleBatches(examples)
    hidden, labels = batches.window(0)
    # From the prompt's last token (7) on: its state predicts the answer 8, 9, 10.
    np.testing.assert_array_equal(labels, [-100, 8, 9, 10])
    np.testing.assert_array_equal(hidden[:3], examples.states[0][2:5])
    assert not hidden[3].any()  # the last token was never fed: no state, no target after it
    assert batches.target_tokens == 4 and batches.answer_ids()[1].tolist() == [11]
    h, lab = batches.batch(np.array([0, 1]), torch.device("cpu"))
    assert h.shape == (2, 4, 2) and lab[1].tolist() == [-100, 11, -100, -100]
    short = ExampleBatches(examples, [0], max_positions=2)
    assert short.window(0)[1].tolist() == [-100, 8]
