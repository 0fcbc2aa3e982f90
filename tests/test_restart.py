"""Automatic continuation (``--auto-resume``; torchrun --max-restarts): the same command either
starts, continues, or reports a run, never spends a ledger's budget twice, and refuses a run
with other settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from pipeline_helpers import make_prior, tiny_flags, tiny_npz

from dprandp.errors import InputError
from dprandp.pipeline import preset
from dprandp.pipeline.ledger import PrivacyLedger
from dprandp.pipeline.restart import continue_or_start

STEPS, PHASE2, SIGMA = 10, 3, 3.0


def make_config(tmp_path, **kw):
    data, prior = tiny_npz(tmp_path / "t.npz"), make_prior(tmp_path / "p.pt")
    base = dict(dataset="npz", data=data, model="wrn-10-1", prior=prior, batch_size=16, augmult=2,
                physical_batch_size=16, steps=STEPS, phase2_steps=PHASE2, noise_multiplier=SIGMA,
                target_epsilon=50.0, checkpoint_every=4, eval_every=0, deterministic_noise=True)
    base.update(kw)
    return preset("demo", **base)


class Crash(BaseException):
    pass


def crash_after_step(monkeypatch, step):
    original = PrivacyLedger.record_step

    def record_then_crash(self, **kw):
        rec = original(self, **kw)
        if kw["step"] == step:
            raise Crash
        return rec

    monkeypatch.setattr(PrivacyLedger, "record_step", record_then_crash)
    return lambda: monkeypatch.setattr(PrivacyLedger, "record_step", original)


def step_lines(run_dir):
    return [x for x in (run_dir / "ledger.jsonl").read_text().splitlines() if json.loads(x)["kind"] == "step"]


def test_restart_continues_and_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    config = make_config(tmp_path)
    ref = continue_or_start(config, tmp_path / "ref", progress=False)  # absent: starts
    undo = crash_after_step(monkeypatch, 6)  # checkpoint at 4; steps 5-6 spent, then lost
    with pytest.raises(Crash):
        continue_or_start(config, tmp_path / "run", progress=False)
    undo()
    assert len(step_lines(tmp_path / "run")) == 6
    got = continue_or_start(config, tmp_path / "run", progress=False)  # the same command again
    assert got.summary["steps"] == STEPS + 2  # the two lost steps stay counted
    assert got.summary["steps_applied"] == STEPS == ref.summary["steps_applied"]
    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Complete: the same command reports the run and spends nothing more.
    before = (tmp_path / "run" / "ledger.jsonl").read_bytes()
    again = continue_or_start(config, tmp_path / "run", progress=False)
    assert again.summary == got.summary
    assert (tmp_path / "run" / "ledger.jsonl").read_bytes() == before


def test_other_settings_are_refused(tmp_path):
    torch.set_num_threads(1)
    config = make_config(tmp_path, steps=4, phase2_steps=1)
    continue_or_start(config, tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="other settings.*lr_phase3"):
        continue_or_start(config.replace(lr_phase3=0.123), tmp_path / "run", progress=False)


def test_spent_steps_without_checkpoint_are_never_started_over(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    config = make_config(tmp_path)
    undo = crash_after_step(monkeypatch, 2)
    with pytest.raises(Crash):
        continue_or_start(config, tmp_path / "run", progress=False)
    undo()
    (tmp_path / "run" / "checkpoint.pt").unlink()  # e.g. lost: the ledger still holds 2 spent steps
    with pytest.raises(InputError, match="refusing to start over"):
        continue_or_start(config, tmp_path / "run", progress=False)
    assert len(step_lines(tmp_path / "run")) == 2
    # With nothing spent (died before its first step), starting again is safe.
    header = [x for x in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines() if json.loads(x)["kind"] != "step"]
    (tmp_path / "run" / "ledger.jsonl").write_text("\n".join(header) + "\n")
    result = continue_or_start(config, tmp_path / "run", progress=False)
    assert result.summary["steps"] == STEPS


def test_torchrun_restart_env_implies_auto_resume_in_the_cli(tmp_path):
    data, prior = tiny_npz(tmp_path / "t.npz"), make_prior(tmp_path / "p.pt")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "dprandp", "train", *tiny_flags(data), "--prior", prior, "--steps", "3",
            "--phase2-steps", "1", "--eval-every", "0", "--threads", "1", "--out", str(out), "--json"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr
    refused = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 2 and "already exists" in refused.stderr  # a plain rerun never overwrites
    env = dict(os.environ, TORCHELASTIC_RESTART_COUNT="1")
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["epsilon"] == json.loads(first.stdout)["epsilon"]
    other = subprocess.run([*args, "--lr-phase3", "0.3"], capture_output=True, text=True, timeout=300, env=env,
                           check=False)
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "other settings" in other.stderr


def test_a_continuation_may_change_only_memory_settings(tmp_path, monkeypatch):
    """A run that ran out of memory continues with a smaller physical chunk (the same mechanism, the
    same ledger) and config.json records it; any setting of the mechanism is still refused."""
    torch.set_num_threads(1)
    config = make_config(tmp_path)
    undo = crash_after_step(monkeypatch, 6)
    with pytest.raises(Crash):
        continue_or_start(config, tmp_path / "run", progress=False)
    undo()
    logged = []
    smaller = config.replace(physical_batch_size=3, eval_batch_size=7)
    got = continue_or_start(smaller, tmp_path / "run", progress=False, log=logged.append)
    assert any("physical_batch_size = 3 (was 16)" in m and "eval_batch_size = 7 (was" in m for m in logged)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (saved["physical_batch_size"], saved["eval_batch_size"]) == (3, 7)
    assert got.summary["steps_applied"] == STEPS and got.summary["steps"] == STEPS + 2
    assert len(step_lines(tmp_path / "run")) == STEPS + 2
    with pytest.raises(InputError, match="other settings.*augmult"):
        continue_or_start(smaller.replace(augmult=1), tmp_path / "run", progress=False)
