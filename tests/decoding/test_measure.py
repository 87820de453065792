"""``cpd_mtp.decoding.measure``: every decoder against the original model's own ``generate``
(identical tokens where they are, and only there), the best zero-training alternative taken
prompt by prompt, the summary and the warning when the head adds nothing."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from decoding_builders import prompt_tokens, trained_model
from hypothesis import given
from hypothesis import strategies as st

from cpd_mtp.decoding import measure
from cpd_mtp.decoding.measure import (
    format_report,
    head_adds_nothing,
    measure_decoders,
    summarise_speedup,
)


def measured(medians: dict[str, float]) -> dict:
    return {"kinds": {kind: {"vs_best_zero_training": summarise_speedup([m])}
                      for kind, m in medians.items()}}  # fmt: skip


@given(st.dictionaries(st.sampled_from(["chat", "code"]), st.floats(0.2, 5.0), min_size=1))
def test_a_warning_exactly_when_some_kind_is_below_the_best_zero_training(medians):
    warning = head_adds_nothing(measured(medians))
    assert (warning is not None) == any(m < 1.0 for m in medians.values())
    if warning is not None:
        assert warning.startswith("warning: the head adds nothing") and "\n" not in warning
        slow = [k for k, m in medians.items() if m < 1.0]
        assert all(kind in warning for kind in slow)


def test_the_spread_decides_trust():
    assert summarise_speedup([1.0, 1.05, 1.1, 0.95, 1.0])["trusted"]
    assert not summarise_speedup([0.5, 1.0, 1.5, 2.0, 1.0])["trusted"]


@pytest.fixture(scope="module")
def pair():
    model = trained_model(3, 2)
    original = copy.deepcopy(model)  # the same weights: its "generate" is HF's own loop
    original.generate = lambda ids, **kw: type(model).generate(
        original, ids, speculative=False, **kw
    )
    return model, original


def test_every_decoder_is_timed_and_compared_on_every_prompt(pair, monkeypatch):
    model, original = pair
    ticks = itertools.count()
    clock = lambda: float(next(ticks))  # noqa: E731  every decode takes "one second"
    prompts = {"code": [prompt_tokens(1, 5), prompt_tokens(2, 7)], "chat": [prompt_tokens(3, 4)]}
    lines: list[str] = []
    result = measure_decoders(model, original, prompts, 8, repeats=2, clock=clock,
                              progress=lines.append)  # fmt: skip
    assert result["identical"] and result["decoders"] == ["hf", "hf_packed", "hf_lookup",
                                                          "context", "default"]  # fmt: skip
    code = result["kinds"]["code"]
    assert code["prompts"] == 4 and code["new_tokens"] == 2 * 16  # 2 prompts x 2 passes x 8
    for name, entry in code["decoders"].items():
        assert entry["identical"] and entry["s_per_token"] == pytest.approx(4 / 32), name
    assert code["vs_best_zero_training"]["median"] == pytest.approx(1.0)  # every decode 1 s
    assert sum(code["best_zero_training"].values()) == 4
    assert len(lines) == 6 and lines[0].startswith("measure code 1/2 (pass 1): 8 tokens")
    assert "identical tokens to the original model: yes" in format_report(result, 8)


def test_identical_is_false_where_the_tokens_differ(pair):
    model, original = pair
    other = copy.deepcopy(original)
    with torch.no_grad():
        other.head.weight.add_(torch.randn_like(other.head.weight))
    other.generate = lambda ids, **kw: type(model).generate(other, ids, speculative=False, **kw)
    result = measure_decoders(model, other, {"code": [prompt_tokens(4, 6)]}, 8,
                              decoders=("hf", "default"))  # fmt: skip
    assert (
        not result["identical"] and not result["kinds"]["code"]["decoders"]["default"]["identical"]
    )
    with pytest.raises(ValueError, match="unknown decoders"):
        measure_decoders(model, other, {"code": [prompt_tokens(4, 6)]}, 8, decoders=("nope",))
    assert measure.ZERO_TRAINING == ("hf_packed", "hf_lookup", "context")
