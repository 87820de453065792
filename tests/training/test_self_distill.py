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


# ---------------------------------------------------------------------- resumable, checked
import errno  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cpd_mtp.training import self_distill  # noqa: E402
from cpd_mtp.training.state_cache import CacheError  # noqa: E402


class Killed(Exception):
    pass


def count_generate(model, monkeypatch, kill_at=None):
    """Count ``model.generate`` calls; raise ``Killed`` on call ``kill_at`` (1-based)."""
    real, calls = model.generate, []

    def generate(*args, **kwargs):
        calls.append(args[0].shape[0])
        if kill_at is not None and len(calls) == kill_at:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return calls


def as_lists(data):
    return [x.tolist() for x in data.ids], list(data.prompt_lengths)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 6),
    batch=st.integers(1, 3),
    kill=st.floats(0.0, 0.999),
    temperature=st.sampled_from([0.0, 0.9]),
)
def test_a_killed_generation_resumes_where_it_stopped(monkeypatch, n, batch, kill, temperature):
    model = tiny_model()
    rng = np.random.default_rng(n * 10 + batch)
    prompts = [rng.integers(1, 40, size=int(rng.integers(1, 6))).tolist() for _ in range(n)]
    chunks = -(-n // batch)
    finished = int(kill * chunks)  # chunks done before the kill
    args = {"temperature": temperature, "batch_size": batch, "seed": 5}
    with tempfile.TemporaryDirectory() as whole, tempfile.TemporaryDirectory() as root:
        expected = generate_continuations(model, prompts, 4, whole, **args)
        with monkeypatch.context() as patch:
            count_generate(model, patch, kill_at=finished + 1)
            with pytest.raises(Killed):
                generate_continuations(model, prompts, 4, root, **args)
        entry = Path(root) / "self_distill" / expected.path.name
        assert not entry.exists()  # an entry is whole or absent
        with monkeypatch.context() as patch:
            calls = count_generate(model, patch)
            resumed = generate_continuations(model, prompts, 4, root, **args)
        assert len(calls) == chunks - finished  # only the missing chunks ran
        assert as_lists(resumed) == as_lists(expected)
        assert [p.name for p in (Path(root) / "self_distill").iterdir()] == [entry.name]


def test_progress_counts_resumed_chunks_as_done(tmp_path, monkeypatch, capfd):
    model = tiny_model()
    prompts = [[i + 1, i + 2] for i in range(10)]
    with monkeypatch.context() as patch:
        count_generate(model, patch, kill_at=7)
        with pytest.raises(Killed):
            generate_continuations(model, prompts, 2, tmp_path, batch_size=1)
    capfd.readouterr()
    generate_continuations(model, prompts, 2, tmp_path, batch_size=1, progress=True)
    lines = capfd.readouterr().err.splitlines()
    assert "6 of 10 chunks (6 of 10 prompts) already done" in lines[0]
    counts = [line.split(": ")[1].split()[0] for line in lines[1:]]
    assert counts == ["7/10", "8/10", "9/10", "10/10"]


def test_a_damaged_chunk_is_generated_again(tmp_path, monkeypatch):
    model = tiny_model()
    prompts = [[1, 2], [3, 4], [5, 6]]
    expected = generate_continuations(model, prompts, 3, tmp_path / "whole", batch_size=1)
    with monkeypatch.context() as patch:
        count_generate(model, patch, kill_at=3)
        with pytest.raises(Killed):
            generate_continuations(model, prompts, 3, tmp_path, batch_size=1)
    chunk = next((tmp_path / "self_distill").glob("*.partial-b1/chunk-000001.npz"))
    chunk.write_bytes(chunk.read_bytes()[:-10])
    calls = count_generate(model, monkeypatch)
    with pytest.warns(UserWarning, match=f"{chunk} is unreadable"):
        again = generate_continuations(model, prompts, 3, tmp_path, batch_size=1)
    assert len(calls) == 2 and as_lists(again) == as_lists(expected)


@pytest.mark.parametrize("damage", ["truncate ids", "flip ids", "drop bounds", "garble meta"])
def test_a_damaged_entry_is_generated_again_with_a_warning(tmp_path, monkeypatch, damage):
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    first = generate_continuations(model, prompts, 4, tmp_path)
    ids, meta = first.path / "ids.npy", first.path / "meta.json"
    if damage == "truncate ids":
        ids.write_bytes(ids.read_bytes()[:-3])
        named = ids
    elif damage == "flip ids":
        data = bytearray(ids.read_bytes())
        data[-1] ^= 1
        ids.write_bytes(bytes(data))
        named = ids
    elif damage == "drop bounds":
        named = first.path / "bounds.npy"
        named.unlink()
    else:
        meta.write_text(meta.read_text()[:-5])
        named = meta
    calls = count_generate(model, monkeypatch)
    with pytest.warns(UserWarning, match=f"entry {first.path} is damaged .*{named}"):
        again = generate_continuations(model, prompts, 4, tmp_path)
    assert len(calls) == 1 and as_lists(again) == as_lists(first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_continuations(model, prompts, 4, tmp_path)  # whole again: no warning


def test_an_entry_of_an_older_version_is_kept(tmp_path, monkeypatch):
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    first = generate_continuations(model, prompts, 4, tmp_path)
    (first.path / "meta.json").write_text(json.dumps({"examples": 2}))
    count_generate(model, monkeypatch, kill_at=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = generate_continuations(model, prompts, 4, tmp_path)
    assert as_lists(again) == as_lists(first)


def test_a_full_disk_is_one_line_naming_the_chunk(tmp_path, monkeypatch):
    model = tiny_model()

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(self_distill, "durable_write_bytes", no_space)
    with pytest.raises(CacheError) as error:
        generate_continuations(model, [[1, 2]], 2, tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("No space left on device while writing ")
    assert ".partial-b16/chunk-000000.npz" in message


@settings(max_examples=6, deadline=None)
@given(n=st.integers(2, 7), batch=st.integers(1, 3), limit=st.integers(1, 7))
def test_a_limit_gives_the_leading_continuations_and_a_later_call_goes_on(n, batch, limit):
    """``max_examples`` (rounded up to whole batches) gives the first prompts' continuations,
    equal to a full run's; a later full call generates only the chunks not done yet."""
    import tempfile

    model = tiny_model()
    prompts = [[i + 1, (3 * i) % 39 + 1] for i in range(n)]
    with tempfile.TemporaryDirectory() as whole, tempfile.TemporaryDirectory() as root:
        expected = as_lists(generate_continuations(model, prompts, 3, whole, batch_size=batch))
        with pytest.MonkeyPatch.context() as patch:
            calls = count_generate(model, patch)
            first = generate_continuations(
                model, prompts, 3, root, batch_size=batch, max_examples=limit
            )
        kept = min(n, -(-limit // batch) * batch)
        assert as_lists(first) == (expected[0][:kept], expected[1][:kept])
        assert sum(calls) == kept
        with pytest.MonkeyPatch.context() as patch:
            calls = count_generate(model, patch)
            rest = generate_continuations(model, prompts, 3, root, batch_size=batch)
        assert as_lists(rest) == expected and sum(calls) == n - kept
        # The published entry still answers a limited call with the first prompts only.
        again = generate_continuations(
            model, prompts, 3, root, batch_size=batch, max_examples=limit
        )
        assert as_lists(again) == (expected[0][:kept], expected[1][:kept])


def test_a_stop_ends_generation_after_whole_batches_and_never_before_the_first(
    tmp_path, monkeypatch
):
    model = tiny_model()
    prompts = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    calls = count_generate(model, monkeypatch)
    data = generate_continuations(
        model, prompts, 2, tmp_path, batch_size=2, stop=lambda done, seconds: True
    )
    assert calls == [2] and [len(p) for p in prompts[:2]] == data.prompt_lengths
    assert len(data.ids) == 2 and data.generated_tokens == 4
    asked = []

    def after_four(done, seconds):
        asked.append((done, seconds))
        return done >= 4

    again = generate_continuations(model, prompts, 2, tmp_path, batch_size=2, stop=after_four)
    assert len(again.ids) == 4 and calls == [2, 2]  # the first batch came from disk
    assert [d for d, _ in asked] == [2, 4] and asked[0][1] == 0.0 and asked[1][1] > 0.0
    assert not list((tmp_path / "self_distill").glob("*/meta.json"))  # not published: partial
