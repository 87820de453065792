"""Cached trunk states: with a frozen trunk, compute its hidden states once per data set.

Heads-only training (the retrofit) runs the frozen trunk on the same blocks every epoch. This
module runs it once, stores the final hidden states (after the final norm: the input of the
lm_head) as a memory-mapped ``.npy`` beside the token ids, and hands out both for training.

A cache entry lives in ``<cache_root>/trunk_states/<key>/`` where the key is a hash of the
model (its config and every parameter's bytes), the tokens and the stored dtype, so a changed
model or data set never reads stale states. An entry is written into a temporary folder and
renamed into place when complete: a kill leaves no half-written entry that could be read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpd_mtp.utils.files import atomic_directory

STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's config and the bytes of every parameter and buffer."""
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        data = tensor.detach().cpu().contiguous()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def tokens_fingerprint(blocks: np.ndarray) -> str:
    """A hash of a (N, T) token array's shape and values."""
    array = np.ascontiguousarray(blocks, dtype=np.int64)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass
class TrunkStates:
    """Memory-mapped trunk states of N blocks: item i is (hidden (T, d) float32, ids (T,) int64)."""

    hidden: np.ndarray  # (N, T, d), memory-mapped
    tokens: np.ndarray  # (N, T) int64, memory-mapped
    path: Path

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.from_numpy(np.array(self.hidden[index], dtype=np.float32))
        return hidden, torch.from_numpy(np.array(self.tokens[index], dtype=np.int64))

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)


def _trunk_hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, d) of a HF causal LM (its base model's last_hidden_state)."""
    trunk = getattr(model, "base_model", model)
    out = trunk(input_ids=ids, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


@torch.no_grad()
def cached_trunk_states(
    model: Any,
    blocks: np.ndarray,
    cache_dir: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    store_dtype: str = "float32",
    progress: bool = False,
) -> TrunkStates:
    """The trunk's hidden states for every block, computed once and memory-mapped.

    Args:
        model: a HF causal LM (or its trunk); run in eval mode, without gradients.
        blocks: (N, T) token ids.
        cache_dir: the cache root; the entry goes to ``cache_dir/trunk_states/<key>/``.
        batch_size: blocks per trunk forward.
        store_dtype: ``float32`` (exact) or ``float16`` (half the disk).
        progress: show a progress bar while computing.

    Returns:
        ``TrunkStates`` with ``hidden`` (N, T, d) and ``tokens`` (N, T).
    """
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 1:
        raise ValueError(f"blocks must be a non-empty (N, T) array, got shape {blocks.shape}")
    key = hashlib.blake2b(
        f"{model_fingerprint(model)}|{tokens_fingerprint(blocks)}|{store_dtype}".encode(),
        digest_size=12,
    ).hexdigest()
    entry = Path(cache_dir) / "trunk_states" / key
    if not (entry / "meta.json").is_file():
        _build(model, blocks, entry, batch_size, STORE_DTYPES[store_dtype], progress)
    return TrunkStates(
        hidden=np.load(entry / "hidden.npy", mmap_mode="r"),
        tokens=np.load(entry / "tokens.npy", mmap_mode="r"),
        path=entry,
    )


def _build(model, blocks, entry: Path, batch_size: int, dtype, progress: bool) -> None:
    # Imported under another name: `progress` is the caller's on/off switch.
    from cpd_mtp.utils.progress import progress as progress_bar

    was_training = getattr(model, "training", False)
    model.eval()
    device = next(model.parameters()).device
    n_blocks, length = blocks.shape
    with atomic_directory(entry) as tmp:
        np.save(tmp / "tokens.npy", blocks.astype(np.int64))
        hidden_out = None
        bar = progress_bar(total=n_blocks, desc="trunk states", unit="block", disable=not progress)
        for start in range(0, n_blocks, batch_size):
            ids = torch.from_numpy(blocks[start : start + batch_size].astype(np.int64)).to(device)
            hidden = _trunk_hidden(model, ids).float().cpu().numpy()  # (b, T, d)
            if hidden_out is None:
                shape = (n_blocks, length, hidden.shape[-1])
                hidden_out = np.lib.format.open_memmap(
                    tmp / "hidden.npy", mode="w+", dtype=dtype, shape=shape
                )
            hidden_out[start : start + len(hidden)] = hidden
            bar.update(len(hidden))
        bar.close()
        hidden_out.flush()
        del hidden_out
        meta = {"blocks": n_blocks, "block_size": length, "dtype": np.dtype(dtype).name}
        (tmp / "meta.json").write_text(json.dumps(meta))
    model.train(was_training)
