"""Poisson sampling: batch-size distribution, independence of indices, shards, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from dprandp.errors import InputError
from dprandp.privacy import PoissonSampler


def test_batch_sizes_are_binomial():
    n, q, steps = 2000, 0.05, 4000
    sampler = PoissonSampler(num_samples=n, sample_rate=q, generator=torch.Generator().manual_seed(0), steps=steps)
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    assert len(sizes) == steps == len(sampler)
    mean, var = n * q, n * q * (1 - q)
    # Standard error of the mean: sqrt(var / steps) ~ 0.15; of the variance: var * sqrt(2 / (steps - 1)) ~ 2.1.
    assert abs(float(sizes.mean()) - mean) < 5 * math.sqrt(var / steps)
    assert abs(float(sizes.var()) - var) < 5 * var * math.sqrt(2 / (steps - 1))


def test_each_index_included_with_probability_q_independently():
    n, q, steps = 50, 0.3, 4000
    sampler = PoissonSampler(num_samples=n, sample_rate=q, generator=torch.Generator().manual_seed(1))
    counts = torch.zeros(n)
    pair = 0
    for _ in range(steps):
        b = sampler.sample()
        assert b.dtype == torch.long and torch.equal(b, b.unique())  # sorted, no repeats
        counts[b] += 1
        pair += int((b == 0).any() and (b == 1).any())
    se = math.sqrt(q * (1 - q) / steps)
    assert ((counts / steps - q).abs() < 5 * se).all()
    assert abs(pair / steps - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / steps)


def test_inclusion_compares_a_float64_uniform_with_q():
    """A float32 uniform lives on a 2^-24 grid, so ``u < q`` keeps a sample with probability
    ceil(q * 2^24) / 2^24, up to 2x the q the accountant is told at tiny q (q = 2^-25 keeps every
    u = 0: a rate of 2^-24). The sampler compares a float64 uniform with q, draw for draw."""
    n, q = 4096, 0.3
    gen = torch.Generator().manual_seed(3)
    sampler = PoissonSampler(num_samples=n, sample_rate=q, generator=gen)
    for _ in range(3):
        twin = torch.Generator()
        twin.set_state(gen.get_state())
        expected = torch.nonzero(torch.rand(n, generator=twin, dtype=torch.float64) < q).flatten()
        assert torch.equal(sampler.sample(), expected)


def test_empty_batches_happen_and_rate_one():
    sampler = PoissonSampler(num_samples=3, sample_rate=0.2, generator=torch.Generator().manual_seed(2))
    sizes = [len(sampler.sample()) for _ in range(200)]
    assert 0 in sizes  # P(empty) = 0.512
    full = PoissonSampler(num_samples=5, sample_rate=1.0, generator=torch.Generator())
    assert full.sample().tolist() == [0, 1, 2, 3, 4]


def test_reproducible_from_generator_only():
    a = PoissonSampler(num_samples=100, sample_rate=0.1, generator=torch.Generator().manual_seed(7), steps=5)
    torch.manual_seed(123)  # the global RNG plays no part
    b = PoissonSampler(num_samples=100, sample_rate=0.1, generator=torch.Generator().manual_seed(7), steps=5)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]


def test_shards_cover_disjoint_global_indices():
    shards = [
        PoissonSampler.for_shard(num_samples=10, rank=r, world_size=3, sample_rate=1.0, generator=torch.Generator())
        for r in range(3)
    ]
    got = torch.cat([s.sample() for s in shards]).sort().values
    assert got.tolist() == list(range(10))
    assert shards[1].sample().tolist() == [1, 4, 7]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_samples=-1, sample_rate=0.1), "num_samples"),
        (dict(num_samples=10, sample_rate=1.5), "sample_rate"),
        (dict(num_samples=10, sample_rate=0.1, steps=-2), "steps"),
    ],
)
def test_bad_input(kw, match):
    with pytest.raises(InputError, match=match):
        PoissonSampler(generator=torch.Generator(), **kw)
    with pytest.raises(InputError, match="Generator"):
        PoissonSampler(num_samples=10, sample_rate=0.1, generator=None)
