"""The accounting commands through the real console entry point."""

import json
import subprocess
import sys

import pytest


def dprandp(*args):
    return subprocess.run([sys.executable, "-m", "dprandp", *args], capture_output=True, text=True)


def test_epsilon_json():
    r = dprandp("epsilon", "--phase", "0.08192:9.3:875", "--delta", "1e-5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["epsilon"] == pytest.approx(0.978, abs=0.01) and out["bound"] == "pld"


def test_epsilon_names_the_rdp_bound_when_it_answers_and_stays_quiet():
    """Past 1e6 steps the PLD answer is the RDP bound: the output says so, and RDP's dropped-order
    warnings (one absl line per order) stay out of stderr."""
    r = dprandp("epsilon", "--phase", "0.1:1:2000000", "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    out = json.loads(r.stdout)
    assert out["accountant"] == "pld" and out["bound"] == "rdp" and out["epsilon"] > 1e4
    text = dprandp("epsilon", "--phase", "0.1:1:2000000")
    assert "RDP bound" in text.stdout and text.stderr == ""


def test_epsilon_two_phases_both_accountants():
    args = ["epsilon", "--phase", "0.08192:8:200", "--phase", "0.08192:4:1000", "--delta", "1e-5", "--json"]
    assert json.loads(dprandp(*args).stdout)["epsilon"] == pytest.approx(2.821, abs=0.01)
    assert json.loads(dprandp(*args, "--accountant", "rdp").stdout)["epsilon"] == pytest.approx(3.064, abs=0.01)


def test_calibrate_json():
    r = dprandp("calibrate", "--epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.08192", "--steps", "875", "--json")
    out = json.loads(r.stdout)
    assert 9.05 <= out["noise_multiplier"] <= 9.25
    assert 0.99 <= out["epsilon"] <= 1.0


@pytest.mark.parametrize("args, fragment", [
    (["calibrate", "--epsilon", "0", "--sample-rate", "0.1", "--steps", "10"], "epsilon"),
    (["calibrate", "--epsilon", "-1", "--sample-rate", "0.1", "--steps", "10"], "epsilon"),
    (["calibrate", "--epsilon", "1", "--delta", "1", "--sample-rate", "0.1", "--steps", "10"], "delta"),
    (["calibrate", "--epsilon", "1", "--delta", "0", "--sample-rate", "0.1", "--steps", "10"], "delta"),
    (["calibrate", "--epsilon", "1", "--sample-rate", "1.5", "--steps", "10"], "sample-rate"),
    (["calibrate", "--epsilon", "1", "--sample-rate", "0.1", "--steps", "0"], "steps"),
    (["epsilon", "--phase", "0.1:1"], "Q:SIGMA:STEPS"),
    (["epsilon", "--phase", "a:b:c"], "numbers"),
    (["epsilon", "--phase", "1.5:1:10"], "sample_rate"),
    (["epsilon", "--phase", "0.1:1:0"], "STEPS"),
    (["epsilon", "--phase", "0.1:1:10", "--delta", "2"], "delta"),
    (["epsilon", "--phase", "0.1:1:10", "--accountant", "foo"], "accountant"),
    (["epsilon", "--phase", "0.1:1:1e30"], "steps"),
    (["epsilon", "--phase", "0.1:1:1e300"], "at most 1e+09 steps, got 1e+300"),  # was a 300-digit integer
    (["calibrate", "--epsilon", "1", "--sample-rate", "1e-300", "--steps", "10"], "sample_rate"),  # hung
    (["epsilon", "--phase", "0.5:1e300:10"], "noise multiplier"),  # sigma**2 overflowed: a traceback
    (["calibrate", "--epsilon", "1", "--sample-rate", "0.1", "--steps", "10000000000000"], "steps"),
    (["calibrate", "--epsilon", "1e9", "--sample-rate", "0.1", "--steps", "10"], "epsilon"),
    (["audit", "--epsilon", "1e9", "--steps", "1", "--canaries", "10"], "epsilon"),
])
def test_bad_input_one_line_exit_2(args, fragment):
    r = dprandp(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert fragment in lines[0] and "Traceback" not in r.stderr


def test_a_vanishing_noise_multiplier_answers_infinity_quietly():
    """sigma = 1e-300 raised a traceback (sigma**2 underflowed in the PLD grid estimate)."""
    r = dprandp("epsilon", "--phase", "1:1e-300:10")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("epsilon = inf")


def test_json_output_is_strict_json_with_non_finite_numbers_as_strings(capsys):
    """Python writes NaN/Infinity tokens that jq and other JSON readers reject; --json never does,
    at any depth of the object."""
    from dprandp.cli.options import emit_json

    emit_json({"epsilon": float("inf"), "runs": [{"loss": float("nan")}, {"loss": 1.5}], "pair": (float("-inf"), 2)})
    text = capsys.readouterr().out

    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    out = json.loads(text, parse_constant=refuse)
    assert out == {"epsilon": "inf", "runs": [{"loss": "nan"}, {"loss": 1.5}], "pair": ["-inf", 2]}


def test_an_infinite_epsilon_is_the_string_inf_in_json():
    r = dprandp("epsilon", "--phase", "1:1e-300:10", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["epsilon"] == "inf"
