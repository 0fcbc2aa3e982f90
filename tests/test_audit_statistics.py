"""One-run audit statistics against independent references (scipy's binomial, closed forms, simulation)."""

import math

import numpy as np
import pytest
from scipy import optimize, special, stats

from dprandp.audit.statistics import (
    audit_scores,
    epsilon_lower_bound,
    guess_grid,
    guesses_from_scores,
    p_value,
)
from dprandp.errors import InputError


def reference_p_value(m, r, v, eps, delta):
    """Theorem 3.1 of Steinke, Nasr & Jagielski (2023), term by term with scipy's binomial."""
    q = special.expit(eps)
    f = lambda x: stats.binom.sf(x - 1, r, q)  # P[Bin(r, q) >= x]
    if v == 0:
        return 1.0
    alpha = max((f(v - i) - f(v)) / i for i in range(1, v + 1))
    return min(1.0, f(v) + 2 * m * delta * alpha)


@pytest.mark.parametrize("m, r, v, eps", [
    (1000, 100, 70, 0.5), (1000, 100, 100, 3.0), (50, 20, 11, 0.0), (500, 500, 300, 0.1),
    (10, 1, 1, 1.0), (2000, 400, 210, 2.0), (1000, 20, 0, 1.0),
])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_p_value_matches_theorem_with_scipy(m, r, v, eps, delta):
    assert p_value(num_canaries=m, num_guesses=r, num_correct=v, epsilon=eps, delta=delta) == pytest.approx(
        reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("r, v", [(100, 70), (200, 150), (1000, 560), (40, 40), (10, 9)])
def test_delta_zero_bound_is_binomial_test_inversion(r, v):
    # The level-0.05 one-sided binomial test rejects "accuracy <= expit(eps)" while
    # P[Bin(r, expit(eps)) >= v] < 0.05; the bound is where that tail reaches 0.05.
    tail = lambda eps: stats.binom.sf(v - 1, r, special.expit(eps)) - 0.05
    expected = optimize.brentq(tail, 0.0, 30.0, xtol=1e-10) if tail(0.0) < 0 else 0.0
    got = epsilon_lower_bound(num_canaries=r, num_guesses=r, num_correct=v, delta=0.0)
    assert got == pytest.approx(expected, abs=2e-6)
    assert stats.binom.sf(v - 1, r, special.expit(got)) < 0.05


@pytest.mark.parametrize("r", [1, 10, 100, 1000])
def test_all_correct_closed_form(r):
    # All r guesses right: the tail is expit(eps)^r, so the bound is logit(0.05 ** (1 / r)).
    expected = max(0.0, math.log(0.05 ** (1 / r) / (1 - 0.05 ** (1 / r))))
    got = epsilon_lower_bound(num_canaries=r, num_guesses=r, num_correct=r, delta=0.0)
    assert got == pytest.approx(expected, abs=2e-6)


def test_chance_level_guessing_gives_zero():
    assert epsilon_lower_bound(num_canaries=1000, num_guesses=200, num_correct=100, delta=1e-5) == 0.0


def test_delta_and_confidence_make_the_bound_smaller():
    base = dict(num_canaries=1000, num_guesses=200, num_correct=150)
    b0 = epsilon_lower_bound(**base, delta=0.0)
    b1 = epsilon_lower_bound(**base, delta=1e-5)
    b2 = epsilon_lower_bound(**base, delta=1e-4)
    assert b0 > b1 > b2 > 0
    assert epsilon_lower_bound(**base, delta=0.0, confidence=0.99) < b0


def test_guesses_top_and_bottom_against_a_loop():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal(37)
    guesses = guesses_from_scores(scores, k_plus=5, k_minus=7)
    ranked = sorted(range(37), key=lambda i: scores[i])
    for pos, i in enumerate(ranked):
        expected = -1 if pos < 7 else (1 if pos >= 37 - 5 else 0)
        assert guesses[i] == expected


def test_audit_scores_perfect_separation():
    m = 1000
    included = np.arange(m) % 2 == 0
    result = audit_scores(included.astype(float), included, delta=0.0)
    # The largest grid entry guesses everything; Bonferroni over the grid costs a little.
    level = 0.05 / len(guess_grid(m))
    expected = math.log(level ** (1 / m) / (1 - level ** (1 / m)))
    assert result.num_correct == result.num_guesses == m
    assert result.epsilon_lower_bound == pytest.approx(expected, abs=2e-6)


def test_randomised_response_bound_is_valid_by_simulation():
    # Randomised response on the membership bit (plus membership-independent jitter) is exactly
    # eps0-DP; at 95 % confidence the audit may exceed eps0 in at most ~5 % of runs, and it
    # should come close to eps0 (a one-sided level-0.5 test would exceed it in ~30 % of runs).
    eps0, m = 1.0, 1000
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(100):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < special.expit(eps0)
        scores = np.where(truthful, included, ~included) + 0.5 * rng.random(m)
        bounds.append(audit_scores(scores, included, delta=0.0).epsilon_lower_bound)
    bounds = np.array(bounds)
    assert np.mean(bounds > eps0) <= 0.08
    assert 0.6 * eps0 < np.median(bounds) <= eps0


@pytest.mark.parametrize("kwargs", [
    dict(num_canaries=10, num_guesses=11, num_correct=1, epsilon=1.0, delta=0.0),
    dict(num_canaries=10, num_guesses=5, num_correct=6, epsilon=1.0, delta=0.0),
    dict(num_canaries=10, num_guesses=5, num_correct=3, epsilon=-1.0, delta=0.0),
    dict(num_canaries=10, num_guesses=5, num_correct=3, epsilon=1.0, delta=1.5),
])
def test_bad_arguments_raise_input_error(kwargs):
    with pytest.raises(InputError):
        p_value(**kwargs)
