"""Private random search: K candidate runs, each with hyperparameters drawn at random, best released.

The privacy bound of :mod:`dprandp.tuning.accounting` holds for this procedure only as written:

* K is drawn from the :class:`~dprandp.tuning.repetitions.Repetitions` the accountant is told about
  (never "until it looks good", never a fixed grid walked in order);
* every run draws its hyperparameters independently and uniformly from the candidates, so that the
  runs are independent and identically distributed;
* every run's score is private (:func:`noisy_count`), and only the best run and its score leave
  this function: the others' models, scores and even their hyperparameters are dropped. Logging
  them would release them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from dprandp.errors import require
from dprandp.tuning.repetitions import Repetitions

C = TypeVar("C")
R = TypeVar("R")


def noisy_count(correct: int, *, noise: float, rng: np.random.Generator) -> float:
    """A count (e.g. correct validation predictions) plus Gaussian noise of std ``noise``."""
    require(noise > 0, f"the score noise must be > 0, got {noise}")
    require(isinstance(rng, np.random.Generator), "noisy_count needs an explicit numpy Generator")
    return float(correct) + float(rng.normal(0.0, noise))


@dataclass(frozen=True)
class Selected(Generic[C, R]):
    """What private tuning releases: the best run's candidate, score and result."""

    candidate: C
    score: float
    result: R


def private_search(candidates: Sequence[C], run: Callable[[C, int], tuple[float, R]], *,
                   repetitions: Repetitions, rng: np.random.Generator,
                   discard: Callable[[R], None] | None = None) -> Selected[C, R] | None:
    """Run ``run(candidate, index)`` K times, K ~ ``repetitions``, each on a uniformly drawn candidate.

    ``run`` returns (private score, result); the highest score wins (ties: the earlier run). Each
    losing result is handed to ``discard`` (e.g. to delete its files) as soon as it loses. Returns
    ``None`` when K = 0 (possible only with a Poisson number of runs): nothing is released.
    """
    require(len(candidates) > 0, "private search needs at least one candidate")
    require(isinstance(rng, np.random.Generator), "private_search needs an explicit numpy Generator")
    k = repetitions.sample(rng)
    best: Selected[C, R] | None = None
    for index in range(k):
        candidate = candidates[int(rng.integers(len(candidates)))]
        score, result = run(candidate, index)
        if best is None or score > best.score:
            if best is not None and discard is not None:
                discard(best.result)
            best = Selected(candidate, float(score), result)
        elif discard is not None:
            discard(result)
    return best
