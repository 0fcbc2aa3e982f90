"""Crash safety: SIGKILL a training subprocess mid-phase, resume it, check the privacy ledger.

With --deterministic-noise the resumed run must end with exactly the weights of an uninterrupted
run (generator states are checkpointed; steps the killed process spent after its last
checkpoint are recomputed identically), and the ledger must still count every step the killed
process recorded. With no budget slack, lost steps make the resumed run stop early instead of
overshooting the target epsilon.
"""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from pipeline_helpers import make_prior, tiny_flags, tiny_npz

from dprandp.accounting import DPPhase, compute_epsilon
from dprandp.pipeline.ledger import PrivacyLedger

SIGMA, STEPS, PHASE2 = 3.0, 12, 4


def cli(*args):
    return [sys.executable, "-m", "dprandp", *args]


def train_args(data, prior, out, *, epsilon, checkpoint_every):
    return ["train", *tiny_flags(data), "--prior", prior, "--steps", str(STEPS), "--phase2-steps", str(PHASE2),
            "--noise-multiplier", str(SIGMA), "--epsilon", str(epsilon), "--checkpoint-every",
            str(checkpoint_every), "--eval-every", "0", "--deterministic-noise", "--seed", "7",
            "--threads", "1", "--out", str(out)]


def ledger_step_count(run_dir):
    path = run_dir / "ledger.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_bytes().split(b"\n") if b'"kind": "step"' in line)


def kill_when(proc, run_dir, steps, timeout=240):
    """SIGKILL ``proc`` as soon as its ledger holds ``steps`` records (mid Phase III)."""
    start = time.time()
    while ledger_step_count(run_dir) < steps:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() - start < timeout, "the run made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def state_dict(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def check_files_parse(run_dir):
    for name in ("config.json", "summary.json"):
        json.loads((run_dir / name).read_text())
    for name in ("ledger.jsonl", "metrics.jsonl"):
        for line in (run_dir / name).read_text().splitlines():
            json.loads(line)
    assert not list(run_dir.glob(".*.tmp"))


def ledger_epsilon_reference(run_dir, delta=1e-5):
    """Independent recount: every step line of the ledger, grouped by hand."""
    lines = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "step"]
    assert {(s["sample_rate"], s["noise_multiplier"]) for s in steps} == {(16 / 64, SIGMA)}
    return len(steps), compute_epsilon([DPPhase(sample_rate=0.25, noise_multiplier=SIGMA, steps=len(steps))],
                                       target_delta=delta)


@pytest.mark.slow
def test_sigkill_mid_phase_then_resume_equals_uninterrupted(tmp_path):
    data, prior = tiny_npz(tmp_path / "t.npz"), make_prior(tmp_path / "p.pt")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.Popen(cli(*train_args(data, prior, ref_dir, epsilon=5, checkpoint_every=3)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = subprocess.Popen(cli(*train_args(data, prior, run_dir, epsilon=5, checkpoint_every=3)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(victim, run_dir, PHASE2 + 4)  # in Phase III, 1-2 steps after the checkpoint at step 6
    assert not (run_dir / "summary.json").exists()
    killed_ledger = PrivacyLedger.open(run_dir)
    recorded = killed_ledger.steps
    assert recorded >= PHASE2 + 4
    resumed = subprocess.run(cli("train", "--resume", str(run_dir), "--threads", "1", "--no-progress", "--json"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert ref.wait(timeout=300) == 0
    check_files_parse(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    n, eps = ledger_epsilon_reference(run_dir)
    lost = recorded - 6  # the last checkpoint before the kill was at step 6
    assert n == STEPS + lost >= STEPS and summary["steps"] == n and summary["steps_applied"] == STEPS
    assert summary["epsilon"] == pytest.approx(eps, rel=1e-9) and summary["epsilon"] <= 5
    assert json.loads(resumed.stdout)["epsilon"] == summary["epsilon"]
    assert any(json.loads(x)["kind"] == "resume" for x in (run_dir / "ledger.jsonl").read_text().splitlines())
    ref_state, got_state = state_dict(ref_dir / "model.pt"), state_dict(run_dir / "model.pt")
    assert ref_state.keys() == got_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], got_state[k]), k


def test_lost_steps_stay_counted_and_the_run_stops_at_the_target(tmp_path, monkeypatch):
    """In process: the 'crash' strikes right after step 8 is in the ledger, before its update,
    with the last checkpoint at step 5: steps 6-8 were spent but are lost."""
    from dprandp.pipeline import preset, resume, train
    from dprandp.pipeline.ledger import PrivacyLedger as Ledger

    torch.set_num_threads(1)
    data, prior = tiny_npz(tmp_path / "t.npz"), make_prior(tmp_path / "p.pt")
    target = compute_epsilon([DPPhase(sample_rate=0.25, noise_multiplier=SIGMA, steps=STEPS)], target_delta=1e-5)
    target = float(f"{target:.6f}") + 1e-6  # no slack: exactly the planned steps fit
    config = preset("demo", dataset="npz", data=data, model="wrn-10-1", prior=prior, batch_size=16, augmult=2,
                    physical_batch_size=16, steps=STEPS, phase2_steps=PHASE2, noise_multiplier=SIGMA,
                    target_epsilon=target, checkpoint_every=5, eval_every=0, deterministic_noise=True)

    class Crash(BaseException):
        pass

    original = Ledger.record_step

    def record_then_crash(self, **kw):
        rec = original(self, **kw)
        if kw["step"] == 8:
            raise Crash
        return rec

    monkeypatch.setattr(Ledger, "record_step", record_then_crash)
    with pytest.raises(Crash):
        train(config, out=tmp_path / "run", progress=False)
    monkeypatch.setattr(Ledger, "record_step", original)
    run_dir = tmp_path / "run"
    assert PrivacyLedger.open(run_dir).steps == 8
    result = resume(run_dir, progress=False)
    check_files_parse(run_dir)
    summary = result.summary
    n, eps = ledger_epsilon_reference(run_dir)
    assert n == STEPS == summary["steps"]  # the budget held exactly the planned steps; lost ones used part
    assert summary["steps_applied"] == 5 + (STEPS - 8) < STEPS
    assert summary["epsilon"] == pytest.approx(eps, rel=1e-9) and eps <= target
    assert "stopped after" in summary["stopped_early"]
    assert "lost in a crash" in (run_dir / "report.html").read_text()
