"""The random number of training runs in private hyperparameter tuning.

Papernot & Steinke (ICLR 2022) bound the privacy of "run a DP algorithm K times, release only the
best run" when K is *random*, drawn from one of these families (``shape`` selects it):

* ``shape = inf``: Poisson with mean ``mean`` (K = 0 is possible: then nothing is released);
* ``shape = 1``: geometric, P(K = k) = gamma (1 - gamma)^(k - 1), k >= 1;
* ``shape = 0``: logarithmic, P(K = k) = (1 - gamma)^k / (k log(1 / gamma)), k >= 1;
* ``0 < shape < inf``: the negative binomial with that shape, truncated to k >= 1.

``gamma`` is found from ``mean`` (the families but Poisson are parameterised by it). The bound
holds only for K drawn from exactly the distribution the accountant is told about, so the sampler
here and :meth:`Repetitions.dp_event` share one parameterisation, and the tests check the
sampler's frequencies against scipy's distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from dp_accounting import dp_event

from dprandp.errors import require

#: Relative accuracy of gamma (the accountant is handed the mean of the gamma found, so it is exact).
GAMMA_RTOL = 1e-12


def _tnb_mean(gamma: float, shape: float) -> float:
    """Mean of the truncated negative binomial family (logarithmic at 0, geometric at 1)."""
    if shape == 1:
        return 1.0 / gamma
    if shape == 0:
        return (1.0 / gamma - 1.0) / math.log(1.0 / gamma)
    return shape * (1.0 / gamma - 1.0) / -math.expm1(shape * math.log(gamma))


#: Smallest probability that a negative binomial draw is >= 1 (the truncated sampler's acceptance rate).
MIN_ACCEPTANCE = 1e-3
#: Largest mean number of candidate runs a search may ask for (a larger one would not finish).
MAX_MEAN = 1000


@dataclass(frozen=True, kw_only=True)
class Repetitions:
    """The distribution of the number K of candidate runs (``mean`` >= 1; ``shape`` as above)."""

    mean: float
    shape: float = 0.0

    def __post_init__(self) -> None:
        require(isinstance(self.mean, (int, float)) and math.isfinite(self.mean) and self.mean >= 1,
                f"the mean number of runs must be a finite number >= 1, got {self.mean}")
        require(self.mean <= MAX_MEAN, f"the mean number of runs must be at most {MAX_MEAN} (each run is a whole DP "
                f"training, and the heavy-tailed counts go far above the mean), got {self.mean:g}")
        require(isinstance(self.shape, (int, float)) and not math.isnan(self.shape) and self.shape >= 0,
                f"the shape of the distribution of runs must be >= 0 (inf: Poisson), got {self.shape}")
        if self.shape != math.inf:
            require(self.mean > 1, "a mean of exactly 1 run leaves no choice to make; use a mean > 1")
        if 0 < self.shape < math.inf and self.shape != 1:  # sample() redraws until K >= 1
            accept = -math.expm1(self.shape * math.log(self.gamma))
            require(accept >= MIN_ACCEPTANCE,
                    f"with shape {self.shape:g} a draw of the number of runs is >= 1 only with probability {accept:.2g}, "
                    "so sampling it would take about 1/that draws; use shape 0 (the logarithmic distribution, the "
                    "limit of small shapes) or a larger shape")

    @property
    def poisson(self) -> bool:
        return self.shape == math.inf

    @property
    def gamma(self) -> float:
        """The family's gamma whose mean is ``mean`` (bisection; the mean falls as gamma grows)."""
        require(not self.poisson, "the Poisson family has no gamma")
        if self.shape == 1:
            return 1.0 / self.mean
        lo, hi = 0.0, 1.0
        while hi - lo > GAMMA_RTOL * hi:
            mid = (lo + hi) / 2
            if _tnb_mean(mid, self.shape) > self.mean:
                lo = mid
            else:
                hi = mid
        return hi

    @property
    def accounted_mean(self) -> float:
        """The exact mean of the distribution sampled (what the accountant is given)."""
        return self.mean if self.poisson or self.shape == 1 else _tnb_mean(self.gamma, self.shape)

    def pmf(self, k: int) -> float:
        """P(K = k), in closed form (for tests and docs)."""
        if self.poisson:
            return math.exp(-self.mean + k * math.log(self.mean) - math.lgamma(k + 1))
        if k < 1:
            return 0.0
        g = self.gamma
        if self.shape == 0:
            return (1 - g) ** k / (k * math.log(1 / g))
        log_binom = math.lgamma(k + self.shape) - math.lgamma(k + 1) - math.lgamma(self.shape)
        return math.exp(log_binom + k * math.log1p(-g) + self.shape * math.log(g)) / -math.expm1(self.shape * math.log(g))

    def sample(self, rng: np.random.Generator) -> int:
        """One draw of K from ``rng`` (exact: numpy's samplers, truncation by rejection)."""
        require(isinstance(rng, np.random.Generator), "Repetitions.sample needs an explicit numpy Generator")
        if self.poisson:
            return int(rng.poisson(self.mean))
        g = self.gamma
        if self.shape == 1:
            return int(rng.geometric(g))
        if self.shape == 0:
            return int(rng.logseries(1 - g))
        while True:  # negative binomial on k >= 0 (a Gamma-Poisson mixture), conditioned on k >= 1
            k = int(rng.negative_binomial(self.shape, g))
            if k >= 1:
                return k

    def dp_event(self, base: dp_event.DpEvent) -> dp_event.DpEvent:
        """``base`` run K times, only the best run released (dp-accounting's RDP accountant bounds it)."""
        return dp_event.RepeatAndSelectDpEvent(base, self.accounted_mean, self.shape)
