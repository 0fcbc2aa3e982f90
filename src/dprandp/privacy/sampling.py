"""Poisson sampling of logical batches: the sampling the accountant assumes.

Every sample joins a batch independently with probability ``sample_rate``; batch sizes vary
(Binomial(N, q)) and may be zero. Shuffled fixed-size batches would be a different mechanism
with a weaker guarantee than the Poisson accounting claims, so there is no such option here.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dprandp.errors import require


class PoissonSampler:
    """Draws index tensors of Poisson-sampled logical batches from its own generator.

    ``sample()`` returns the sorted indices (int64) of one batch. Iterating yields ``steps``
    batches (forever if ``steps`` is None). For data-parallel training give each rank its own
    shard (``indices=`` its global indices, or :meth:`for_shard`) and a generator seeded
    differently per rank: sampling every shard at the same rate is Poisson sampling of the union.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        generator: torch.Generator,
        steps: int | None = None,
        indices: torch.Tensor | None = None,
    ) -> None:
        require(
            isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 0,
            f"num_samples must be an integer >= 0, got {num_samples!r}",
        )
        require(
            isinstance(sample_rate, (int, float)) and 0.0 <= float(sample_rate) <= 1.0,
            f"sample_rate must be in [0, 1], got {sample_rate!r}",
        )
        require(isinstance(generator, torch.Generator), "PoissonSampler needs an explicit torch.Generator")
        require(steps is None or (isinstance(steps, int) and steps >= 0), f"steps must be an integer >= 0, got {steps!r}")
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.long).flatten()
            require(indices.numel() == num_samples, f"indices has {indices.numel()} entries, num_samples is {num_samples}")
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.generator = generator
        self.steps = steps
        self.indices = indices

    @classmethod
    def for_shard(
        cls, *, num_samples: int, rank: int, world_size: int, sample_rate: float, generator: torch.Generator, steps: int | None = None
    ) -> "PoissonSampler":
        """Sampler over the global indices ``rank, rank + world_size, ...`` of a dataset of ``num_samples``."""
        require(world_size >= 1 and 0 <= rank < world_size, f"need 0 <= rank < world_size, got {rank}, {world_size}")
        shard = torch.arange(rank, num_samples, world_size, dtype=torch.long)
        return cls(num_samples=shard.numel(), sample_rate=sample_rate, generator=generator, steps=steps, indices=shard)

    def sample(self) -> torch.Tensor:
        """One logical batch: each index kept independently with probability ``sample_rate``."""
        device = self.generator.device
        # float64: a float32 uniform has 2^-24 resolution, which would include each sample with
        # probability ceil(q * 2^24) / 2^24, a hair above the q the accountant is given.
        keep = torch.rand(self.num_samples, generator=self.generator, device=device, dtype=torch.float64) < self.sample_rate
        picked = torch.nonzero(keep, as_tuple=False).flatten().cpu()
        return picked if self.indices is None else self.indices[picked]

    def __iter__(self) -> Iterator[torch.Tensor]:
        step = 0
        while self.steps is None or step < self.steps:
            yield self.sample()
            step += 1

    def __len__(self) -> int:
        require(self.steps is not None, "an unbounded PoissonSampler (steps=None) has no length")
        return self.steps
