"""Review 26: the PLD grid at small epsilon, the RDP bound always, the ledger's per-step bound, the
`dprandp epsilon` reason for an RDP answer, and malformed ledgers.

References are dp-accounting itself, called directly (not through dprandp.accounting)."""

import json
import math
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from dprandp.accounting import DPPhase, calibrate_noise, compute_epsilon, epsilon_bound
from dprandp.errors import InputError
from dprandp.pipeline.ledger import PrivacyLedger, StepRecord, spent_budget

Q = 4096 / 50000


def reference_pld(q, sigma, steps, *, grid, delta=1e-5):
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=grid)
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(delta)


def reference_rdp(q, sigma, steps, *, delta=1e-5):
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(delta)


# ----------------------------------------------------------------------------- 1. small epsilon


@pytest.mark.parametrize("q,sigma,steps", [(0.001, 20.5, 10**5), (0.004, 20.0, 5000), (Q, 1000.0, 875)])
def test_small_epsilon_pld_is_as_tight_as_a_fine_dp_accounting_grid(q, sigma, steps):
    """A fixed 1e-4 grid cannot resolve one step's privacy loss when epsilon / sqrt(steps) is small:
    0.001:20.5:1e5 gave 0.0590 (above RDP's 0.0500) where a 1e-6 grid gives 0.0441."""
    ours = compute_epsilon([DPPhase(sample_rate=q, noise_multiplier=sigma, steps=steps)], target_delta=1e-5)
    fine = reference_pld(q, sigma, steps, grid=1e-6)
    assert ours == pytest.approx(fine, rel=1e-3)
    assert ours < reference_rdp(q, sigma, steps)


def test_small_epsilon_calibration_is_not_looser_than_rdp_and_stays_within_the_target():
    """`dprandp calibrate --epsilon 0.05 --sample-rate 0.001 --steps 100000` gave sigma 26.80 with the PLD
    and 20.50 with --accountant rdp; the PLD needs less noise than RDP, and 0.2 % less overshoots."""
    phases = [DPPhase(sample_rate=0.001, noise_multiplier=1.0, steps=10**5)]
    pld = calibrate_noise(target_epsilon=0.05, target_delta=1e-5, phases=phases)
    rdp = calibrate_noise(target_epsilon=0.05, target_delta=1e-5, phases=phases, accountant="rdp")
    assert pld.noise_multiplier < rdp.noise_multiplier < 21
    assert pld.epsilon <= 0.05 and reference_pld(0.001, pld.noise_multiplier, 10**5, grid=1e-6) <= 0.05
    assert compute_epsilon([phases[0].with_noise(pld.noise_multiplier * 0.998)], target_delta=1e-5) > 0.05


def test_the_rdp_bound_answers_wherever_it_is_smaller(monkeypatch):
    """Both are certified upper bounds, so the smaller one is reported; RDP was only computed above
    an epsilon estimate of 20, so a loose PLD at small epsilon was reported as it was."""
    from dprandp.accounting import explain_epsilon

    phases = [DPPhase(sample_rate=Q, noise_multiplier=9.3, steps=875)]
    rdp = reference_rdp(Q, 9.3, 875)
    monkeypatch.setattr(pld_privacy_accountant.PLDAccountant, "get_epsilon", lambda self, delta: 2.0)
    report = explain_epsilon(phases, target_delta=1e-5)
    assert report.epsilon == pytest.approx(rdp, rel=1e-12) and report.bound == "rdp"
    assert report.reason == "smaller than the PLD here"
    assert epsilon_bound(phases, target_delta=1e-5) == (report.epsilon, "rdp")


def test_the_paper_setting_keeps_its_grid_and_reference_values():
    """One step's loss at the paper's setting is ~0.04, well above 1e-4 / PLD_RESOLUTION: nothing changes."""
    from dprandp.accounting import PLD_FINE, pld_interval

    phases = [DPPhase(sample_rate=Q, noise_multiplier=9.3, steps=875)]
    assert pld_interval(phases, target_delta=1e-5) == PLD_FINE
    assert compute_epsilon(phases, target_delta=1e-5) == pytest.approx(reference_pld(Q, 9.3, 875, grid=1e-4),
                                                                       rel=1e-12)


# ----------------------------------------------------------------------------- 2. the ledger's bound


def ledger_with(tmp_path, q, sigma, steps, *, target=100.0, delta=1e-5):
    ledger = PrivacyLedger.create(tmp_path, target_epsilon=target, target_delta=delta, accountant="pld",
                                  deterministic_noise=False)
    ledger.records = [StepRecord(phase="II", step=i + 1, sample_rate=q, noise_multiplier=sigma,
                                 max_grad_norm=1.0, time=0.0) for i in range(steps)]
    return ledger


def test_the_per_step_bound_of_a_calibrated_run_never_crosses_its_target(tmp_path):
    """Target 0.5 at the paper's q and steps: the coarse bound said 0.50193 at the last step while the
    summary said 0.499998. The last step is now epsilon() itself, and every prefix is capped by the plan."""
    plan = [DPPhase(sample_rate=Q, noise_multiplier=1.0, steps=875)]
    sigma = calibrate_noise(target_epsilon=0.5, target_delta=1e-5, phases=plan).noise_multiplier
    ledger = ledger_with(tmp_path, Q, sigma, 0, target=0.5)
    planned = ledger.set_plan([plan[0].with_noise(sigma)])
    assert planned <= 0.5
    rec = StepRecord(phase="II", step=1, sample_rate=Q, noise_multiplier=sigma, max_grad_norm=1.0, time=0.0)
    for n in (1, 100, 870, 874):
        ledger.records = [rec] * n
        bound = ledger.epsilon_upper_bound()
        fine = compute_epsilon(ledger.phases(), target_delta=1e-5)
        assert bound <= planned and bound == pytest.approx(fine, rel=2e-3)
    ledger.records = [rec] * 875
    assert ledger.epsilon_upper_bound() == ledger.epsilon() == planned


@pytest.mark.parametrize("q,sigma,steps", [(0.004, 20.0, 5000), (0.001, 26.8, 20000)])
def test_the_per_step_bound_is_close_at_small_epsilon(tmp_path, q, sigma, steps):
    """It was 2-5x epsilon() here (a fixed 1e-3 grid): 0.0857 against 0.0410 at 0.004:20:5000."""
    ledger = ledger_with(tmp_path, q, sigma, steps)
    bound = ledger.epsilon_upper_bound()
    fine = reference_pld(q, sigma, steps, grid=1e-6)
    assert bound == pytest.approx(fine, rel=5e-3) and bound >= fine * (1 - 1e-3)


def test_the_per_step_bound_is_finite_below_the_pld_tail_mass(tmp_path):
    """At delta = 1e-16 the PLD alone says inf; epsilon() said 7.46 (the RDP bound)."""
    ledger = ledger_with(tmp_path, Q, 3.0, 875, delta=1e-16)
    bound = ledger.epsilon_upper_bound()
    assert math.isfinite(bound) and bound == pytest.approx(compute_epsilon(ledger.phases(), target_delta=1e-16))


def test_the_per_step_bound_builds_a_step_pld_only_for_a_handful_of_grids(tmp_path, monkeypatch):
    """Its grid follows epsilon as steps add up, rounded to powers of 2: each step PLD is built a few
    times over a run, not once per step (0.1-1 s each at small noise)."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    built = []
    real = pld_lib.from_gaussian_mechanism
    monkeypatch.setattr(pld_lib, "from_gaussian_mechanism", lambda *a, **k: built.append(1) or real(*a, **k))
    ledger = ledger_with(tmp_path, 0.004, 20.0, 0)
    rec = StepRecord(phase="II", step=1, sample_rate=0.004, noise_multiplier=20.0, max_grad_norm=1.0, time=0.0)
    for n in range(50, 5001, 50):
        ledger.records = [rec] * n
        ledger.epsilon_upper_bound()
    assert len(built) <= 6


def test_grouping_the_records_builds_one_phase_per_run_of_equal_steps(monkeypatch):
    """The ledger groups all its records after every step; one validated DPPhase per record took
    0.3 s a step at 1e5 records, more than the accounting itself."""
    from dprandp.pipeline import ledger as ledger_module

    built = []

    class Counting(DPPhase):
        def __post_init__(self):
            built.append(1)
            super().__post_init__()

    monkeypatch.setattr(ledger_module, "DPPhase", Counting)
    recs = [StepRecord(phase="II", step=i, sample_rate=0.1, noise_multiplier=s, max_grad_norm=1.0, time=0.0)
            for i, s in enumerate([1.0] * 500 + [2.0] * 300 + [1.0] * 200)]
    phases = ledger_module.group_phases(recs)
    assert [(p.noise_multiplier, p.steps) for p in phases] == [(1.0, 500), (2.0, 300), (1.0, 200)]
    assert len(built) == 3


# ----------------------------------------------------------------------------- 3. dprandp epsilon


def dprandp(*args):
    return subprocess.run([sys.executable, "-m", "dprandp", *args], capture_output=True, text=True, check=True)


def test_epsilon_says_the_pld_was_not_computed_past_a_million_steps():
    """It said the RDP bound was "the smaller here", but the PLD was never computed (it is 7 % tighter)."""
    out = json.loads(dprandp("epsilon", "--phase", "0.001:1.0:1500000", "--json").stdout)
    assert out["bound"] == "rdp" and out["reason"] == "the PLD is not computed past 1e6 steps"
    text = dprandp("epsilon", "--phase", "0.001:1.0:1500000").stdout
    assert "RDP bound (the PLD is not computed past 1e6 steps)" in text and "smaller" not in text
    out = json.loads(dprandp("epsilon", "--phase", "0.08192:9.3:875", "--json").stdout)
    assert out["bound"] == "pld" and out["reason"] is None


# ----------------------------------------------------------------------------- 4. malformed ledgers

STEP = {"kind": "step", "phase": "II", "step": 1, "sample_rate": 0.1, "noise_multiplier": 5.0, "max_grad_norm": 1.0,
        "time": 0.0}
HEADER = {"kind": "run", "target_epsilon": 1.0, "target_delta": 1e-5}

MALFORMED = {
    "header without target_delta": ([{"kind": "run", "target_epsilon": 1}, STEP], "no target_delta"),
    "header delta 0": ([{**HEADER, "target_delta": 0}, STEP], "target_delta must be a number in (0, 1), got 0"),
    "header unknown accountant": ([{**HEADER, "accountant": "xyz"}, STEP], "accountant must be one of pld, rdp"),
    "step with a string sigma": ([HEADER, {**STEP, "noise_multiplier": "5"}],
                                 "line 2: noise_multiplier must be a number, got '5'"),
    "step with a negative q": ([HEADER, {**STEP, "sample_rate": -0.1}], "line 2: sample_rate must be 0 or in"),
    "step without its time": ([HEADER, {k: v for k, v in STEP.items() if k != "time"}], "line 2: no time"),
    "step number true": ([HEADER, {**STEP, "step": True}], "line 2: step must be an integer"),
}


def write_ledger(tmp_path, lines):
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.parametrize("name", list(MALFORMED))
def test_spent_budget_of_a_malformed_ledger_counts_its_steps_and_never_raises(tmp_path, name):
    """A header without target_delta raised a raw KeyError, a string sigma an InputError without the
    ledger's name, out of --overwrite; the spend is unknown, not zero."""
    lines, _ = MALFORMED[name]
    write_ledger(tmp_path, lines)
    before = (tmp_path / "ledger.jsonl").read_bytes()
    assert spent_budget(tmp_path) == {"steps": 1, "epsilon": None, "delta": None}
    assert (tmp_path / "ledger.jsonl").read_bytes() == before


@pytest.mark.parametrize("name", list(MALFORMED))
def test_opening_a_malformed_ledger_is_one_line_naming_the_file_and_the_problem(tmp_path, name):
    lines, problem = MALFORMED[name]
    write_ledger(tmp_path, lines)
    with pytest.raises(InputError) as err:
        PrivacyLedger.open(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "ledger.jsonl") in message and problem in message and "\n" not in message


def test_a_well_formed_ledger_still_reads(tmp_path):
    write_ledger(tmp_path, [HEADER, STEP, {**STEP, "step": 2, "noise_multiplier": 5}])
    ledger = PrivacyLedger.open(tmp_path)
    assert ledger.steps == 2 and len(ledger.phases()) == 1  # a JSON integer 5 is the same noise as 5.0
    assert spent_budget(tmp_path)["steps"] == 2


def test_the_cached_rdp_bound_is_dp_accountings_own_and_survives_a_version_without_its_private_curve(monkeypatch):
    """rdp_bound adds cached one-step RDP curves (read from dp-accounting's private ``_rdp``); it must
    equal RdpAccountant on the whole composed event, and fall back to that where ``_rdp`` is gone."""
    from dp_accounting.rdp import rdp_privacy_accountant

    from dprandp import accounting
    from dprandp.accounting import DPPhase, composed_event, rdp_bound

    phases = [DPPhase(sample_rate=0.02, noise_multiplier=1.5, steps=60),
              DPPhase(sample_rate=0.02, noise_multiplier=2.0, steps=240)]
    reference = rdp_privacy_accountant.RdpAccountant()
    reference.compose(composed_event(phases))
    expected = float(reference.get_epsilon(1e-5))
    assert rdp_bound(phases, 1e-5) == pytest.approx(expected, rel=1e-12)

    def no_private_curve(q, sigma):
        raise AttributeError("'RdpAccountant' object has no attribute '_rdp'")

    monkeypatch.setattr(accounting, "_step_rdp", no_private_curve)
    assert rdp_bound(phases, 1e-5) == pytest.approx(expected, rel=1e-12)


def test_the_per_step_bound_keeps_its_step_pld_small_at_low_noise(tmp_path):
    """Found in review: at sigma < 1 the grid followed a Gaussian estimate of epsilon that is far too low, and a
    million-point step PLD was self-composed after every step (0.6 s per step). The ledger's grid now keeps a
    step PLD under 1e5 points; the bound stays an upper bound close to the fine epsilon."""
    from dprandp.accounting import step_loss_range
    from dprandp.pipeline.ledger import PrivacyLedger, StepRecord

    ledger = PrivacyLedger.create(tmp_path, target_epsilon=100, target_delta=1e-5, accountant="pld",
                                  deterministic_noise=False)
    ledger.records.extend([StepRecord(phase="II", step=1, sample_rate=1e-4, noise_multiplier=0.6, max_grad_norm=1.0,
                                      time=0.0)] * 400)
    bound = ledger.epsilon_upper_bound()
    for (_, _, interval) in ledger._step_plds:
        assert step_loss_range(0.6) / interval <= 1e5
    assert ledger.epsilon() <= bound <= ledger.epsilon() * 1.01
