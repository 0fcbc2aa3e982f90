"""Epsilon of private hyperparameter tuning, and the noise that meets a target for it.

One candidate run is the DP-SGD phases of one training run (Phases II + III on the training
split) followed by its score: the number of correctly classified validation examples plus
Gaussian noise of std ``score_noise`` (one example changes the count by at most 1, so that is a
Gaussian mechanism with noise multiplier ``score_noise``). Both parts are composed, which covers
an example of either split. The tuning releases only the best of K such runs, K drawn from
:class:`~dprandp.tuning.repetitions.Repetitions`; dp-accounting's RDP accountant bounds that
(Papernot & Steinke 2022, Theorems 2 and 6). PLD accounting has no such bound, so tuning is
accounted with RDP, a few percent looser than the PLD epsilon of one run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant

from dprandp.accounting import DPPhase, _bracket, _illinois, _quiet_accountant, check_target_epsilon, composed_event
from dprandp.errors import require
from dprandp.tuning.repetitions import Repetitions


def candidate_event(phases: Sequence[DPPhase], *, score_noise: float) -> dp_accounting.DpEvent:
    """One candidate run: its DP-SGD phases, then its noisy validation count."""
    require(isinstance(score_noise, (int, float)) and math.isfinite(score_noise) and 0 < score_noise <= 1e9,
            f"the score noise must be a number in (0, 1e9] (a noiseless score is not private), got {score_noise}")
    return dp_accounting.ComposedDpEvent([composed_event(phases), dp_accounting.GaussianDpEvent(score_noise)])


def selection_epsilon(base: dp_accounting.DpEvent, repetitions: Repetitions, *, target_delta: float,
                      neighboring: dp_accounting.NeighboringRelation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                      ) -> float:
    """Epsilon at ``target_delta`` of releasing the best of K runs of ``base`` (RDP accountant)."""
    require(isinstance(target_delta, (int, float)) and 0 < target_delta < 1, f"delta must be in (0, 1), got {target_delta}")
    accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=neighboring)
    with _quiet_accountant():  # at large q some fractional orders do not converge; they are dropped (a looser bound)
        accountant.compose(repetitions.dp_event(base))
        return max(float(accountant.get_epsilon(target_delta)), 0.0)


def tuning_epsilon(phases: Sequence[DPPhase], *, score_noise: float, repetitions: Repetitions,
                   target_delta: float) -> float:
    """Epsilon of the whole tuning: every candidate's phases and score, the best one released."""
    require(all(p.noise_multiplier > 0 for p in phases if p.steps and p.sample_rate),
            "every DP phase of a tuned run needs noise")
    return selection_epsilon(candidate_event(phases, score_noise=score_noise), repetitions, target_delta=target_delta)


def calibrate_tuning_noise(*, target_epsilon: float, target_delta: float, phases: Sequence[DPPhase],
                           score_noise: float, repetitions: Repetitions, rtol: float = 1e-3) -> tuple[float, float]:
    """The smallest noise multiplier (one for all ``phases``, within ``rtol``) whose tuning epsilon
    is <= ``target_epsilon``; returns (noise multiplier, its tuning epsilon). Never overshoots."""
    check_target_epsilon(target_epsilon)
    phases = list(phases)
    require(any(p.steps and p.sample_rate for p in phases), "at least one DP step is needed to calibrate noise")

    @functools.cache  # the bracket's ends are evaluated again by the root finder and at the end
    def eps(sigma: float) -> float:
        return tuning_epsilon([p.with_noise(sigma) for p in phases], score_noise=score_noise,
                              repetitions=repetitions, target_delta=target_delta)

    floor = selection_epsilon(dp_accounting.GaussianDpEvent(score_noise), repetitions, target_delta=target_delta)
    require(floor < target_epsilon,
            f"the tuning alone (score noise {score_noise:g}, {repetitions.mean:g} runs on average) spends "
            f"epsilon {floor:.3g} >= the target {target_epsilon:g}: raise --score-noise or the target, or lower the runs")
    def excess(sigma: float) -> float:  # <= 0: feasible; the shared root finder of dprandp.accounting
        e = eps(sigma)
        return math.log(e) - math.log(target_epsilon) if e > 0 else -math.inf

    lo, hi = _bracket(excess, 1.0)
    lo, hi = _illinois(excess, lo, hi, rtol)
    return hi, eps(hi)
