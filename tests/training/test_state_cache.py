"""Cached trunk states against the trunk run directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from conftest import build_tiny_llama_config
from transformers import AutoModelForCausalLM

from cpd_mtp.training.state_cache import cached_trunk_states


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = build_tiny_llama_config(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_heads=2, max_position_embeddings=32
    )
    return AutoModelForCausalLM.from_config(config).eval()


def test_states_equal_the_trunk_and_are_computed_once(tmp_path, monkeypatch):
    model = tiny_model()
    blocks = np.random.default_rng(0).integers(0, 50, size=(5, 12))
    states = cached_trunk_states(model, blocks, tmp_path, batch_size=2)
    with torch.no_grad():
        expected = model.model(torch.from_numpy(blocks)).last_hidden_state
    assert len(states) == 5 and states.num_tokens == 60
    for i in range(5):
        hidden, ids = states[i]
        assert torch.equal(ids, torch.from_numpy(blocks[i]))
        torch.testing.assert_close(hidden, expected[i], rtol=1e-5, atol=1e-6)
    # A second call reads the entry: the trunk does not run again.
    monkeypatch.setattr(model.model, "forward", lambda *a, **k: pytest.fail("trunk ran again"))
    again = cached_trunk_states(model, blocks, tmp_path, batch_size=3)
    assert again.path == states.path
    assert np.array_equal(np.asarray(again.hidden), np.asarray(states.hidden))


def test_a_changed_model_or_data_gets_its_own_entry(tmp_path):
    blocks = np.random.default_rng(1).integers(0, 50, size=(3, 8))
    first = cached_trunk_states(tiny_model(0), blocks, tmp_path)
    other_model = cached_trunk_states(tiny_model(1), blocks, tmp_path)
    other_data = cached_trunk_states(tiny_model(0), blocks[:2], tmp_path)
    assert len({first.path, other_model.path, other_data.path}) == 3
    half = cached_trunk_states(tiny_model(0), blocks, tmp_path, store_dtype="float16")
    assert half.hidden.dtype == np.float16 and half.path != first.path
    np.testing.assert_allclose(
        np.asarray(half.hidden), np.asarray(first.hidden), rtol=2e-3, atol=2e-3
    )


def test_a_failed_build_leaves_no_entry(tmp_path, monkeypatch):
    model = tiny_model()
    blocks = np.zeros((4, 6), dtype=np.int64)
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("killed")

    monkeypatch.setattr(model.model, "forward", boom)
    with pytest.raises(RuntimeError, match="killed"):
        cached_trunk_states(model, blocks, tmp_path)
    entries = list((tmp_path / "trunk_states").iterdir())
    assert entries == [] and calls


def test_bad_arguments(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="store_dtype"):
        cached_trunk_states(model, np.zeros((1, 2), dtype=np.int64), tmp_path, store_dtype="int8")
    with pytest.raises(ValueError, match="non-empty"):
        cached_trunk_states(model, np.zeros((0, 2), dtype=np.int64), tmp_path)


@pytest.mark.parametrize("shown", [False, True])
def test_the_progress_switch_is_obeyed(tmp_path, capfd, shown):
    # `progress=False` used to be shadowed by the import of the progress bar: always shown.
    blocks = np.random.default_rng(2).integers(0, 50, size=(3, 8))
    cached_trunk_states(tiny_model(), blocks, tmp_path, progress=shown)
    assert ("trunk states" in capfd.readouterr().err) is shown
