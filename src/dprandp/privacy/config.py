"""The one configuration object of a DP-SGD phase.

The sampler, the trainer step and the accountant all read the same :class:`DPConfig`, so the
sample rate the accountant is told about is the sample rate the sampler uses, and the batch size
the noisy sum is divided by is the expected batch size ``sample_rate * num_samples`` (never the
realised size of a Poisson batch, which would leak it, and never ``1 / len(loader)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from dprandp.accounting import DPPhase
from dprandp.errors import require


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True, kw_only=True)
class DPConfig:
    """Privacy-relevant hyper-parameters of one DP-SGD phase.

    ``sample_rate`` (q): each sample joins a logical batch independently with probability q.
    ``noise_multiplier`` (sigma): Gaussian noise of std ``sigma * max_grad_norm`` per coordinate
    is added once per logical step to the sum of clipped per-sample gradients.
    ``max_grad_norm`` (C): per-sample gradients (averaged over the ``augmult`` views first) are
    clipped to L2 norm C.
    ``batch_size`` (B): the *expected* logical batch ``q * N``; the noisy sum is divided by it.
    ``augmult`` (K): augmented views per sample. ``physical_batch_size``: how many samples (each
    with its K views) go through the model at once; it changes memory use, never the update.
    """

    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    batch_size: int
    augmult: int = 1
    physical_batch_size: int = 64

    def __post_init__(self) -> None:
        require(
            _is_real(self.sample_rate) and 0.0 < self.sample_rate <= 1.0,
            f"sample_rate must be in (0, 1], got {self.sample_rate!r}",
        )
        require(
            _is_real(self.noise_multiplier) and self.noise_multiplier >= 0.0,
            f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}",
        )
        require(
            _is_real(self.max_grad_norm) and self.max_grad_norm > 0.0,
            f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}",
        )
        require(_is_int(self.batch_size) and self.batch_size >= 1, f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        require(_is_int(self.augmult) and self.augmult >= 1, f"augmult must be an integer >= 1, got {self.augmult!r}")
        require(
            _is_int(self.physical_batch_size) and self.physical_batch_size >= 1,
            f"physical_batch_size must be an integer >= 1, got {self.physical_batch_size!r}",
        )

    @classmethod
    def for_dataset(cls, *, num_samples: int, batch_size: int, **kwargs) -> "DPConfig":
        """Config with ``sample_rate = batch_size / num_samples`` exactly (the paper's q = B / N)."""
        require(_is_int(num_samples) and num_samples >= 1, f"num_samples must be an integer >= 1, got {num_samples!r}")
        require(
            _is_int(batch_size) and 1 <= batch_size <= num_samples,
            f"batch_size must be an integer in [1, num_samples={num_samples}], got {batch_size!r}",
        )
        return cls(sample_rate=batch_size / num_samples, batch_size=batch_size, **kwargs)

    def check_dataset(self, num_samples: int, *, rel_tol: float = 1e-6) -> None:
        """Refuse a dataset size for which ``sample_rate * num_samples`` is not ``batch_size``.

        Dividing by a B that is not the expected batch size silently rescales the learning rate
        and, worse, suggests the sample rate was derived from something else than the config.
        """
        expected = self.sample_rate * num_samples
        require(
            math.isclose(expected, self.batch_size, rel_tol=rel_tol, abs_tol=0.5),
            f"sample_rate * num_samples = {self.sample_rate} * {num_samples} = {expected:.2f} "
            f"differs from batch_size = {self.batch_size}",
        )

    @property
    def noise_std(self) -> float:
        """Std of the noise added to the *sum* of clipped gradients: sigma * C."""
        return self.noise_multiplier * self.max_grad_norm

    def phase(self, steps: int) -> DPPhase:
        """The accountant's view of ``steps`` steps under this config."""
        return DPPhase(sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=steps)

    def with_noise(self, noise_multiplier: float) -> "DPConfig":
        return replace(self, noise_multiplier=noise_multiplier)
