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


# ---------------------------------------------------------------------- robustness
import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cpd_mtp.training import state_cache  # noqa: E402
from cpd_mtp.training.state_cache import (  # noqa: E402
    CacheError,
    required_bytes,
    sweep_stale_temporaries,
    verify_trunk_states,
)
from cpd_mtp.utils import files  # noqa: E402
from cpd_mtp.utils.files import host_tag  # noqa: E402

FEW = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class FakeTrunk(torch.nn.Module):
    """A trunk of one embedding, with no config: its width is known only after a forward."""

    def __init__(self, width: int, vocab: int = 20, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.calls = 0

    def forward(self, input_ids, use_cache=False):
        self.calls += 1
        return (self.embed(input_ids) * 1.5,)


def fake_disk(monkeypatch, free: int) -> None:
    usage = types.SimpleNamespace(total=10 * free + 1, used=0, free=free)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)


def entry_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def leftovers(root: Path) -> list[str]:
    folder = root / "trunk_states"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_too_little_space_is_refused_before_the_trunk_runs(tmp_path, monkeypatch):
    model = tiny_model()
    blocks = np.zeros((6, 10), dtype=np.int64)
    needed = required_bytes(6, 10, model.config.hidden_size, 4)
    fake_disk(monkeypatch, needed - 1)
    monkeypatch.setattr(model.model, "forward", lambda *a, **k: pytest.fail("trunk ran"))
    with pytest.raises(CacheError) as error:
        cached_trunk_states(model, blocks, tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"not enough space in {tmp_path / 'trunk_states'} to cache trunk")
    assert "needs " in message and " free" in message
    assert leftovers(tmp_path) == []


@FEW
@given(
    n=st.integers(1, 5),
    length=st.integers(1, 7),
    width=st.integers(1, 6),
    batch=st.integers(1, 4),
    store=st.sampled_from(["float32", "float16"]),
)
def test_the_space_asked_covers_the_entry_and_is_all_that_is_asked(
    monkeypatch, n, length, width, batch, store
):
    blocks = np.random.default_rng(n * 100 + length).integers(0, 20, size=(n, length))
    itemsize = np.dtype(store).itemsize
    needed = required_bytes(n, length, width, itemsize)
    with tempfile.TemporaryDirectory() as root, monkeypatch.context() as patch:
        root = Path(root)
        fake_disk(patch, needed - 1)
        with pytest.raises(CacheError, match="not enough space"):
            cached_trunk_states(FakeTrunk(width), blocks, root, batch_size=batch, store_dtype=store)
        assert leftovers(root) == []
        fake_disk(patch, needed)  # exactly enough
        states = cached_trunk_states(
            FakeTrunk(width), blocks, root, batch_size=batch, store_dtype=store
        )
        assert states.hidden.shape == (n, length, width)
        assert needed >= entry_bytes(states.path) > needed - state_cache.SMALL_FILES_BYTES
        expected = FakeTrunk(width)(torch.from_numpy(blocks))[0].detach().numpy()
        np.testing.assert_array_equal(states.hidden, expected.astype(store))
        verify_trunk_states(states.path)


def test_a_full_disk_while_writing_is_one_line_naming_the_file(tmp_path, monkeypatch):
    model = tiny_model()
    blocks = np.random.default_rng(3).integers(0, 50, size=(6, 8))
    real_append, calls = state_cache._append, []

    def fills_up(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(*args)

    monkeypatch.setattr(state_cache, "_append", fills_up)
    with pytest.raises(CacheError) as error:
        cached_trunk_states(model, blocks, tmp_path, batch_size=2)
    message = str(error.value)
    assert "\n" not in message and message.startswith("No space left on device while writing ")
    assert "hidden.npy" in message and str(tmp_path / "trunk_states") in message
    assert leftovers(tmp_path) == []  # the temporary folder is gone
    monkeypatch.undo()
    states = cached_trunk_states(model, blocks, tmp_path, batch_size=2)
    assert len(states) == 6


def test_a_full_disk_at_the_fsync_before_publishing(tmp_path, monkeypatch):
    model = tiny_model()
    blocks = np.random.default_rng(4).integers(0, 50, size=(3, 5))

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(CacheError, match=r"No space left on device while writing .*trunk_states"):
        cached_trunk_states(model, blocks, tmp_path)
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_real_failed_write_is_an_error_not_a_crash(tmp_path):
    # A file-size limit makes the kernel fail the write of hidden.npy (EFBIG; Python ignores
    # SIGXFSZ). The states used to be written through a memory map, where a failed write
    # is a SIGBUS that kills the process with no message.
    model = tiny_model()
    blocks = np.random.default_rng(5).integers(0, 50, size=(8, 16))  # 8 kB of states
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(CacheError) as error:
            cached_trunk_states(model, blocks, tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("cannot write ") and "hidden.npy" in str(error.value)
    assert leftovers(tmp_path) == []


DAMAGES = ["truncate hidden", "truncate tokens", "flip tokens", "drop meta", "garble meta"]


@FEW
@given(
    n=st.integers(1, 4),
    length=st.integers(1, 6),
    width=st.integers(1, 5),
    damage=st.sampled_from(DAMAGES),
    cut=st.floats(0.0, 0.999),
)
def test_a_damaged_entry_is_rebuilt_with_a_warning(n, length, width, damage, cut):
    blocks = np.random.default_rng(n + 7 * length).integers(0, 20, size=(n, length))
    with tempfile.TemporaryDirectory() as root:
        first = cached_trunk_states(FakeTrunk(width), blocks, root)
        expected = np.array(first.hidden)
        path = first.path
        del first
        name = {"hidden": "hidden.npy", "tokens": "tokens.npy", "meta": "meta.json"}[
            damage.split()[1]
        ]
        target = path / name
        data = target.read_bytes()
        if damage.startswith("truncate"):
            target.write_bytes(data[: int(cut * len(data))])
        elif damage == "flip tokens":
            at = len(data) - 1 - int(cut * n * length * 8)  # a byte of the ids
            target.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
        elif damage == "drop meta":
            target.unlink()
        else:
            target.write_text(data.decode().replace('"blocks"', '"blocks_"'))
        trunk = FakeTrunk(width)
        with pytest.warns(UserWarning, match=f"entry {path} is damaged .*{name}"):
            again = cached_trunk_states(trunk, blocks, root)
        assert trunk.calls >= 1 and again.path == path
        np.testing.assert_array_equal(again.hidden, expected)
        assert sorted(p.name for p in Path(root, "trunk_states").iterdir()) == [path.name]


def test_an_entry_of_an_older_version_is_kept_when_its_sizes_are_right(tmp_path):
    blocks = np.random.default_rng(6).integers(0, 20, size=(3, 4))
    first = cached_trunk_states(FakeTrunk(3), blocks, tmp_path)
    legacy = {"blocks": 3, "block_size": 4, "dtype": "float32"}
    (first.path / "meta.json").write_text(json.dumps(legacy))
    trunk = FakeTrunk(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = cached_trunk_states(trunk, blocks, tmp_path)
    assert trunk.calls == 0
    np.testing.assert_array_equal(again.hidden, first.hidden)
    with pytest.raises(CacheError, match="records no SHA-256"):
        verify_trunk_states(first.path)


def test_verify_reads_the_hidden_states_an_open_only_sizes(tmp_path):
    blocks = np.random.default_rng(8).integers(0, 20, size=(2, 3))
    path = cached_trunk_states(FakeTrunk(2), blocks, tmp_path).path
    hidden = path / "hidden.npy"
    data = bytearray(hidden.read_bytes())
    data[-1] ^= 0x40
    hidden.write_bytes(bytes(data))
    trunk = FakeTrunk(2)
    cached_trunk_states(trunk, blocks, tmp_path)  # same size: trusted on open, by design
    assert trunk.calls == 0
    with pytest.raises(CacheError, match=f"{hidden} fails its SHA-256"):
        verify_trunk_states(path)


def make_temporary(path: Path, folder: bool, age_s: float = 0.0) -> Path:
    if folder:
        path.mkdir(parents=True)
        (path / "hidden.npy").write_bytes(b"x" * 10)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    if age_s:
        then = time.time() - age_s
        for p in [path, *(path.iterdir() if folder else [])]:
            os.utime(p, (then, then))
    return path


def test_the_sweep_removes_dead_writers_temporaries_only(tmp_path):
    here, dead, old = host_tag(), dead_pid(), 7 * 3600
    states, distill = tmp_path / "trunk_states", tmp_path / "self_distill"
    key = "0123456789abcdef01234567"
    stale = [
        make_temporary(states / f".{key}.tmp{dead}@{here}.abcd1234", folder=True),
        make_temporary(states / f".{key}.tmp{dead}@elsewhere-1.ab12", folder=True, age_s=old),
        make_temporary(states / f".{key}.k3j_x9q2", folder=True, age_s=old),  # older version
        make_temporary(distill / f".{key}.tmp{dead}@{here}.0000beef", folder=True),
        make_temporary(
            distill / f"{key}.partial-b4" / f".chunk-000001.npz.tmp{dead}@{here}.12ab34cd",
            folder=False,
        ),
        make_temporary(distill / key / f".ids.npy.tmp{dead}", folder=False, age_s=old),
    ]
    kept = [
        make_temporary(states / f".{key}.tmp{os.getpid()}@{here}.cafe0000", folder=True),
        make_temporary(states / f".{key}.tmp{dead}@elsewhere-1.ab13", folder=True),
        make_temporary(states / f".{key}.k3j_x9q3", folder=True),
        make_temporary(states / key, folder=True, age_s=old),  # a finished entry
        make_temporary(distill / f"{key}.partial-b4" / "chunk-000000.npz", folder=False),
        make_temporary(distill / key / f".bounds.npy.tmp{dead}", folder=False),
        make_temporary(tmp_path / "tokens" / f".x.tmp{dead}@{here}.abcd", folder=False),
    ]
    removed = sweep_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert sweep_stale_temporaries(tmp_path) == []


def test_caching_sweeps_first(tmp_path):
    leftover = make_temporary(
        tmp_path / "trunk_states" / f".abc.tmp{dead_pid()}@{host_tag()}.abcd1234", folder=True
    )
    cached_trunk_states(FakeTrunk(2), np.zeros((1, 2), dtype=np.int64), tmp_path)
    assert not leftover.exists()
