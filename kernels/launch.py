"""Launching a tiled kernel with the fixed config of its dtype, or autotuned when opted in."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton

from cpd_mtp.kernels.config import (
    BlockConfig,
    autotune_requested,
    autotune_space,
    interpreter_active,
)

# Autotuned wrappers, built lazily: (kernel, dtype) -> triton Autotuner.
_AUTOTUNED: dict[tuple[int, torch.dtype], Any] = {}
_WARNED = []


def _autotuned(kernel: Any, dtype: torch.dtype, reset_to_zero: Sequence[str]) -> Any:
    key = (id(kernel), dtype)
    if key not in _AUTOTUNED:
        configs = [
            triton.Config(
                {"BLOCK_M": c.block_m, "BLOCK_V": c.block_v, "BLOCK_D": c.block_d},
                num_warps=c.num_warps,
                num_stages=c.num_stages,
            )
            for c in autotune_space(dtype)
        ]
        _AUTOTUNED[key] = triton.autotune(
            configs=configs, key=["V", "D"], reset_to_zero=list(reset_to_zero) or None
        )(kernel)
    return _AUTOTUNED[key]


def launch_tiled(
    kernel: Any,
    grid: Callable[[dict[str, int]], tuple[int, ...]],
    kwargs: dict[str, Any],
    block: BlockConfig,
    dtype: torch.dtype,
    reset_to_zero: Sequence[str] = (),
) -> None:
    """Launch ``kernel`` whose tile sizes are the constexprs BLOCK_M, BLOCK_V and BLOCK_D.

    Args:
        kernel: a ``triton.jit`` function with ``V`` and ``D`` arguments (the autotune key).
        grid: maps the tile sizes ``{"BLOCK_M", "BLOCK_V", "BLOCK_D"}`` to the launch grid.
        kwargs: every other kernel argument, by name.
        block: the fixed config, used unless ``CPD_MTP_AUTOTUNE=1``.
        dtype: the input dtype, which selects the autotune search space.
        reset_to_zero: names of accumulator arguments the autotuner must zero between trials.
    """
    if autotune_requested():
        if interpreter_active():
            if not _WARNED:
                warnings.warn(
                    "CPD_MTP_AUTOTUNE=1 is ignored under TRITON_INTERPRET=1 (the interpreter "
                    "cannot autotune); using the fixed config",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _WARNED.append(True)
        else:
            _autotuned(kernel, dtype, reset_to_zero)[grid](**kwargs)
            return
    meta = {"BLOCK_M": block.block_m, "BLOCK_V": block.block_v, "BLOCK_D": block.block_d}
    kernel[grid(meta)](**kwargs, **meta, num_warps=block.num_warps, num_stages=block.num_stages)
