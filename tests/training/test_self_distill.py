"""Self-generated distillation data against Hugging Face generate on the base model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from conftest import build_tiny_llama_config
from transformers import AutoModelForCausalLM

from cpd_mtp.training.self_distill import (
    distillation_blocks,
    generate_continuations,
)


def tiny_model(eos=None):
    torch.manual_seed(0)
    config = build_tiny_llama_config(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_heads=2, max_position_embeddings=64
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    return model


def test_greedy_continuations_equal_hf_generate_one_prompt_at_a_time(tmp_path):
    model = tiny_model()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 40, size=6).tolist() for _ in range(5)]
    data = generate_continuations(model, prompts, 7, tmp_path, batch_size=2)
    for prompt, seq, length in zip(prompts, data.ids, data.prompt_lengths):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=7, do_sample=False)
        assert seq.tolist() == expected[0].tolist()
        assert length == len(prompt)
    assert data.generated_tokens == 5 * 7


def test_cached_and_seeded(tmp_path, monkeypatch):
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    sampled = generate_continuations(model, prompts, 5, tmp_path, temperature=0.7, seed=3)
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated again"))
    again = generate_continuations(model, prompts, 5, tmp_path, temperature=0.7, seed=3)
    assert [x.tolist() for x in again.ids] == [x.tolist() for x in sampled.ids]
    monkeypatch.undo()
    other = generate_continuations(model, prompts, 5, tmp_path, temperature=0.7, seed=4)
    assert other.path != sampled.path


def test_a_continuation_stops_at_eos(tmp_path):
    model = tiny_model()
    prompt = [5, 6, 7]
    free = generate_continuations(model, [prompt], 8, tmp_path).ids[0]
    eos = int(free[len(prompt) + 2])  # the third generated token becomes the EOS
    stopped = generate_continuations(tiny_model(eos=eos), [prompt], 8, tmp_path).ids[0]
    first = len(prompt) + int(np.flatnonzero(free[len(prompt) :] == eos)[0])
    assert stopped.tolist() == free[: first + 1].tolist()


def test_blocks_ignore_the_prompt_and_padding(tmp_path):
    model = tiny_model()
    data = generate_continuations(model, [[1, 2], [3, 4, 5, 6]], 3, tmp_path)
    ids, labels = distillation_blocks(data, block_size=6, pad_token_id=0)
    assert ids[0].tolist() == [*data.ids[0].tolist(), 0]
    assert labels[0].tolist() == [-100, -100, *data.ids[0][2:].tolist(), -100]
    assert ids[1].tolist() == data.ids[1][:6].tolist()
    assert labels[1].tolist() == [-100] * 4 + data.ids[1][4:6].tolist()


def test_bad_arguments(tmp_path):
    model = tiny_model()
    for kwargs, message in [
        ({"new_tokens": 0}, "new_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"batch_size": 0}, "batch_size"),
    ]:
        args = {"new_tokens": 2, **kwargs}
        with pytest.raises(ValueError, match=message):
            generate_continuations(model, [[1]], cache_dir=tmp_path, **args)
    with pytest.raises(ValueError, match="prompts"):
        generate_continuations(model, [[]], 2, tmp_path)


@pytest.mark.parametrize("shown", [False, True])
def test_the_progress_switch_is_obeyed(tmp_path, capfd, shown):
    # `progress=False` used to be shadowed by the import of the progress bar: always shown.
    generate_continuations(tiny_model(), [[1, 2, 3]], 4, tmp_path, progress=shown)
    assert ("self-distillation" in capfd.readouterr().err) is shown
