"""Accountant against published reference values (SPEC.md) and composition invariants."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dprandp.accounting import DPPhase, calibrate_noise, compute_epsilon, epsilon_curve
from dprandp.errors import InputError

Q = 4096 / 50000  # 0.08192


def phase(sigma, steps, q=Q):
    return DPPhase(sample_rate=q, noise_multiplier=sigma, steps=steps)


@pytest.mark.parametrize(
    "phases, pld, rdp",
    [
        ([phase(9.3, 875)], 0.978, 1.070),
        ([phase(3.0, 1000)], 3.883, 4.212),
        ([phase(3.0, 2500)], 6.579, 7.098),
        ([phase(10.0, 2500)], 1.606, 1.750),
        ([phase(8.0, 200), phase(4.0, 1000)], 2.821, 3.064),
    ],
)
def test_reference_values(phases, pld, rdp):
    assert compute_epsilon(phases, target_delta=1e-5) == pytest.approx(pld, abs=0.005)
    assert compute_epsilon(phases, target_delta=1e-5, accountant="rdp") == pytest.approx(rdp, abs=0.005)


def test_public_rdp_reference_point():
    eps = compute_epsilon([phase(1.5, 2250, q=0.04)], target_delta=1e-5, accountant="rdp")
    assert eps == pytest.approx(7.3291, abs=0.002)


def test_pld_is_tighter_than_rdp():
    p = [phase(9.3, 875)]
    assert compute_epsilon(p, target_delta=1e-5) < compute_epsilon(p, target_delta=1e-5, accountant="rdp")


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_composition_splits(accountant):
    one = compute_epsilon([phase(5.0, 400)], target_delta=1e-5, accountant=accountant)
    two = compute_epsilon([phase(5.0, 200), phase(5.0, 200)], target_delta=1e-5, accountant=accountant)
    assert one == pytest.approx(two, rel=1e-3)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_phases_of_one_mechanism_merge_into_the_same_epsilon(accountant):
    """Phases with the same (q, sigma) are accounted as one self-composition; the reference
    composes them one by one, straight through dp-accounting, as separate events."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    from dprandp.accounting import composed_event

    phases = [phase(1.6, 60, q=0.02), phase(3.0, 50), phase(1.6, 240, q=0.02)]
    assert len(composed_event(phases).events) == 2
    reference = (pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
                 if accountant == "pld" else rdp_privacy_accountant.RdpAccountant())
    reference.compose(dp_accounting.ComposedDpEvent([p.dp_event() for p in phases]))
    ours = compute_epsilon(phases, target_delta=1e-5, accountant=accountant)
    assert ours == pytest.approx(reference.get_epsilon(1e-5), rel=1e-5)  # two pessimistic grids: 1e-6 apart


def test_calibrate_takes_a_handful_of_evaluations(monkeypatch):
    """The search starts at the mu-GDP estimate and evaluates each sigma once: at most 6 epsilon
    evaluations for the preset's two phases and for 1e5 steps (it took 13 and 17 with a coarse-grid
    bracket first)."""
    from dprandp import accounting

    calls = []
    real = accounting.compute_epsilon
    monkeypatch.setattr(accounting, "compute_epsilon", lambda *a, **k: calls.append(1) or real(*a, **k))
    for phases in ([phase(1.0, 60, q=0.02), phase(1.0, 240, q=0.02)], [phase(1.0, 10**5, q=1e-3)]):
        calls.clear()
        cal = calibrate_noise(target_epsilon=1.0, target_delta=1e-5, phases=phases)
        assert cal.epsilon <= 1.0 and len(calls) <= 6


def test_more_steps_cost_more():
    assert compute_epsilon([phase(5.0, 100)], target_delta=1e-5) < compute_epsilon([phase(5.0, 200)], target_delta=1e-5)


def test_zero_sampling_rate_is_free():
    assert compute_epsilon([phase(1.0, 1000, q=0.0)], target_delta=1e-5) == 0.0


def test_zero_noise_is_not_private():
    assert compute_epsilon([phase(0.0, 10)], target_delta=1e-5) == math.inf


def test_tiny_noise_gives_huge_epsilon():
    assert compute_epsilon([phase(0.3, 20, q=0.5)], target_delta=1e-5, accountant="rdp") > 100
    assert compute_epsilon([phase(1.0, 875)], target_delta=1e-5) > 15


@pytest.mark.parametrize("kwargs", [
    dict(sample_rate=1.5, noise_multiplier=1.0, steps=1),
    dict(sample_rate=-0.1, noise_multiplier=1.0, steps=1),
    dict(sample_rate=0.1, noise_multiplier=-1.0, steps=1),
    dict(sample_rate=0.1, noise_multiplier=1.0, steps=-1),
    dict(sample_rate=0.1, noise_multiplier=1.0, steps=1.5),
])
def test_bad_phase_refused(kwargs):
    with pytest.raises(InputError):
        DPPhase(**kwargs)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5])
def test_bad_delta_refused(delta):
    with pytest.raises(InputError):
        compute_epsilon([phase(1.0, 10)], target_delta=delta)


def test_calibrate_reference():
    cal = calibrate_noise(target_epsilon=1.0, target_delta=1e-5, phases=[phase(1.0, 875)])
    assert 9.05 <= cal.noise_multiplier <= 9.25
    assert 0.99 <= cal.epsilon <= 1.0


@settings(max_examples=8, deadline=None)
@given(
    target=st.floats(min_value=0.3, max_value=4.0),
    steps=st.integers(min_value=10, max_value=400),
    q=st.floats(min_value=0.005, max_value=0.1),
)
def test_calibrate_never_overshoots_and_is_tight(target, steps, q):
    phases = [DPPhase(sample_rate=q, noise_multiplier=1.0, steps=steps)]
    cal = calibrate_noise(target_epsilon=target, target_delta=1e-5, phases=phases)
    recomputed = compute_epsilon([phases[0].with_noise(cal.noise_multiplier)], target_delta=1e-5)
    assert recomputed <= target
    assert recomputed == pytest.approx(cal.epsilon, rel=1e-9)
    # Tight: 0.5 % less noise already overshoots the target.
    assert compute_epsilon([phases[0].with_noise(cal.noise_multiplier * 0.995)], target_delta=1e-5) > target


def test_calibrate_counts_every_phase():
    """One sigma for Phase II + III: calibrating two phases needs more noise than either alone."""
    p2, p3 = phase(1.0, 96), phase(1.0, 779)
    both = calibrate_noise(target_epsilon=1.0, target_delta=1e-5, phases=[p2, p3]).noise_multiplier
    alone = calibrate_noise(target_epsilon=1.0, target_delta=1e-5, phases=[p3]).noise_multiplier
    full = calibrate_noise(target_epsilon=1.0, target_delta=1e-5, phases=[phase(1.0, 875)]).noise_multiplier
    assert both > alone
    assert both == pytest.approx(full, rel=2e-3)


def test_calibrate_rdp_needs_more_noise():
    p = [phase(1.0, 875)]
    pld = calibrate_noise(target_epsilon=1.0, target_delta=1e-5, phases=p).noise_multiplier
    rdp = calibrate_noise(target_epsilon=1.0, target_delta=1e-5, phases=p, accountant="rdp").noise_multiplier
    assert 1.05 < rdp / pld < 1.10


def test_calibrate_bad_target():
    with pytest.raises(InputError):
        calibrate_noise(target_epsilon=0.0, target_delta=1e-5, phases=[phase(1.0, 10)])


def test_epsilon_curve_is_monotone_and_ends_at_total():
    phases = [phase(8.0, 200), phase(4.0, 1000)]
    curve = epsilon_curve(phases, target_delta=1e-5, num_points=10)
    steps = [s for s, _ in curve]
    eps = [e for _, e in curve]
    assert steps[0] == 0 and eps[0] == 0.0 and 200 in steps and steps[-1] == 1200
    assert all(a <= b + 1e-9 for a, b in zip(eps, eps[1:]))
    assert eps[-1] == pytest.approx(compute_epsilon(phases, target_delta=1e-5), rel=1e-9)


@pytest.mark.parametrize("q,sigma,steps", [(0.5, 0.5, 100), (0.08, 1.5, 875), (0.08, 0.7, 875)])
def test_large_epsilon_grid_keeps_the_fine_grid_answer(q, sigma, steps):
    """Above epsilon ~ 2 the PLD grid coarsens with epsilon (memory and time grow with the loss range);
    the answer must stay that of dp-accounting's own 1e-4 grid to 1e-4 relative, and above it or at it
    within rounding (both are pessimistic upper bounds)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    ref.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    want = ref.get_epsilon(1e-5)
    got = compute_epsilon([DPPhase(sample_rate=q, noise_multiplier=sigma, steps=steps)], target_delta=1e-5)
    assert got == pytest.approx(want, rel=1e-4) and got >= want * (1 - 1e-6)


def test_small_epsilon_uses_the_requested_grid_exactly():
    """At the paper's setting (epsilon ~ 1) nothing changes: the 1e-4 grid itself."""
    from dprandp.accounting import PLD_FINE, _epsilon_estimate, _grid_scale

    phases = [DPPhase(sample_rate=4096 / 50000, noise_multiplier=9.3, steps=875)]
    assert _grid_scale(phases, _epsilon_estimate(phases, 1e-5)[0], PLD_FINE) == 1.0


@pytest.mark.parametrize("q,sigma,steps", [(0.1, 1.0, 10**6), (0.01, 1.0, 10**5), (0.5, 0.5, 10**5), (0.08, 0.7, 875)])
def test_pld_answer_is_never_looser_than_rdp(q, sigma, steps):
    """Both are certified upper bounds; at huge epsilon a coarse PLD grid is the looser one, so the answer
    is their minimum (before this, 0.1:1:1e6 gave 3.1e4 against RDP's 1.5e4)."""
    phases = [DPPhase(sample_rate=q, noise_multiplier=sigma, steps=steps)]
    pld = compute_epsilon(phases, target_delta=1e-5)
    rdp = compute_epsilon(phases, target_delta=1e-5, accountant="rdp")
    assert pld <= rdp * (1 + 1e-12)


def test_very_long_compositions_answer_fast_with_the_rdp_bound():
    """Past PLD_MAX_STEPS the PLD would take minutes (1e8 steps: ~10 min) for no tighter answer."""
    import time

    from dprandp.accounting import PLD_MAX_STEPS

    phases = [DPPhase(sample_rate=0.001, noise_multiplier=10.0, steps=PLD_MAX_STEPS + 1),
              DPPhase(sample_rate=0.001, noise_multiplier=10.0, steps=10**8)]
    start = time.perf_counter()
    eps = compute_epsilon(phases, target_delta=1e-5)
    assert time.perf_counter() - start < 30
    assert eps == compute_epsilon(phases, target_delta=1e-5, accountant="rdp")
    assert 4 < eps < 6  # RDP 4.74 at 1e8 steps alone


def test_steps_beyond_any_training_run_are_refused():
    from dprandp.accounting import MAX_STEPS

    DPPhase(sample_rate=0.1, noise_multiplier=1.0, steps=MAX_STEPS)
    with pytest.raises(InputError, match="steps"):
        DPPhase(sample_rate=0.1, noise_multiplier=1.0, steps=MAX_STEPS + 1)


def test_a_nan_epsilon_is_an_error_never_an_answer(monkeypatch):
    """`eps > target` is False for NaN, so a NaN epsilon would pass any budget check."""
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    phases = [DPPhase(sample_rate=0.08, noise_multiplier=9.3, steps=875)]
    rdp = compute_epsilon(phases, target_delta=1e-5, accountant="rdp")
    monkeypatch.setattr(pld_privacy_accountant.PLDAccountant, "get_epsilon", lambda self, delta: math.nan)
    assert compute_epsilon(phases, target_delta=1e-5) == rdp  # the other certified bound answers
    # RDP's conversion to epsilon, which both its accountant and dprandp's cached per-step RDP call
    monkeypatch.setattr(rdp_privacy_accountant, "compute_epsilon", lambda orders, rdp, delta: (math.nan, 2.0))
    with pytest.raises(InputError, match="cannot compute epsilon"):
        compute_epsilon(phases, target_delta=1e-5)


def test_a_delta_below_the_pld_truncation_gets_the_rdp_bound_not_infinity():
    """The PLD's truncated tails hold ~1e-15 of mass, so below that it answered epsilon = inf, and
    calibrate called epsilon = 1 at delta = 1e-20 unreachable. RDP has no such floor."""
    phases = [DPPhase(sample_rate=0.1, noise_multiplier=20.0, steps=10)]
    eps = compute_epsilon(phases, target_delta=1e-20)
    assert math.isfinite(eps) and eps == compute_epsilon(phases, target_delta=1e-20, accountant="rdp")
    pld = calibrate_noise(target_epsilon=1.0, target_delta=1e-20, phases=phases)
    rdp = calibrate_noise(target_epsilon=1.0, target_delta=1e-20, phases=phases, accountant="rdp")
    assert pld.epsilon <= 1.0 and pld.noise_multiplier <= rdp.noise_multiplier * (1 + 2e-3)
