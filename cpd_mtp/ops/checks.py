"""Argument checks of the mixture loss, run once at the public entry of ``cpd_mtp.ops``.

Bad input raises ``ValueError`` naming the argument, never a silent wrong answer. Shapes and
dtypes are checked on the host for free. The label *values* live on the device: on CPU they
are checked exactly and raise ``ValueError``; on CUDA the check is queued with
``torch._assert_async`` so that it costs no GPU→CPU synchronisation, and a bad label fails
the next synchronising call with a ``RuntimeError`` carrying the same message (the CUDA
context is then unusable, as after any device-side assert; an unchecked out-of-range label
would instead read out of bounds in the kernels).
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_label_dtype(targets: torch.Tensor, name: str) -> None:
    """Raise unless ``targets`` is an integer tensor (bool, float and complex are refused)."""
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {targets.dtype}")


def check_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int, name: str) -> None:
    """Raise unless every entry of ``targets`` is in [0, vocab_size) or equals ``ignore_index``.

    Args:
        targets: integer tensor of any shape.
        vocab_size: V; valid ids are 0..V-1.
        ignore_index: the id of a missing target, always accepted.
        name: the argument's name, for the message.

    On CUDA tensors the range check is asynchronous (no host sync): see the module docstring.
    """
    check_label_dtype(targets, name)
    if targets.numel() == 0:
        return
    # Compare in int64: a bound such as vocab_size = 300 or ignore_index = -100 would wrap
    # around in a narrow label dtype (uint8, int8, int16) and flag valid labels.
    wide = targets.to(torch.int64)
    bad = (wide != ignore_index) & ((wide < 0) | (wide >= vocab_size))
    if targets.device.type == "cuda":
        message = (
            f"{name} holds a value outside [0, {vocab_size}) and not ignore_index={ignore_index}"
        )
        torch._assert_async(~bad.any(), message)
        return
    if bool(bad.any()):
        value = int(wide[bad][0])
        raise ValueError(
            f"{name} holds {value}, outside [0, {vocab_size}) and not ignore_index={ignore_index}"
        )


def autocast_operands(u: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u and W_U cast to the autocast dtype when autocast is enabled for u's device.

    This is the cast ``F.linear`` gets under autocast; like autocast, float64 is left alone.
    Autograd casts the gradients back to each input's own dtype.

    Args:
        u: expert states, (N, n, r, d).
        weight: shared unembedding W_U, (V, d).

    Returns:
        (u, weight), each in the autocast dtype, or unchanged when autocast is off.
    """
    device_type = u.device.type
    if not torch.is_autocast_enabled(device_type):
        return u, weight
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(u), cast(weight)


def check_mixture_args(
    u: torch.Tensor,
    weight: torch.Tensor,
    log_w: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
) -> None:
    """Shapes, dtypes and label range of ``mixture_nll``'s arguments (after the autocast cast).

    Args:
        u: (N, n, r, d) expert states.
        weight: (V, d) shared unembedding, same dtype and device as ``u``.
        log_w: (N, r) log mixture weights, or None for ``row_logprobs``.
        targets: (N, n) integer ids or ``ignore_index``.
        ignore_index: the id of a missing target.
    """
    if not u.dtype.is_floating_point:
        raise ValueError(f"u must be a floating tensor, got dtype {u.dtype}")
    if u.dim() != 4:
        raise ValueError(f"u must have shape [N, n, r, d], got {tuple(u.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, d], got {tuple(weight.shape)}")
    if weight.shape[1] != u.shape[3]:
        raise ValueError(
            f"weight has d={weight.shape[1]} but u has d={u.shape[3]} "
            f"(u {tuple(u.shape)}, weight {tuple(weight.shape)})"
        )
    if weight.dtype != u.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from u dtype {u.dtype}")
    if weight.device != u.device:
        raise ValueError(f"weight is on {weight.device} but u is on {u.device}")
    n_tokens, n_future, rank, _ = u.shape
    if tuple(targets.shape) != (n_tokens, n_future):
        raise ValueError(
            f"targets must have shape [N, n] = {(n_tokens, n_future)}, got {tuple(targets.shape)}"
        )
    if log_w is not None:
        if not log_w.dtype.is_floating_point:
            raise ValueError(f"log_w must be a floating tensor, got dtype {log_w.dtype}")
        if tuple(log_w.shape) != (n_tokens, rank):
            raise ValueError(
                f"log_w must have shape [N, r] = {(n_tokens, rank)}, got {tuple(log_w.shape)}"
            )
    check_targets(targets, weight.shape[0], ignore_index, "targets")
