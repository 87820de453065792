"""``model.generate`` decodes speculatively when that is exact, and is Hugging Face's otherwise.

Reference: Hugging Face ``generate`` on the original model (a base-mode CP model's next-token
logits are the original's, bit for bit) or, for a marginal-mode model, on the same model with
speculation switched off. Trunk forwards are counted with a forward hook on the trunk.
"""

from __future__ import annotations

import logging

import pytest
import torch
from generation_builders import (
    PAD,
    RecordingStreamer,
    accepting_pair,
    periodic_prompts,
    trained_model,
    word_tokenizer,
)
from transformers import StoppingCriteria, StoppingCriteriaList

from cpd_mtp.hf.generation import CPDMTPGenerateOutput

NEW = 24


@pytest.fixture(scope="module")
def pair():
    return accepting_pair()


class StopAfterToken(StoppingCriteria):
    """Row-wise: a row is done once its last token is ``token``."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return input_ids[:, -1] == self.token


def count_trunk_forwards(model) -> list[int]:
    calls = [0]
    model.trunk.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_streamed_greedy_equals_hf_in_fewer_forwards(pair):
    original, model = pair
    ids, _ = periodic_prompts(1)
    # The first automatic tree of a model times a few probe forwards; they are not decoding.
    model.generate(ids, max_new_tokens=2, do_sample=False)
    calls = count_trunk_forwards(model)
    streamer = RecordingStreamer()
    out = model.generate(ids, max_new_tokens=NEW, do_sample=False, streamer=streamer)
    want = original.generate(ids, max_new_tokens=NEW, do_sample=False)

    assert torch.equal(out, want)
    assert calls[0] < NEW  # more than one token per trunk forward
    stats = model.last_generation_stats
    assert stats.forwards == calls[0] and stats.new_tokens == NEW
    # The streamer got the prompt, then exactly the new tokens, in chunks, then end().
    assert torch.equal(streamer.puts[0], ids)
    assert torch.equal(torch.cat(streamer.puts[1:]), out[0, ids.shape[1] :])
    assert len(streamer.puts) - 1 < NEW and streamer.ended


def test_batched_streamer_gets_the_columns_hf_puts(pair):
    """B > 1: the streamer receives the (B,) columns Hugging Face's loop puts, in order."""
    original, model = pair
    ids, mask = periodic_prompts(3)
    ours, theirs = RecordingStreamer(), RecordingStreamer()
    kwargs = {"attention_mask": mask, "max_new_tokens": NEW, "do_sample": False}
    out = model.generate(ids, streamer=ours, eos_token_id=5, **kwargs)
    want = original.generate(ids, streamer=theirs, eos_token_id=5, **kwargs)
    assert torch.equal(out, want)
    assert len(ours.puts) == len(theirs.puts)
    for a, b in zip(ours.puts, theirs.puts):
        assert torch.equal(a, b)
    assert ours.ended and theirs.ended


def test_stopping_criteria_stop_at_hfs_token(pair):
    original, model = pair
    ids, mask = periodic_prompts(3, seed=1)
    plain = original.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    token = int(plain[0, ids.shape[1] + 5])  # a token row 0 emits mid-way
    # An EOS id no row emits: Hugging Face then pads the rows that stopped.
    eos = min(set(range(1, 16)) - set(plain.flatten().tolist()))
    kwargs = {"attention_mask": mask, "max_new_tokens": NEW, "do_sample": False}
    criteria = StoppingCriteriaList([StopAfterToken(token)])
    out = model.generate(ids, stopping_criteria=criteria, eos_token_id=eos, **kwargs)
    want = original.generate(ids, stopping_criteria=criteria, eos_token_id=eos, **kwargs)
    assert torch.equal(out, want)
    assert model.last_generation_stats is not None  # served speculatively
    # The criterion did cut row 0 after its first `token`, mid-way; the rest is padding.
    first = int((plain[0, ids.shape[1] :] == token).nonzero()[0])
    assert first + 1 < NEW and bool((out[0, ids.shape[1] + first + 1 :] == PAD).all())
    # Without an EOS id Hugging Face keeps generating the rows that stopped: its own loop runs.
    out = model.generate(ids, stopping_criteria=criteria, **kwargs)
    assert torch.equal(out, original.generate(ids, stopping_criteria=criteria, **kwargs))
    assert model.last_generation_stats is None


def test_lengths_eos_and_min_new_tokens_as_hf(pair):
    original, model = pair
    ids, mask = periodic_prompts(2, seed=2)
    plain = original.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    eos = int(plain[0, ids.shape[1] + 1])  # emitted early by row 0
    for kwargs in (
        {"max_length": ids.shape[1] + 9},
        {"max_new_tokens": 14, "eos_token_id": eos},
        {"max_new_tokens": 14, "eos_token_id": eos, "min_new_tokens": 6},
    ):
        out = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
        want = original.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
        assert torch.equal(out, want), kwargs
        assert model.last_generation_stats is not None  # served speculatively


def test_stop_strings_with_a_tokenizer(pair):
    original, model = pair
    ids, _ = periodic_prompts(1, seed=3)
    tokenizer = word_tokenizer()
    plain = original.generate(ids, max_new_tokens=NEW, do_sample=False)
    stop = tokenizer.decode(plain[0, ids.shape[1] + 4 : ids.shape[1] + 6])
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "stop_strings": [stop]}
    out = model.generate(ids, tokenizer=tokenizer, **kwargs)
    want = original.generate(ids, tokenizer=tokenizer, **kwargs)
    assert torch.equal(out, want) and out.shape[1] < plain.shape[1]
    assert model.last_generation_stats is not None


def test_return_dict_exposes_sequences_and_stats(pair):
    original, model = pair
    ids, mask = periodic_prompts(2)
    kwargs = {"attention_mask": mask, "max_new_tokens": NEW, "do_sample": False}
    out = model.generate(ids, return_dict_in_generate=True, **kwargs)
    want = original.generate(ids, return_dict_in_generate=True, **kwargs)
    assert isinstance(out, CPDMTPGenerateOutput)
    assert torch.equal(out.sequences, want.sequences)
    assert out.stats is model.last_generation_stats and out.stats.tokens_per_forward > 1


def test_sampling_uses_hfs_warpers():
    """top_k=1 sampling is greedy: HF's warpers were applied to targets and drafts."""
    model = trained_model(4, 3)
    ids, mask = periodic_prompts(2)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, speculative=False)
    torch.manual_seed(0)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=True,
        top_k=1,
        num_return_sequences=2,
    )
    assert torch.equal(out, greedy.repeat_interleave(2, dim=0))
    assert model.last_generation_stats.tokens_per_forward > 1


def test_marginal_mode_greedy_equals_hf_greedy_on_the_same_weights():
    model = trained_model(4, 3)
    ids, mask = periodic_prompts(3, seed=4)
    kwargs = {"attention_mask": mask, "max_new_tokens": NEW, "do_sample": False}
    out = model.generate(ids, **kwargs)
    assert model.last_generation_stats.tokens_per_forward > 1
    assert torch.equal(out, model.generate(ids, speculative=False, **kwargs))


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"num_beams": 2}, "beam_search"),
        ({"repetition_penalty": 1.3}, "RepetitionPenaltyLogitsProcessor"),
        ({"no_repeat_ngram_size": 2}, "NoRepeatNGramLogitsProcessor"),
        ({"speculative": False}, "speculative=False"),
    ],
)
def test_fallback_is_hfs_own_loop(pair, caplog, kwargs, reason, monkeypatch):
    original, model = pair
    monkeypatch.setattr("cpd_mtp.hf.generation._WARNED_REASONS", set())
    ids, mask = periodic_prompts(2, seed=5)
    calls = count_trunk_forwards(model)
    with caplog.at_level(logging.INFO, logger="cpd_mtp.hf.generation"):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, **kwargs)
    hf_kwargs = {k: v for k, v in kwargs.items() if k != "speculative"}
    want = original.generate(ids, attention_mask=mask, max_new_tokens=12, **hf_kwargs)
    assert torch.equal(out, want)
    assert model.last_generation_stats is None
    assert any(reason in record.getMessage() for record in caplog.records)
    level = logging.INFO if "speculative" in kwargs else logging.WARNING
    assert {r.levelno for r in caplog.records if reason in r.getMessage()} == {level}
    if "num_beams" not in kwargs:
        assert calls[0] == out.shape[1] - ids.shape[1]  # one trunk forward per token


def test_a_fallback_warns_once_per_reason(pair, caplog, monkeypatch):
    _, model = pair
    monkeypatch.setattr("cpd_mtp.hf.generation._WARNED_REASONS", set())
    ids, mask = periodic_prompts(1, seed=6)
    with caplog.at_level(logging.INFO, logger="cpd_mtp.hf.generation"):
        for _ in range(2):
            model.generate(ids, attention_mask=mask, max_new_tokens=3, repetition_penalty=1.2)
        model.generate(ids, attention_mask=mask, max_new_tokens=3, no_repeat_ngram_size=2)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2, warned  # one per reason
    assert "RepetitionPenaltyLogitsProcessor" in warned[0]
    assert "NoRepeatNGramLogitsProcessor" in warned[1]


def test_generation_config_switch_turns_speculation_off(pair):
    original, model = pair
    ids, _ = periodic_prompts(1)
    calls = count_trunk_forwards(model)
    model.generation_config.speculative = False
    try:
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    finally:
        del model.generation_config.speculative
    assert torch.equal(out, original.generate(ids, max_new_tokens=12, do_sample=False))
    assert calls[0] == 12 and model.last_generation_stats is None


@pytest.mark.parametrize("where", ["argument", "generation_config"])
def test_draft_tree_is_an_argument_or_a_generation_config_setting(pair, where):
    original, model = pair
    ids, mask = periodic_prompts(2, seed=8)
    want = original.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    for tree in ("chain", 5):
        if where == "argument":
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 draft_tree=tree, context_drafts=False)  # fmt: skip
        else:
            model.generation_config.draft_tree = tree
            try:
                out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW,
                                     do_sample=False, context_drafts=False)  # fmt: skip
            finally:
                del model.generation_config.draft_tree
        assert torch.equal(out, want)
        sizes = model.last_generation_stats.tree_sizes
        limit = model.head.config.n_future - 1 if tree == "chain" else tree
        assert sizes and max(sizes) <= limit


def test_prompt_lookup_runs_as_context_drafts_of_the_speculative_decoder(pair, caplog):
    original, model = pair
    ids, _ = periodic_prompts(1, seed=9)
    want = original.generate(ids, max_new_tokens=NEW, do_sample=False)
    with caplog.at_level(logging.INFO, logger="cpd_mtp.hf.generation"):
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, prompt_lookup_num_tokens=6)
    assert torch.equal(out, want)
    assert model.last_generation_stats is not None  # not Hugging Face's assisted loop
    assert not [r for r in caplog.records if "Hugging Face's loop" in r.getMessage()]
    # A fallback drops the tree options before Hugging Face's loop sees them.
    beams = model.generate(ids, max_new_tokens=4, num_beams=2, draft_tree=4)
    assert torch.equal(beams, original.generate(ids, max_new_tokens=4, num_beams=2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # The decoder's own options are checked whichever loop runs the call.
        ({"draft_tree": "banana", "num_beams": 2}, "draft_tree must be 'auto', 'chain'"),
        ({"context_drafts": 0, "repetition_penalty": 1.2}, "context_drafts must be"),
        ({"draft_positions": -1}, "draft_positions must be an int >= 0"),
    ],
)
def test_bad_decoding_options_are_refused_before_choosing_a_loop(pair, kwargs, message):
    _, model = pair
    ids, _ = periodic_prompts(1)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, max_new_tokens=4, **kwargs)
    model.generation_config.draft_tree = "banana"
    try:
        with pytest.raises(ValueError, match="draft_tree must be"):
            model.generate(ids, max_new_tokens=4, num_beams=2)
    finally:
        model.generation_config.draft_tree = None


def test_prompts_neither_loop_can_decode_are_one_line_errors(pair):
    _, model = pair
    with pytest.raises(ValueError, match=r"holds no token \(shape \(1, 0\)\)"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"must be a \(B, T\) torch.LongTensor, got list"):
        model.generate([[1, 2, 3]], max_new_tokens=4)
