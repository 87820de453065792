"""The coupled noise (``cpd_mtp.decoding.noise``): standard Gumbel, a function of (seed, row,
position) alone, and a Gumbel-max draw from it is distributed as the distribution perturbed."""

from __future__ import annotations

import math

import torch
from decoding_builders import chi_square_p_value

from cpd_mtp.decoding.noise import PositionNoise, hash_uniform


def test_the_noise_is_a_function_of_seed_row_and_position():
    a, b = PositionNoise(11, 8), PositionNoise(11, 8)
    rows, positions = torch.tensor([0, 3]), torch.tensor([[0, 5], [2, 2]])
    first = a(rows, positions)
    assert first.shape == (2, 2, 8)
    assert torch.equal(first, b(rows, positions))  # another object, the same seed
    assert torch.equal(first[1, 0], first[1, 1])  # the same cell twice
    assert torch.equal(first[0, 1], a.vector(0, 5))
    assert not torch.equal(first[0, 0], first[0, 1])  # positions differ
    assert not torch.equal(a.vector(0, 0), a.vector(1, 0))  # rows differ
    assert not torch.equal(a.vector(0, 0), PositionNoise(12, 8).vector(0, 0))  # seeds differ


def test_from_generator_draws_the_seed_from_the_random_source():
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    assert PositionNoise.from_generator(g(), 5).seed == PositionNoise.from_generator(g(), 5).seed
    torch.manual_seed(2)
    first = PositionNoise.from_generator(None, 5).seed
    torch.manual_seed(2)
    assert PositionNoise.from_generator(None, 5).seed == first


def test_the_hash_is_uniform_and_its_bits_independent():
    """100,000 numbers: the mean and variance of U(0, 1), deciles within 5 sigma, and
    neighbouring token ids uncorrelated."""
    u = hash_uniform(9, torch.arange(100), torch.arange(10).expand(100, -1), 100).flatten()
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert float((counts - 10_000).abs().max()) < 5 * (100_000 * 0.1 * 0.9) ** 0.5
    pairs = u.view(-1, 100)
    correlation = torch.corrcoef(torch.stack([pairs[:, :-1].flatten(), pairs[:, 1:].flatten()]))
    assert abs(float(correlation[0, 1])) < 0.01


def test_gumbel_max_of_the_noise_draws_from_the_distribution():
    """argmax(log p + G) over 20,000 (row, position) cells follows p (chi-square), and the
    noise has the standard Gumbel's mean (Euler's constant) and variance (pi^2 / 6)."""
    p = torch.tensor([0.05, 0.15, 0.3, 0.5])
    noise = PositionNoise(1, 4)
    cells = noise(torch.arange(200), torch.arange(100).expand(200, -1)).reshape(-1, 4)
    draws = (p.log() + cells).argmax(-1)
    counts = torch.bincount(draws, minlength=4)
    observed = {(a,): int(c) for a, c in enumerate(counts)}
    assert chi_square_p_value(observed, {(a,): float(p[a]) for a in range(4)}, len(draws)) > 1e-3
    values = cells.flatten().double()
    assert abs(float(values.mean()) - 0.5772) < 0.02
    assert abs(float(values.var()) - math.pi**2 / 6) < 0.05
