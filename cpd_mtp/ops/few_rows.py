"""Linear maps of a few rows, computed with the CPU kernel that reads the weights fastest.

A decoding step multiplies a few rows (one token, or the nodes of a draft tree) with every
weight matrix of the model, and on a CPU it is bound by reading the weights. How fast they are
read depends on the kernel far more than the arithmetic explains. Measured on the 2-core AMD
EPYC of our benchmarks (torch 2.13), the 120 MLP and attention matrices of SmolLM2-135M
(318 MB in fp32, out of cache), milliseconds by row count:

| rows | 1 | 2 | 4 | 8 | 16 | 32 |
|---|---|---|---|---|---|---|
| ``F.linear`` (MKL, ``x @ Wᵀ``) | 24.6 | 34.7 | 32.1 | 39.7 | 51.7 | 64.1 |
| ``(W @ xᵀ)ᵀ`` (MKL) | 24.5 | 16.1 | 19.3 | 38.0 | 33.9 | 53.4 |
| oneDNN, weight packed once | 13.9 | 16.8 | 11.6 | 14.7 | 19.5 | 29.5 |

One row through MKL runs its matrix-vector kernel, which reads at about 13 GB/s; oneDNN's
linear with a weight reordered once into its blocked layout reads near bandwidth at every row
count, so a 16-token forward costs about what a 1-token one does through ``F.linear``.

``few_row_linear`` uses that kernel for up to ``FEW_ROWS`` rows on a CPU without autograd, when
the weight is reused (an ``nn.Parameter``, or a tensor marked with ``mark_reused``): the packed
copy is made on first use and kept on the tensor (it costs one more copy of the weight's
memory, and is made again if the weight changes). Otherwise, and where oneDNN is missing, it
computes ``(W @ xᵀ)ᵀ``. The values are those of ``F.linear`` up to float rounding (another
summation order, never another result).
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["FEW_ROWS", "few_row_linear", "few_row_linears", "mark_reused", "padded_rows"]

# Up to this many rows the transposed layout wins on the CPUs measured; beyond it the BLAS's
# own blocking does as well, and prompts keep the plain kernel.
FEW_ROWS = 64
# Row counts MKL's (W @ xᵀ)ᵀ handles well; a count between two of them (above 8) is padded up.
_GOOD_ROWS = (16, 24, 32, 48, 64)
_PACKED_DTYPES = (torch.float32, torch.bfloat16)
_ONEDNN = [torch.backends.mkldnn.is_available()]  # switched off after a first failure


def mark_reused(weight: torch.Tensor) -> torch.Tensor:
    """Let ``few_row_linear`` keep a packed copy of a plain tensor used for many products."""
    weight._cpd_mtp_reused = True
    return weight


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of ``weight``, made once per version of its data."""
    key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
    cached = getattr(weight, "_cpd_mtp_packed", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (RuntimeError, AttributeError):
        _ONEDNN[0] = False
        return None
    weight._cpd_mtp_packed = (key, packed)
    return packed


def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    if not _ONEDNN[0] or x.dtype not in _PACKED_DTYPES or weight.dtype != x.dtype:
        return None
    if not (isinstance(weight, nn.Parameter) or getattr(weight, "_cpd_mtp_reused", False)):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    packed = _packed(weight)
    if packed is None:
        return None
    bias = None if bias is None else bias.detach().to(x.dtype)
    try:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    except RuntimeError:
        _ONEDNN[0] = False
        return None


def padded_rows(rows: int) -> int:
    """The row count a product of ``rows`` rows is computed with (``rows`` <= ``FEW_ROWS``)."""
    if rows == 1:
        return 2  # the two-row kernel reads the weight about 2.4x faster than the one-row one
    if rows <= 8:
        return rows
    return _GOOD_ROWS[bisect.bisect_left(_GOOD_ROWS, rows)]


def few_row_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for at most ``FEW_ROWS`` CPU rows through oneDNN with a
    packed weight (module docstring), or as ``(weight @ xᵀ)ᵀ`` over ``padded_rows`` rows.

    Args:
        x: (..., d_in).
        weight: (d_out, d_in).
        bias: (d_out,) or None.

    Returns:
        (..., d_out).
    """
    rows = x.reshape(-1, x.shape[-1])  # (N, d_in)
    count = rows.shape[0]
    if x.device.type != "cpu" or not 0 < count <= FEW_ROWS:
        return nn.functional.linear(x, weight, bias)
    fast = _onednn_linear(rows, weight, bias)
    if fast is not None:
        return fast.reshape(*x.shape[:-1], weight.shape[0])
    padded = padded_rows(count)
    if padded > count:
        rows = torch.cat([rows, rows.new_zeros(padded - count, rows.shape[1])])
    out = (weight @ rows.T).T[:count]  # (N, d_out)
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
    off the CPU. Around Hugging Face's own ``generate`` it is a speedup that needs no training
    (the same tokens, up to float rounding at near-ties): the benchmarks' fair baseline.
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
