"""Statistics of a one-run privacy audit (Steinke, Nasr & Jagielski 2023, arXiv 2305.08846).

The experiment: ``m`` canaries, each included in the training input independently with
probability 1/2. After training the auditor scores every canary, guesses "in" for the ``k+``
highest scores and "out" for the ``k-`` lowest, and abstains on the rest: ``r = k+ + k-``
guesses, ``v`` of them correct.

Why this is a test of DP: if the training algorithm is (ε, δ)-DP, each guess is at best an
ε-randomised-response guess about a fair coin, so (their main theorem, Theorem 3.1, with δ)

    P[v ≥ x] ≤ f(x) + 2·m·δ · max_{i=1..x} (f(x - i) - f(x)) / i,
    f(x) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ x].

The right-hand side is the p-value of the observed ``v`` under the null hypothesis
"the algorithm is (ε, δ)-DP". The audit reports the largest ε at which that p-value is still
below ``1 - confidence``: the algorithm is then *not* (ε', δ)-DP for any ε' ≤ that value, with
the stated confidence. A correct (ε, δ)-DP mechanism gives a lower bound above ε in at most
``1 - confidence`` of runs.

Choosing ``k+, k-`` after looking at the scores would bias the test, so :func:`audit_scores`
tries a fixed grid of guess counts and pays for it with a Bonferroni correction (the confidence
level is split across the grid), which keeps the reported bound valid.

Binomial tails are computed here from log-gamma (no scipy), so the tests can compare them with
``scipy.stats.binom`` as an independent reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dprandp.errors import require

#: Default fractions of the canaries guessed on each side (k+ = k- = fraction · m).
DEFAULT_GUESS_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def _binomial_log_pmf(r: int, p: float) -> np.ndarray:
    """log P[Binomial(r, p) = j] for j = 0..r (exact up to floating point)."""
    j = np.arange(r + 1, dtype=np.float64)
    log_factorial = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, r + 1, dtype=np.float64)))))
    log_choose = log_factorial[r] - log_factorial - log_factorial[::-1]
    if p <= 0.0:
        out = np.full(r + 1, -np.inf)
        out[0] = 0.0
        return out
    if p >= 1.0:
        out = np.full(r + 1, -np.inf)
        out[r] = 0.0
        return out
    return log_choose + j * math.log(p) + (r - j) * math.log1p(-p)


def p_value(*, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """P-value of ``num_correct`` correct guesses out of ``num_guesses`` under "(ε, δ)-DP".

    Implements the bound of Theorem 3.1 of Steinke, Nasr & Jagielski (2023) stated in the module
    docstring: ``f(v) + 2 m δ max_i (f(v-i) - f(v)) / i`` with ``f`` the upper tail of
    Binomial(r, e^ε / (1 + e^ε)). Clipped to 1.
    """
    m, r, v = num_canaries, num_guesses, num_correct
    require(
        all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (m, r, v)),
        "num_canaries, num_guesses and num_correct must be integers",
    )
    require(0 <= v <= r <= m, f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    require(math.isfinite(epsilon) and epsilon >= 0.0, f"epsilon must be a finite number >= 0, got {epsilon}")
    require(0.0 <= delta <= 1.0, f"delta must be in [0, 1], got {delta}")
    if v == 0:
        return 1.0
    success = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-randomised response
    pmf = np.exp(_binomial_log_pmf(int(r), success))
    tail = float(min(1.0, pmf[v:].sum()))  # f(v) = P[Bin >= v]
    # f(v - i) - f(v) = P[v - i <= Bin < v] = sum_{j = v-i}^{v-1} pmf[j], for i = 1..v.
    window = np.cumsum(pmf[v - 1 :: -1])
    alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(
    *,
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    delta: float,
    confidence: float = 0.95,
    tol: float = 1e-6,
) -> float:
    """Largest ε (to ``tol``) at which the observed guesses still reject "(ε, δ)-DP".

    Returns 0 when the guesses do not reject even ε = 0. The returned value always has a p-value
    below ``1 - confidence`` (the search keeps that invariant), so it is a valid lower bound
    whether or not the p-value is monotone in ε.
    """
    require(0.0 < confidence < 1.0, f"confidence must be in (0, 1), got {confidence}")
    require(math.isfinite(tol) and tol > 0, f"tol must be a finite number > 0, got {tol}")  # 0 never ends the search
    level = 1.0 - confidence

    def rejects(eps: float) -> bool:
        return p_value(
            num_canaries=num_canaries, num_guesses=num_guesses, num_correct=num_correct,
            epsilon=eps, delta=delta,
        ) < level

    if not rejects(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejects(hi):  # the tail goes to 1 as ε grows, so this ends (ε < ~40 for r ≤ 1e6)
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:  # pragma: no cover - only if p-values underflow
            return lo
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if rejects(mid):
            lo = mid
        else:
            hi = mid
    return lo


def guesses_from_scores(scores: np.ndarray, *, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 ("in") for the ``k_plus`` highest scores, -1 ("out") for the ``k_minus`` lowest, else 0.

    Ties are broken by position (a stable sort), which does not depend on membership.
    """
    scores = np.asarray(scores, dtype=np.float64)
    m = scores.shape[0]
    require(scores.ndim == 1 and np.all(np.isfinite(scores)), "scores must be a 1-D array of finite numbers")
    require(0 <= k_plus and 0 <= k_minus and k_plus + k_minus <= m, f"need k+ + k- <= m, got {k_plus} + {k_minus} > {m}")
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(m, dtype=np.int8)
    if k_minus:
        guesses[order[:k_minus]] = -1
    if k_plus:
        guesses[order[m - k_plus :]] = 1
    return guesses


@dataclass(frozen=True, kw_only=True)
class AuditBound:
    """Outcome of :func:`audit_scores`: the best guess count and its lower bound on ε."""

    epsilon_lower_bound: float
    num_canaries: int
    k_plus: int
    k_minus: int
    num_guesses: int
    num_correct: int
    confidence: float
    delta: float
    candidates: int  # how many (k+, k-) choices shared the confidence budget (Bonferroni)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def guess_grid(num_canaries: int, fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS) -> list[tuple[int, int]]:
    """Symmetric (k+, k-) choices ``k = round(fraction · m)``, duplicates and zeros removed."""
    ks = sorted({max(1, round(f * num_canaries)) for f in fractions if f > 0})
    return [(k, k) for k in ks if 2 * k <= num_canaries]


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    grid: Sequence[tuple[int, int]] | None = None,
) -> AuditBound:
    """Lower bound on ε from canary scores (higher = "more likely in") and their true membership.

    Every (k+, k-) in ``grid`` is tested at level ``(1 - confidence) / len(grid)``; the largest
    resulting bound is reported (valid at ``confidence`` by the union bound).
    """
    # Checked here: the per-test level below would turn a bad value into another one in the message.
    require(0.0 < confidence < 1.0, f"confidence must be in (0, 1), got {confidence}")
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    require(scores.shape == included.shape and scores.ndim == 1, "scores and membership must be 1-D arrays of equal length")
    m = scores.shape[0]
    require(m >= 2, f"at least 2 canaries are needed, got {m}")
    grid = list(grid) if grid is not None else guess_grid(m)
    require(len(grid) > 0, "the grid of guess counts is empty")
    per_test_confidence = 1.0 - (1.0 - confidence) / len(grid)
    truth = np.where(included, 1, -1)
    best: AuditBound | None = None
    for k_plus, k_minus in grid:
        guesses = guesses_from_scores(scores, k_plus=k_plus, k_minus=k_minus)
        r = int(np.count_nonzero(guesses))
        v = int(np.count_nonzero(guesses == truth))
        eps = epsilon_lower_bound(
            num_canaries=m, num_guesses=r, num_correct=v, delta=delta, confidence=per_test_confidence,
        )
        candidate = AuditBound(
            epsilon_lower_bound=eps, num_canaries=m, k_plus=k_plus, k_minus=k_minus,
            num_guesses=r, num_correct=v, confidence=confidence, delta=delta, candidates=len(grid),
        )
        if best is None or eps > best.epsilon_lower_bound:
            best = candidate
    assert best is not None
    return best
