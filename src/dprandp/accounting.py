"""Privacy accounting for composed DP-SGD phases, on Google's ``dp-accounting``.

A DP-SGD phase is ``steps`` self-compositions of the Poisson-subsampled Gaussian mechanism with
sampling rate ``sample_rate`` and noise multiplier ``noise_multiplier`` (noise std divided by
the clipping bound). Any number of phases compose (DP-RandP spends one budget on Phase II
linear probing and Phase III fine-tuning).

* ``accountant="pld"`` (default): privacy loss distributions with pessimistic discretisation,
  so the reported epsilon is a certified upper bound on the true epsilon of the composition;
  the RDP bound, also certified, answers instead wherever it is the smaller one.
* ``accountant="rdp"``: Renyi DP, looser by a few percent; a cross-check.

The sampling rate is always given explicitly (``q = B / N``); nothing here infers it from a data
loader. Poisson sampling is assumed: :mod:`dprandp.privacy.sampling` provides exactly that.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from dprandp.errors import InputError, require

ACCOUNTANTS = ("pld", "rdp")

#: PLD grid asked for reported values: 1e-4 in the loss domain (dp-accounting's default); finer
#: where one step's privacy loss is small (PLD_RESOLUTION), coarser at large epsilon (_grid_scale).
PLD_FINE = 1e-4
#: Coarser grid asked for the ledger's per-step metrics. Still pessimistic (an upper bound).
PLD_COARSE = 1e-3
#: Largest target epsilon a noise multiplier is calibrated for: far beyond any meaningful privacy,
#: and larger targets need noise so small that the accountant overflows or takes very long.
MAX_TARGET_EPSILON = 100.0


#: The smallest nonzero sampling rate, B / N with B = 1 and N = 1e12: below it the PLD's calibration
#: slows down without bound (1e-100: 22 s, 1e-300: minutes) for a question no dataset asks.
MIN_SAMPLE_RATE = 1e-12

#: More DP-SGD steps than any training run takes; the accountants' time and memory are bounded below it.
MAX_STEPS = 10**9


@dataclass(frozen=True, kw_only=True)
class DPPhase:
    """One DP-SGD phase: ``steps`` Poisson-subsampled Gaussian steps."""

    sample_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        require(
            isinstance(self.sample_rate, (int, float))
            and (self.sample_rate == 0.0 or MIN_SAMPLE_RATE <= self.sample_rate <= 1.0),
            f"sample_rate must be 0 or in [{MIN_SAMPLE_RATE:g}, 1] (B / N for N up to 1e12 records), "
            f"got {self.sample_rate}",
        )
        require(
            isinstance(self.noise_multiplier, (int, float))
            and math.isfinite(self.noise_multiplier)
            and self.noise_multiplier >= 0.0,
            f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}",
        )
        require(
            isinstance(self.steps, int) and not isinstance(self.steps, bool) and 0 <= self.steps <= MAX_STEPS,
            f"steps must be an integer in [0, {MAX_STEPS:.0e}], got {self.steps}",
        )

    def with_noise(self, noise_multiplier: float) -> "DPPhase":
        return DPPhase(
            sample_rate=self.sample_rate, noise_multiplier=noise_multiplier, steps=self.steps
        )

    def dp_event(self) -> dp_accounting.DpEvent:
        return _dpsgd_event(self.sample_rate, self.noise_multiplier, self.steps)


def _dpsgd_event(sample_rate: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """``steps`` self-compositions of the Poisson-subsampled Gaussian mechanism."""
    if steps == 0 or sample_rate == 0.0:
        return dp_accounting.NoOpDpEvent()
    if noise_multiplier == 0.0:
        return dp_accounting.NonPrivateDpEvent()
    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _check_delta(delta: float) -> None:
    require(
        isinstance(delta, (int, float)) and 0.0 < delta < 1.0,
        f"delta must be in (0, 1), got {delta}",
    )


def _check_accountant(accountant: str) -> None:
    require(accountant in ACCOUNTANTS, f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")


def composed_event(phases: Iterable[DPPhase]) -> dp_accounting.DpEvent:
    """The dp-accounting event of all phases run one after the other.

    Phases with the same sampling rate and noise multiplier run the same mechanism, so they are
    one self-composition of their summed steps (composition is commutative): the same privacy
    loss, and the PLD builds it in one self-composition instead of one per phase plus a
    convolution of the results (DP-RandP's Phases II and III share q and sigma: 2x faster).
    """
    events = [_dpsgd_event(q, sigma, t) for (q, sigma), t in steps_by_mechanism(phases).items()]
    return dp_accounting.ComposedDpEvent(events)


def steps_by_mechanism(phases: Iterable[DPPhase]) -> dict[tuple[float, float], int]:
    """{(sample rate, noise multiplier): total steps}: the phases grouped by the mechanism they run."""
    steps: dict[tuple[float, float], int] = {}
    for phase in phases:
        key = (phase.sample_rate, phase.noise_multiplier)
        steps[key] = steps.get(key, 0) + phase.steps
    return steps


def compute_epsilon(
    phases: Sequence[DPPhase],
    *,
    target_delta: float,
    accountant: str = "pld",
    pld_discretization: float = PLD_FINE,
) -> float:
    """Epsilon at ``target_delta`` of the composition of ``phases`` (``inf`` if non-private).

    ``pld`` is the smaller of the privacy-loss-distribution bound and the RDP bound (both are
    always computed: each is a certified upper bound, so their minimum is one too), or the RDP
    bound alone where the PLD would be too slow (more than :data:`PLD_MAX_STEPS` steps, almost no
    noise). The RDP bound is the smaller one at very large epsilon, where the PLD grid must be
    coarse, and at a delta below the PLD's truncated tail mass. :func:`explain_epsilon` also says
    which one answered, and why.
    """
    return epsilon_bound(phases, target_delta=target_delta, accountant=accountant,
                         pld_discretization=pld_discretization)[0]


def epsilon_bound(
    phases: Sequence[DPPhase],
    *,
    target_delta: float,
    accountant: str = "pld",
    pld_discretization: float = PLD_FINE,
) -> tuple[float, str]:
    """:func:`compute_epsilon`, and the bound that gave it: ``"pld"`` or ``"rdp"``."""
    report = explain_epsilon(phases, target_delta=target_delta, accountant=accountant,
                             pld_discretization=pld_discretization)
    return report.epsilon, report.bound


@dataclass(frozen=True)
class EpsilonReport:
    """:func:`explain_epsilon`'s answer: epsilon, the bound that gave it and, where that is not
    the accountant asked for, why (``None`` otherwise)."""

    epsilon: float
    bound: str
    reason: str | None = None


#: Why the RDP bound answered for ``accountant="pld"`` (:attr:`EpsilonReport.reason`).
REASON_SMALLER = "smaller than the PLD here"
REASON_OUT_OF_RANGE = "the PLD cannot be computed here"  # its grid would be too coarse, or out of numeric range


def explain_epsilon(
    phases: Sequence[DPPhase],
    *,
    target_delta: float,
    accountant: str = "pld",
    pld_discretization: float = PLD_FINE,
) -> EpsilonReport:
    """:func:`compute_epsilon` with the bound that gave it and, for an RDP answer to ``pld``, why."""
    _check_delta(target_delta)
    _check_accountant(accountant)
    phases = list(phases)
    if all(isinstance(p.dp_event(), dp_accounting.NoOpDpEvent) for p in phases):
        return EpsilonReport(0.0, accountant)
    if any(isinstance(p.dp_event(), dp_accounting.NonPrivateDpEvent) for p in phases):
        return EpsilonReport(math.inf, accountant)
    if accountant == "rdp" or sum(p.steps for p in phases) > PLD_MAX_STEPS:
        eps = _run_accountant(rdp_privacy_accountant.RdpAccountant(), phases, target_delta, accountant)
        return EpsilonReport(eps, "rdp", None if accountant == "rdp" else REASON_TOO_MANY_STEPS)
    estimate, rdp_eps = _epsilon_estimate(phases, target_delta)
    # Always the RDP bound too: it costs a few hundredths of a second (one per mechanism, cached) and
    # is the tighter one wherever the PLD is loose (a coarse grid, a delta below its tail mass).
    rdp_eps = rdp_eps if rdp_eps is not None else rdp_bound(phases, target_delta)
    scale = _grid_scale(phases, estimate, pld_discretization)
    if scale > _MAX_GRID_SCALE:  # epsilon in the 1e5s or almost no noise: a PLD this coarse is slow and loose
        if rdp_eps is None:
            rdp_eps = _run_accountant(rdp_privacy_accountant.RdpAccountant(), phases, target_delta, accountant)
        return EpsilonReport(rdp_eps, "rdp", REASON_OUT_OF_RANGE)
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=pld_discretization * scale)
    try:
        eps = _run_accountant(pld, phases, target_delta, accountant)
    except InputError:  # out of the PLD's numeric range (e.g. sigma = 1e300): RDP may still answer
        if rdp_eps is None:
            raise
        return EpsilonReport(rdp_eps, "rdp", REASON_OUT_OF_RANGE)
    if rdp_eps is not None and rdp_eps < eps:
        return EpsilonReport(rdp_eps, "rdp", REASON_SMALLER)
    return EpsilonReport(eps, "pld")


@contextlib.contextmanager
def _quiet_accountant():
    """RDP drops the orders it cannot compute with an absl warning each, and extreme noise makes
    numpy warn of overflow; the answer (or the one-line error for a NaN) says enough."""
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with np.errstate(all="ignore"):
            yield
    finally:
        absl_logging.set_verbosity(verbosity)


def _run_accountant(acc, phases: Sequence[DPPhase], target_delta: float, name: str) -> float:
    try:
        with _quiet_accountant():
            acc.compose(composed_event(phases))
            eps = float(acc.get_epsilon(target_delta))
    except (OverflowError, MemoryError, ValueError, ZeroDivisionError):
        eps = math.nan
    if math.isnan(eps):  # never let a NaN through: every comparison with it is False
        steps = sum(p.steps for p in phases)
        sigmas = sorted({p.noise_multiplier for p in phases})
        raise InputError(f"the {name} accountant cannot compute epsilon for {steps} steps at noise multiplier(s) "
                         f"{', '.join(f'{s:g}' for s in sigmas)} (out of numeric range or memory)")
    return max(eps, 0.0)


#: Above this many steps the PLD is not computed and the answer is the RDP bound: composing a PLD 1e7
#: times (q = 0.001, 1e-4 grid) takes 30 s at sigma = 10 for a 0.2 % tighter epsilon, 75 s at sigma = 3
#: for a 6.6 % tighter one, and 1e8 times ~10 min for a looser one (its truncation errors add up).
#: So past it the RDP bound can be several percent looser than the PLD (1.5e6 steps of q = 0.001,
#: sigma = 1: 8.25 against 7.67).
PLD_MAX_STEPS = 10**6
REASON_TOO_MANY_STEPS = f"the PLD is not computed past 1e{round(math.log10(PLD_MAX_STEPS))} steps"

#: The PLD grid never gets coarser than this many times the requested interval.
_MAX_GRID_SCALE = 1e5

#: Grid points a single step's PLD may hold: a Gaussian step's privacy loss spans about
#: 1 / (2 sigma^2), so at sigma = 1e-4 a 1e-4 grid would need 5e11 of them (and hang).
_MAX_STEP_POINTS = 1e6

#: The PLD grid, at most, as a fraction of one step's privacy-loss scale (epsilon / sqrt(steps)).
#: The pessimistic grid overstates epsilon by about (grid / that scale)^2 / 2, measured against
#: dp-accounting on 1e-6 to 3e-6 grids from 875 to 1e6 steps and epsilon 0.005 to 2: a fraction of
#: 0.01 keeps it near 2e-4 (a fixed 1e-4 grid was 34 % over at q = 0.001, sigma = 20.5, 1e5 steps,
#: and 110 % at sigma = 50, 1e6 steps: looser than RDP). Where one step's loss scale is above 0.01
#: (the paper's recipe: 0.04) the requested grid is fine enough and is used as it is.
PLD_RESOLUTION = 0.01

#: The finest grid the resolution asks for: 1e6 steps of tiny loss take 3 s on it (time grows as
#: 1 / grid), and finer grids stop getting tighter (the PLD's truncation errors add up instead).
PLD_MIN_INTERVAL = 1e-6


def step_loss_range(noise_multiplier: float) -> float:
    """The range of privacy losses a PLD of one Gaussian step must represent: its mean and 20 std
    (the grid points of one step are this over the grid interval)."""
    inverse = 1.0 / noise_multiplier
    return inverse * inverse / 2 + 20 * inverse


def _grid_scale(phases: Sequence[DPPhase], estimate: float, interval: float,
                resolution: float = PLD_RESOLUTION) -> float:
    """The PLD grid as a multiple of the requested ``interval``; above _MAX_GRID_SCALE the answer
    is the RDP bound instead.

    * Finer than ``interval`` (down to PLD_MIN_INTERVAL) where one step's privacy loss, about
      ``estimate / sqrt(steps)``, is below ``interval / resolution``: small epsilon over many steps.
      The pessimistic grid's error is a fixed number of grid steps *per step*, so a grid that
      cannot resolve one step's loss overstates a small epsilon by a lot (see PLD_RESOLUTION).
    * eps / 2 times ``interval`` above epsilon = 2: the PLD's memory and time grow with the range
      of privacy losses it must represent, so a large epsilon (tiny noise, many steps) on a 1e-4 grid can take minutes
      and gigabytes. The error there is small next to epsilon, so a grid proportional to epsilon
      keeps the relative error small (about 1e-5 measured at epsilon = 9 to 3500) and answers in
      milliseconds.
    * Coarse enough that one step's loss range fits in _MAX_STEP_POINTS.

    Any grid gives a certified upper bound (the discretization is pessimistic): the scale decides
    only how tight and how fast, never whether the answer is safe.
    """
    live = [p for p in phases if p.steps and p.sample_rate and p.noise_multiplier]
    if not live:
        return 1.0
    per_step_loss = estimate / math.sqrt(sum(p.steps for p in live))
    fine = min(1.0, max(resolution * per_step_loss, PLD_MIN_INTERVAL) / interval)
    loss_range = step_loss_range(min(p.noise_multiplier for p in live))
    large = estimate / 2  # coarser only above epsilon = 2: below, eps / 2 would cap the fine grid
    return max(fine, large if large > 1 else 0.0, loss_range / (_MAX_STEP_POINTS * interval))


def pld_interval(phases: Sequence[DPPhase], *, target_delta: float, interval: float = PLD_FINE,
                 resolution: float = PLD_RESOLUTION) -> float | None:
    """The PLD grid :func:`compute_epsilon` uses for ``phases`` when asked for ``interval`` (``None``
    where the RDP bound answers instead); a caller that builds its own PLDs (the run ledger's
    per-step bound) uses it with a coarser ``resolution``."""
    scale = _grid_scale(phases, _epsilon_estimate(phases, target_delta)[0], interval, resolution)
    return None if scale > _MAX_GRID_SCALE else interval * scale


def _epsilon_estimate(phases: Sequence[DPPhase], target_delta: float) -> tuple[float, float | None]:
    """A cheap estimate of epsilon that sets the PLD grid, and the RDP bound where it was computed.

    The central-limit (mu-GDP) estimate, or the RDP bound where that one is large (it fails at
    small noise).
    """
    live = [p for p in phases if p.steps and p.sample_rate and p.noise_multiplier]
    total = sum(p.sample_rate**2 * p.steps for p in live)
    if total == 0:
        return 0.0, None
    sigma = min(p.noise_multiplier for p in live)
    exponent = 700.0 if sigma < 0.04 else 1.0 / sigma / sigma  # no overflow at sigma = 1e-300 or 1e300
    mu = math.sqrt(total * math.expm1(exponent))
    eps = mu * mu / 2 + mu * math.sqrt(2 * math.log(1 / target_delta))
    if eps <= 20:
        return eps, None
    bound = rdp_bound(phases, target_delta)
    return (bound, bound) if bound is not None else (math.inf, None)


def rdp_bound(phases: Sequence[DPPhase], target_delta: float) -> float | None:
    """The RDP accountant's epsilon (as ``accountant="rdp"`` computes it), or None where it cannot
    compute one.

    RDP composes by addition, so each mechanism's one-step RDP curve is computed once and cached
    (the run ledger asks after every step); the sum is dp-accounting's own for the whole event.
    """
    try:
        with _quiet_accountant():
            try:
                total = np.zeros(len(_RDP_ORDERS))
                for (q, sigma), steps in steps_by_mechanism(phases).items():
                    if steps and q:
                        total = total + steps * _step_rdp(q, sigma)
                bound = float(rdp_privacy_accountant.compute_epsilon(_RDP_ORDERS, total, target_delta)[0])
            except AttributeError:  # a dp-accounting without the private per-order RDP: the whole event
                rdp = rdp_privacy_accountant.RdpAccountant()
                rdp.compose(composed_event(phases))
                bound = float(rdp.get_epsilon(target_delta))
    except (OverflowError, ValueError, ZeroDivisionError):
        return None
    return max(bound, 0.0) if math.isfinite(bound) else None


_RDP_ORDERS = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=float)  # RdpAccountant()'s orders


@functools.lru_cache(maxsize=256)
def _step_rdp(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP at each of dp-accounting's default orders of one Poisson-subsampled Gaussian step
    (``inf`` without noise), as its RdpAccountant computes it; read-only, since it is shared."""
    accountant = rdp_privacy_accountant.RdpAccountant(orders=_RDP_ORDERS)
    accountant.compose(_dpsgd_event(sample_rate, noise_multiplier, 1))
    # dp-accounting has no public accessor for the per-order RDP; _rdp is what its get_epsilon reads.
    rdp = np.array(accountant._rdp, dtype=float)
    rdp.flags.writeable = False
    return rdp


@dataclass(frozen=True)
class Calibration:
    """Result of :func:`calibrate_noise`: the noise multiplier and the epsilon it reaches."""

    noise_multiplier: float
    epsilon: float


def check_target_epsilon(target_epsilon) -> None:
    """A target epsilon that a noise multiplier can be calibrated for: finite, > 0, <= MAX_TARGET_EPSILON."""
    require(isinstance(target_epsilon, (int, float)) and target_epsilon > 0 and math.isfinite(target_epsilon),
            f"target epsilon must be a finite number > 0, got {target_epsilon}")
    require(target_epsilon <= MAX_TARGET_EPSILON,
            f"target epsilon must be <= {MAX_TARGET_EPSILON:g} (beyond that DP promises nothing), got {target_epsilon:g}")


def calibrate_noise(
    *,
    target_epsilon: float,
    target_delta: float,
    phases: Sequence[DPPhase],
    accountant: str = "pld",
    rtol: float = 1e-3,
) -> Calibration:
    """Smallest noise multiplier (one for all ``phases``) whose epsilon is <= ``target_epsilon``.

    ``phases`` give the sample rates and step counts; their noise multipliers are ignored.
    The returned noise is within a relative ``rtol`` of the smallest feasible one and never
    overshoots: its epsilon, computed with the same accountant used for reporting, is <= target.
    The search starts from the central-limit (mu-GDP) estimate, which is within a few percent
    at DP-SGD's step counts, brackets it with 5 % steps and refines by regula falsi on the
    reporting grid, each sigma evaluated once: 4-5 evaluations (a coarser grid to bracket first
    cost more evaluations than it saved, and is far off at 1e5+ steps, where its discretization
    error adds up).
    """
    check_target_epsilon(target_epsilon)
    _check_delta(target_delta)
    _check_accountant(accountant)
    phases = list(phases)
    require(len(phases) > 0, "at least one phase is needed to calibrate noise")
    if all(p.steps == 0 or p.sample_rate == 0.0 for p in phases):
        return Calibration(noise_multiplier=0.0, epsilon=0.0)

    @functools.cache  # the bracket's ends are evaluated again by the root finder and at the end
    def excess(sigma: float) -> tuple[float, float]:
        """(log eps - log target, eps) on the reporting grid: <= 0 means feasible."""
        eps = compute_epsilon([p.with_noise(sigma) for p in phases], target_delta=target_delta,
                              accountant=accountant, pld_discretization=PLD_FINE)
        return (math.log(eps) - math.log(target_epsilon) if eps > 0 else -math.inf), eps

    def f(sigma: float) -> float:
        return excess(sigma)[0]

    guess = _gdp_noise_guess(target_epsilon, target_delta, phases)
    lo, hi = _bracket(f, guess, step=1.05)
    if lo < hi:  # else the target holds at a noise multiplier below 1e-4 (a vanishing sampling rate)
        lo, hi = _illinois(f, lo, hi, rtol)
    sigma = hi
    eps = excess(sigma)[1]
    if eps > target_epsilon:  # pragma: no cover - defensive: hi is kept feasible throughout
        raise RuntimeError("calibration failed to stay within the target epsilon")
    return Calibration(noise_multiplier=sigma, epsilon=eps)



def _gdp_noise_guess(target_epsilon: float, target_delta: float, phases: Sequence[DPPhase]) -> float:
    """A starting point for the noise search from the central-limit (mu-GDP) approximation."""
    from scipy import optimize, stats

    def delta_of_mu(mu: float) -> float:
        e = target_epsilon
        return stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2)

    try:
        mu = optimize.brentq(lambda m: delta_of_mu(m) - target_delta, 1e-6, 100.0)
    except ValueError:
        return 1.0

    def mu_of_sigma(sigma: float) -> float:
        total = sum(p.sample_rate**2 * p.steps for p in phases if p.steps and p.sample_rate)
        return math.sqrt(total * math.expm1(min(1.0 / sigma**2, 700.0)))

    try:
        return float(optimize.brentq(lambda s: mu_of_sigma(s) - mu, 1e-3, 1e6))
    except ValueError:
        return 1.0


def _bracket(f, start: float, step: float = 1.1) -> tuple[float, float]:
    """(lo, hi) around the root of decreasing ``f`` with f(lo) > 0 >= f(hi)."""
    if f(start) <= 0:
        hi, lo = start, start / step
        while f(lo) <= 0:
            if lo < 1e-4:
                return lo, lo  # feasible at almost no noise: no root to refine
            hi, lo, step = lo, lo / step, step * step
        return lo, hi
    lo, hi = start, start * step
    while f(hi) > 0:
        if hi > 1e6:
            raise InputError("target epsilon is unreachable (a noise multiplier above 1e6 would be needed)")
        lo, hi, step = hi, hi * step, step * step
    return lo, hi


def _illinois(f, lo: float, hi: float, rtol: float) -> tuple[float, float]:
    """Shrink a bracket (f(lo) > 0 >= f(hi), f decreasing) until hi / lo - 1 <= rtol.

    Regula falsi in log(sigma) with the Illinois modification, plus a nudge past the
    estimate so that both ends of the bracket move: a handful of evaluations in practice.
    """
    a, b = math.log(lo), math.log(hi)
    fa, fb = f(lo), f(hi)
    if not math.isfinite(fb):
        fb = -1e3
    side = 0
    for _ in range(100):
        if b - a <= math.log1p(rtol):
            break
        x = (a * fb - b * fa) / (fb - fa) if math.isfinite(fa) else 0.5 * (a + b)
        width, nudge = b - a, 0.5 * math.log1p(rtol)
        x = min(max(x, a + nudge), b - nudge) if width > 2 * nudge else 0.5 * (a + b)
        if not (a < x < b):
            x = 0.5 * (a + b)
        fx = f(math.exp(x))
        if fx <= 0:
            b, fb = x, fx if math.isfinite(fx) else -1e3
            if side == -1:
                fa /= 2
            side = -1
        else:
            a, fa = x, fx
            if side == 1:
                fb /= 2
            side = 1
    return math.exp(a), math.exp(b)

def epsilon_curve(
    phases: Sequence[DPPhase],
    *,
    target_delta: float,
    at_steps: Sequence[int] | None = None,
    num_points: int = 50,
    accountant: str = "pld",
) -> list[tuple[int, float]]:
    """Epsilon after each of ``at_steps`` cumulative steps through ``phases`` (in order).

    Without ``at_steps``, about ``num_points`` evenly spaced steps plus each phase boundary.
    Returns ``[(step, epsilon), ...]`` for plots and run ledgers.
    """
    _check_delta(target_delta)
    phases = list(phases)
    total = sum(p.steps for p in phases)
    if at_steps is None:
        stride = max(1, total // max(1, num_points))
        points = set(range(0, total + 1, stride)) | {total}
        boundary = 0
        for p in phases:
            boundary += p.steps
            points.add(boundary)
        at_steps = sorted(points)
    curve = []
    for t in at_steps:
        require(0 <= t <= total, f"step {t} is outside 0..{total}")
        prefix, remaining = [], t
        for p in phases:
            take = min(p.steps, remaining)
            if take > 0:
                prefix.append(DPPhase(sample_rate=p.sample_rate, noise_multiplier=p.noise_multiplier, steps=take))
            remaining -= take
        eps = compute_epsilon(prefix, target_delta=target_delta, accountant=accountant) if prefix else 0.0
        curve.append((int(t), eps))
    return curve
