"""Launch configurations of the CP-MTP kernels: one fixed config per dtype, autotuning opt-in.

The fixed configs are used unless ``CPD_MTP_AUTOTUNE=1`` is set, in which case the
vocabulary kernels are wrapped in ``triton.autotune`` over a small search space keyed on
(V, D). The Triton interpreter (``TRITON_INTERPRET=1``) cannot autotune over more than one
config, so there the request is ignored with a warning and a small interpreter config is used.

Environment variables read at call time:

- ``CPD_MTP_AUTOTUNE=1``: autotune the log-sum-exp forward and backward kernels (GPU only).
- ``CPD_MTP_GRAD_FILTER=1``: turn gradient filtering on (it is off by default).
- ``CPD_MTP_GRAD_FILTER_EPS=<float>``: the filter's mass budget, overriding the dtype default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Budget of the fp32 dU scratch in backward; rows are processed in launches that fit it.
DU_SCRATCH_BYTES = 256 * 2**20

# Default mass budgets of gradient filtering: the probability that a row's skipped entries may
# hold together. A tile is skipped when every |softmax − onehot| in it is below eps / V, so the
# V entries of a row skip less than eps in all, and the dropped part of that row's gradient is
# below eps·|c_k|·max_v |W_U[v]|. 2^-12 is below what a bf16 gradient resolves relative to its
# row's scale (8 mantissa bits); fp32 inputs get a budget at their own rounding.
FILTER_EPS = {
    torch.bfloat16: 2.0**-12,
    torch.float16: 2.0**-12,
    torch.float32: 2.0**-24,
}

SUPPORTED_DTYPES = tuple(FILTER_EPS)


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch options of one kernel.

    ``block_m`` rows of u, ``block_v`` vocabulary entries and ``block_d`` hidden features
    per tile; ``num_warps`` / ``num_stages`` are passed to the launch on GPU.
    """

    block_m: int
    block_v: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class KernelConfigs:
    """The configs of the vocabulary forward, target dot and backward kernels."""

    forward: BlockConfig
    target_dot: BlockConfig
    backward: BlockConfig


# One fixed config per dtype on GPU (chosen from the shape of the work: 16-bit inputs use
# tensor-core sized tiles; fp32 halves them for register pressure). They are untuned: GPU
# numbers are pending, see docs/kernels.md.
_GPU_CONFIGS = {
    torch.bfloat16: KernelConfigs(
        forward=BlockConfig(128, 128, 64, num_warps=8, num_stages=3),
        target_dot=BlockConfig(64, 1, 128, num_warps=4, num_stages=1),
        backward=BlockConfig(128, 128, 64, num_warps=8, num_stages=2),
    ),
    torch.float32: KernelConfigs(
        forward=BlockConfig(64, 64, 32, num_warps=4, num_stages=3),
        target_dot=BlockConfig(64, 1, 128, num_warps=4, num_stages=1),
        backward=BlockConfig(64, 64, 32, num_warps=4, num_stages=2),
    ),
}
_GPU_CONFIGS[torch.float16] = _GPU_CONFIGS[torch.bfloat16]

# The interpreter runs programs one after another in numpy: small tiles keep the masked
# edges exercised by small test shapes (tl.dot needs every dimension >= 16).
_INTERPRETER_CONFIG = KernelConfigs(
    forward=BlockConfig(16, 32, 16, num_warps=1, num_stages=1),
    target_dot=BlockConfig(16, 1, 16, num_warps=1, num_stages=1),
    backward=BlockConfig(16, 32, 16, num_warps=1, num_stages=1),
)


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_requested() -> bool:
    """Whether ``CPD_MTP_AUTOTUNE=1`` asks for autotuning."""
    return os.environ.get("CPD_MTP_AUTOTUNE", "0") not in ("", "0")


def configs_for(dtype: torch.dtype) -> KernelConfigs:
    """The fixed configs for input ``dtype`` (the interpreter config under the interpreter)."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"the triton kernels take bfloat16, float16 or float32 inputs, got {dtype}; "
            "use impl='chunked' or impl='reference' for other dtypes"
        )
    if interpreter_active():
        return _INTERPRETER_CONFIG
    return _GPU_CONFIGS[dtype]


def autotune_space(dtype: torch.dtype) -> list[BlockConfig]:
    """The opt-in search space of the vocabulary kernels for ``dtype``."""
    if dtype == torch.float32:
        tiles = [(64, 64, 32), (32, 128, 32), (64, 128, 32), (128, 64, 32)]
    else:
        tiles = [(128, 128, 64), (64, 128, 64), (128, 256, 64), (128, 64, 64), (64, 256, 32)]
    return [
        BlockConfig(m, v, d, num_warps=w, num_stages=s)
        for (m, v, d) in tiles
        for (w, s) in ((4, 3), (8, 3), (8, 4))
    ]


def grad_filter_setting(
    dtype: torch.dtype, enabled: bool | None, eps: float | None
) -> tuple[bool, float]:
    """Resolve (enabled, eps) of gradient filtering from the arguments and the environment.

    ``eps`` is the mass budget of one row (the per-entry threshold is eps / V). An explicit
    argument wins over ``CPD_MTP_GRAD_FILTER`` / ``CPD_MTP_GRAD_FILTER_EPS``, which win over
    the defaults (off; ``FILTER_EPS[dtype]``).
    """
    if enabled is None:
        enabled = os.environ.get("CPD_MTP_GRAD_FILTER", "0") not in ("0", "false", "False", "")
    if eps is None:
        env_eps = os.environ.get("CPD_MTP_GRAD_FILTER_EPS")
        eps = float(env_eps) if env_eps else FILTER_EPS.get(dtype, 2.0**-24)
    if not eps >= 0:
        raise ValueError(f"the gradient-filter eps must be >= 0, got {eps}")
    return bool(enabled), float(eps)
