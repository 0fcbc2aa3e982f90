"""The gradient-canary audit run through the real DP-SGD engine, and the ``dprandp audit`` CLI."""

import json
import math

import numpy as np
import pytest
import torch

from dprandp.audit.canaries import AuditConfig, canary_scores, run_audit
from dprandp.cli.main import main
from dprandp.errors import InputError


@pytest.fixture(scope="module")
def correct_report():
    """Default audit: noise calibrated by the accountant to epsilon = 2, 5000 canaries, 10 steps."""
    report = run_audit(AuditConfig(target_epsilon=2.0))
    print(f"\ncorrect engine: claimed {report.epsilon:.3f}, lower bound {report.epsilon_lower_bound:.3f}")
    return report


def test_correct_engine_at_epsilon_2_stays_below_the_claim(correct_report):
    r = correct_report
    assert r.epsilon <= 2.0 and r.noise_multiplier_used == r.noise_multiplier > 0
    assert r.epsilon_lower_bound <= r.epsilon
    assert r.passed
    # Not vacuous: the canaries do leak (as DP allows), and the audit sees some of it.
    assert r.epsilon_lower_bound > 0.0


def test_no_noise_is_caught_well_above_the_claim(correct_report):
    broken = run_audit(AuditConfig(noise_multiplier=correct_report.noise_multiplier, num_canaries=2000,
                                   insecure_no_noise=True))
    print(f"\nno noise: claimed {broken.epsilon:.3f}, lower bound {broken.epsilon_lower_bound:.3f}")
    assert broken.epsilon == pytest.approx(correct_report.epsilon, abs=1e-9)  # same claim...
    assert broken.noise_multiplier_used == 0.0
    assert broken.epsilon_lower_bound > 2 * broken.epsilon  # ...caught far above it
    assert not broken.passed


def test_broken_clipping_is_caught(correct_report, monkeypatch):
    # An engine whose clipping does nothing: canary gradients keep their norm 10 C.
    import dprandp.privacy.clipping as clipping

    monkeypatch.setattr(clipping, "clip_factors", lambda norms, c, margin=0.0: torch.ones_like(norms))
    broken = run_audit(AuditConfig(noise_multiplier=correct_report.noise_multiplier, num_canaries=2000))
    print(f"\nno clipping: claimed {broken.epsilon:.3f}, lower bound {broken.epsilon_lower_bound:.3f}")
    assert broken.epsilon_lower_bound > 2 * broken.epsilon


def test_scores_follow_the_subsampled_gaussian_mechanism():
    # Independent reference: an included canary is sampled Binomial(T, q) times and each step
    # adds N(0, sigma^2) to its score; an excluded canary's score is pure noise N(0, T sigma^2).
    m, steps, q, sigma = 4000, 10, 0.5, 2.0
    cfg = AuditConfig(num_canaries=m, steps=steps, sample_rate=q, noise_multiplier=sigma)
    rng = np.random.default_rng(1)
    included = rng.random(m) < 0.5
    signs = np.where(rng.random(m) < 0.5, -1.0, 1.0)
    scores = canary_scores(
        config=cfg, noise_multiplier=sigma, included=included, signs=signs,
        sampler_generator=torch.Generator().manual_seed(2), noise_generator=torch.Generator().manual_seed(3),
    )
    s_in, s_out = scores[included], scores[~included]
    var_in = steps * q * (1 - q) + steps * sigma**2
    var_out = steps * sigma**2
    assert abs(s_in.mean() - steps * q) < 4 * math.sqrt(var_in / s_in.size)
    assert abs(s_out.mean()) < 4 * math.sqrt(var_out / s_out.size)
    # Sample variances within ~4 standard errors (sd of a sample variance ~ var * sqrt(2 / n)).
    assert s_in.var() == pytest.approx(var_in, rel=4 * math.sqrt(2 / s_in.size))
    assert s_out.var() == pytest.approx(var_out, rel=4 * math.sqrt(2 / s_out.size))


def test_config_rejects_bad_values():
    for kwargs in [dict(target_epsilon=0.0), dict(target_delta=1.0), dict(num_canaries=1), dict(steps=0),
                   dict(sample_rate=1.5), dict(noise_multiplier=-1.0), dict(confidence=1.0), dict(seed=-1)]:
        with pytest.raises(InputError):
            AuditConfig(**kwargs)


# ---------------------------------------------------------------------------------------- CLI
def run_cli(capsys, *args):
    """``dprandp audit ARGS`` in this process (the same entry point as the console script)."""
    with pytest.raises(SystemExit) as exc:
        main(["audit", *args])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_cli_json(capsys):
    code, out, err = run_cli(capsys, "--noise-multiplier", "3", "--canaries", "1000", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert {"epsilon", "epsilon_lower_bound", "delta", "num_canaries", "steps", "passed"} <= report.keys()
    assert report["num_canaries"] == 1000 and report["passed"] is True
    assert 0.0 <= report["epsilon_lower_bound"] <= report["epsilon"]


def test_cli_insecure_mode_fails_with_status_1(capsys):
    code, out, err = run_cli(capsys, "--insecure-no-noise", "--noise-multiplier", "3", "--canaries", "1000")
    assert code == 1
    assert "WARNING" in out and "FAIL" in out


@pytest.mark.parametrize("args, fragment", [
    (["--epsilon", "0"], "epsilon"),
    (["--epsilon", "nan"], "epsilon"),
    (["--epsilon", "2", "--noise-multiplier", "3"], "not both"),
    (["--delta", "1"], "delta"),
    (["--canaries", "1"], "canaries"),
    (["--steps", "0"], "steps"),
    (["--steps", "x"], "steps"),
    (["--sample-rate", "0"], "sample-rate"),
    (["--confidence", "2"], "confidence"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, args, fragment):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err


def test_cli_a_claim_above_the_ceiling_is_inconclusive_not_a_pass(capsys):
    """At epsilon = 8, 5000 canaries cannot show more than ~6.4: even the engine run WITHOUT noise
    passed with exit 0 (found in review). Now: INCONCLUSIVE, exit 3, `conclusive: false` in JSON."""
    code, out, _ = run_cli(capsys, "--epsilon", "8", "--insecure-no-noise")
    assert code == 3 and "INCONCLUSIVE" in out and "PASS" not in out
    code, out, _ = run_cli(capsys, "--epsilon", "8", "--canaries", "1000", "--json")
    report = json.loads(out)
    assert code == 3 and report["passed"] is True and report["conclusive"] is False
    assert report["epsilon"] >= report["max_detectable_epsilon"]


def test_cli_refuses_canaries_that_cannot_show_any_epsilon(capsys):
    code, _, err = run_cli(capsys, "--canaries", "2", "--steps", "3", "--insecure-no-noise")
    assert code == 2 and "2 canaries cannot show any epsilon > 0" in err and err.count("\n") == 1


def test_statistics_refuse_a_bad_tolerance_or_confidence():
    import numpy as np

    from dprandp.audit.statistics import audit_scores, epsilon_lower_bound
    from dprandp.errors import InputError

    kw = dict(num_canaries=1000, num_guesses=200, num_correct=150, delta=0.0)
    assert epsilon_lower_bound(**kw) == pytest.approx(0.8214, abs=1e-3)
    for tol in (0.0, float("nan"), -1.0):  # 0 searched forever, nan returned 0
        with pytest.raises(InputError, match="tol must be"):
            epsilon_lower_bound(**kw, tol=tol)
    inc = np.arange(1000) % 2 == 0
    for confidence in (0.0, -1.0, -50.0, 1.0):  # 0 and -1 gave bounds; -50 named -7.5
        with pytest.raises(InputError, match=f"confidence must be in \\(0, 1\\), got {confidence}"):
            audit_scores(inc.astype(float), inc, delta=0.0, confidence=confidence)
