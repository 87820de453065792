"""Prompts (``cpd_mtp.training.prompts``): the cut-short ShareGPT file read to its last whole
conversation, the filters, JSONL prompts and their errors, the held-out split, and the chat
template applied as the tokenizer itself applies it."""

from __future__ import annotations

import json

import pytest

from cpd_mtp.training.prompts import (
    ChatPrompt,
    encode_chat,
    read_prompt_file,
    sharegpt_prompts,
    split_prompts,
)
from cpd_mtp.training.tokenizer import train_bpe_tokenizer


def conversation(first: str, role: str = "human") -> dict:
    return {
        "id": "x",
        "conversations": [{"from": role, "value": first}, {"from": "gpt", "value": "ok"}],
    }


def test_a_cut_short_sharegpt_file_gives_its_whole_conversations(tmp_path):
    records = [
        conversation("Write a poem about the sea, please."),
        conversation("short"),  # too short
        conversation("Explain recursion to a child in two sentences."),
        conversation("An answer first", role="gpt"),  # starts with the model
        conversation("Write a poem about the sea, please."),  # a repeat
        conversation("Résumé " * 2 + "é" * 40),  # mostly not ASCII
        conversation("How do I sort a list of dicts by a key in Python?"),
    ]
    text = json.dumps(records)
    (tmp_path / "full.json").write_text(text)
    cut = text[: text.rindex("How do I sort") + 10]  # inside the last conversation
    (tmp_path / "cut.json").write_text(cut)
    full = sharegpt_prompts(tmp_path / "full.json")
    assert full == [
        "Write a poem about the sea, please.",
        "Explain recursion to a child in two sentences.",
        "How do I sort a list of dicts by a key in Python?",
    ]
    assert sharegpt_prompts(tmp_path / "cut.json") == full[:2]
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(ValueError, match="holds no ShareGPT conversation"):
        sharegpt_prompts(tmp_path / "none.json")


def test_jsonl_prompts_texts_and_chats(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "Write a haiku."},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ]
        },
        {"text": "ignored field", "prompt": "Second text"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    got = read_prompt_file(path)
    assert got[0] == "Write a haiku." and got[2] == "Second text"
    assert got[1] == ChatPrompt((("system", "Be brief."), ("user", "Hi")))
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "another field"}) + "\n")
    assert read_prompt_file(tmp_path / "t.jsonl", field="text") == ["another field"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "p.jsonl:1: not a JSON object"),
        ('{"other": 1}', "needs a non-empty text field 'prompt'"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user"}]}', "needs a 'role' and a 'content'"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "must be the user's"),
        ("", "holds no prompt"),
    ],
)
def test_bad_jsonl_prompts_are_one_line_errors(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        read_prompt_file(path)
    assert "\n" not in str(info.value)


def test_the_held_out_split_is_stable_and_disjoint():
    prompts = [f"prompt number {i}" for i in range(2000)]
    train, held = split_prompts(prompts, 0.05)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 2000
    assert 50 < len(held) < 150  # about 5 %
    _, held2 = split_prompts([*prompts, "a new one"], 0.05)
    assert set(held) <= set(held2)  # adding prompts never moves the others


def test_chat_prompts_go_through_the_tokenizers_own_template():
    tokenizer = train_bpe_tokenizer(["hello world, how are you today?"] * 50, vocab_size=300)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    want = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(encode_chat(tokenizer, "hello")) == want
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        encode_chat(tokenizer, "hello")
