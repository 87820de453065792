"""Coupled sampling: one Gumbel vector per (row, output position), a function of one seed.

Sampling from a distribution p is the Gumbel-max trick: with G_v i.i.d. standard Gumbel,
argmax_v (log p(v) + G_v) is distributed as p. The speculative decoder draws the noise G once
per row and per *position of the output* (new token number k of row i), from a seed that is a
function of the call's random source alone, and uses it twice:

- the verifier's token at position k is argmax(log p_k + G_{i,k}), where p_k is the (warped)
  model distribution after the tokens before k. G_{i,k} is independent of everything that
  decided those tokens, so the token is distributed exactly as a draw from p_k: the output is
  distributed exactly as sampling the model autoregressively.
- a drafter proposes, for position k, the tokens of highest log q(v) + G_{i,k} under its own
  (warped) q: its first candidate is a draw from q *coupled* with the verifier's draw, equal to
  it with high probability when q is close to p (Daliri, Musco and Suresh, 2024: "Coupling
  without communication and drafter-invariant speculative decoding").

Verification is then the greedy walk of the tree over the perturbed scores log p + G. The
output is a function of the seed and the inputs only: the same for any draft tree, any
drafter, any timing, as autoregressive sampling with the same noise would give.
"""

from __future__ import annotations

import torch

__all__ = ["PositionNoise", "hash_uniform"]

# Constants of murmur3's 64-bit finaliser, and odd multipliers that spread the key's parts, as
# signed int64 (torch has no uint64 arithmetic; signed products wrap the same way).
_M1 = 0xFF51AFD7ED558CCD - (1 << 64)
_M2 = 0xC4CEB9FE1A85EC53 - (1 << 64)
_ROW = 0x9E3779B97F4A7C15 - (1 << 64)
_POSITION = 0x632BE59BD9B4E019
_TOKEN = 0x85EBCA77C2B2AE63 - (1 << 64)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """murmur3's fmix64: every output bit depends on every input bit."""
    x = x ^ _shift_right(x, 33)
    x = x * _M1
    x = x ^ _shift_right(x, 33)
    x = x * _M2
    return x ^ _shift_right(x, 33)


def hash_uniform(seed: int, rows: torch.Tensor, positions: torch.Tensor, size: int) -> torch.Tensor:
    """Uniform numbers in (0, 1), a pure function of (seed, row, position, index).

    Args:
        seed: any int.
        rows: (b,) int64 row ids.
        positions: (b, k) int64 output positions.
        size: numbers per (row, position).

    Returns:
        (b, k, size) float64, each the hash of its key's 53 high bits, centred in its cell.
    """
    seed_mix = _mix(torch.tensor(seed & ((1 << 63) - 1), dtype=torch.int64))
    key = _mix(seed_mix + rows.to(torch.int64)[:, None] * _ROW)  # (b, 1)
    key = _mix(key ^ (positions.to(torch.int64) * _POSITION))  # (b, k)
    index = torch.arange(size, dtype=torch.int64, device=key.device)
    bits = _mix(key[..., None] + index * _TOKEN)  # (b, k, size)
    return (_shift_right(bits, 11).to(torch.float64) + 0.5) * 2.0**-53


class PositionNoise:
    """Standard Gumbel noise G_{i,k} of shape (V,) per batch row i and output position k.

    Computed, not stored: each number is a hash of (seed, row, position, token id)
    (:func:`hash_uniform`) turned into a Gumbel draw, -log(-log u). So any set of cells costs
    a few integer operations per number, on any device, and the same seed gives the same noise
    everywhere.

    Args:
        seed: the call's seed (:meth:`from_generator` draws it).
        vocab_size: V.
        device: where the noise is computed.
    """

    def __init__(self, seed: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.seed = int(seed)
        self.vocab_size = vocab_size
        self.device = torch.device(device)

    @classmethod
    def from_generator(
        cls,
        generator: torch.Generator | None,
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> PositionNoise:
        """The noise of one call: its seed is one draw from ``generator`` (None: torch's global
        random state, so ``torch.manual_seed`` fixes it, as it fixes Hugging Face sampling)."""
        source = generator.device if generator is not None else "cpu"
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=source)
        return cls(int(seed), vocab_size, device)

    def __call__(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Noise at (b,) batch ``rows`` and (b, k) output ``positions``: (b, k, V) float32."""
        uniform = hash_uniform(
            self.seed, rows.to(self.device), positions.to(self.device), self.vocab_size
        )
        return (-torch.log(-torch.log(uniform))).to(torch.float32)

    def vector(self, row: int, position: int) -> torch.Tensor:
        """(V,) float32 noise of one ``row`` at one output ``position``."""
        return self(torch.tensor([row]), torch.tensor([[position]]))[0, 0]
