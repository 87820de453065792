"""Linear maps of a few rows, computed in the layout a CPU BLAS handles well.

``F.linear(x, W)`` is ``x @ Wᵀ``. For an x of a few rows (the 2..8 tokens of a verification
forward, the n·r expert rows at the anchor) the CPU BLAS this project ships with (MKL) runs that
product far below memory bandwidth: on the 2-core AMD EPYC of our benchmarks a 4-row product
with SmolLM2's 49152 x 576 lm_head took about 2.5x as long as a 1-row one. The same numbers
computed as ``(W @ xᵀ)ᵀ`` (the tall operand first) read W once at bandwidth, so the 4-token
forward then costs about what a 1-token step does. The values are equal up to float rounding
(another summation order), not bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["FEW_ROWS", "few_row_linear", "few_row_linears"]

# Up to this many rows the transposed layout wins on the CPUs measured; beyond it the BLAS's
# own blocking does as well, and prompts keep the plain kernel.
FEW_ROWS = 16


def few_row_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, as ``(weight @ xᵀ)ᵀ`` for at most ``FEW_ROWS`` CPU rows.

    Args:
        x: (..., d_in).
        weight: (d_out, d_in).
        bias: (d_out,) or None.

    Returns:
        (..., d_out).
    """
    rows = x.reshape(-1, x.shape[-1])  # (N, d_in)
    if x.device.type != "cpu" or not 0 < rows.shape[0] <= FEW_ROWS:
        return nn.functional.linear(x, weight, bias)
    out = (weight @ rows.T).T  # (N, d_out)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return few_row_linear(x, module.weight, module.bias)


@contextlib.contextmanager
def few_row_linears(model: nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.Linear`` of ``model`` computes with ``few_row_linear``.

    The modules' own ``forward`` is shadowed on each instance (not on the class, so other
    models are untouched) and restored on exit, also when the block raises. A no-op for a model
    off the CPU.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and "forward" not in vars(m)]
    if not linears or linears[0].weight.device.type != "cpu":
        yield
        return
    for module in linears:
        module.forward = _forward.__get__(module)
    try:
        yield
    finally:
        for module in linears:
            del module.forward
