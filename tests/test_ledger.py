"""The privacy ledger: durable records, grouping, torn lines, budget refusal, seeding, atomic writes."""

import json

import pytest

from dprandp.accounting import DPPhase, compute_epsilon
from dprandp.errors import InputError
from dprandp.pipeline import state as st
from dprandp.pipeline.ledger import PrivacyLedger, StepRecord, group_phases, spent_budget
from dprandp.pipeline.rundir import atomic_write_bytes, prepare_run_dir


def new(tmp_path, eps=2.0, deterministic=False):
    return PrivacyLedger.create(tmp_path, target_epsilon=eps, target_delta=1e-5, accountant="pld",
                                deterministic_noise=deterministic)


def add(ledger, n, q=0.05, sigma=1.5, phase="II", start=1):
    for i in range(n):
        ledger.record_step(phase=phase, step=start + i, sample_rate=q, noise_multiplier=sigma, max_grad_norm=1.0)


def test_records_are_on_disk_and_epsilon_matches_independent_composition(tmp_path):
    ledger = new(tmp_path)
    add(ledger, 3, phase="II")
    add(ledger, 2, phase="III", start=4)
    add(ledger, 3, sigma=2.0, phase="III", start=6)
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 8 and json.loads(lines[0])["kind"] == "run"
    steps = [json.loads(x) for x in lines[1:]]
    assert [s["phase"] for s in steps] == ["II"] * 3 + ["III"] * 5
    assert all({"sample_rate", "noise_multiplier", "max_grad_norm", "time", "step"} <= s.keys() for s in steps)
    # reference: the accountant on hand-written phases (II and III with equal sigma merge)
    ref = compute_epsilon([DPPhase(sample_rate=0.05, noise_multiplier=1.5, steps=5),
                           DPPhase(sample_rate=0.05, noise_multiplier=2.0, steps=3)], target_delta=1e-5)
    assert PrivacyLedger.open(tmp_path).epsilon() == pytest.approx(ref, rel=1e-12)


def test_group_phases_merges_only_consecutive_equal_records():
    recs = [StepRecord(phase="II", step=i, sample_rate=q, noise_multiplier=s, max_grad_norm=1.0, time=0.0)
            for i, (q, s) in enumerate([(0.1, 1.0), (0.1, 1.0), (0.1, 2.0), (0.1, 1.0)])]
    assert [(p.noise_multiplier, p.steps) for p in group_phases(recs)] == [(1.0, 2), (2.0, 1), (1.0, 1)]


def test_refuses_the_step_that_would_exceed_the_target(tmp_path):
    sigma, q = 3.0, 0.05  # epsilon 0.083, 0.106, 0.125, 0.140, 0.154 after 1..5 steps
    ledger = new(tmp_path, eps=0.15)
    n = 0
    while ledger.allows_next(sample_rate=q, noise_multiplier=sigma):
        add(ledger, 1, q=q, sigma=sigma, start=n + 1)
        n += 1
    over = compute_epsilon([DPPhase(sample_rate=q, noise_multiplier=sigma, steps=n + 1)], target_delta=1e-5)
    under = compute_epsilon([DPPhase(sample_rate=q, noise_multiplier=sigma, steps=n)], target_delta=1e-5)
    assert under <= 0.15 < over and n == 4


def test_plan_prefix_fast_path_then_exact_beyond_the_plan(tmp_path):
    q, sigma = 0.05, 3.0
    ledger = new(tmp_path, eps=0.15)
    plan_eps = ledger.set_plan([DPPhase(sample_rate=q, noise_multiplier=sigma, steps=2),
                                DPPhase(sample_rate=q, noise_multiplier=sigma, steps=1)])
    assert plan_eps == pytest.approx(compute_epsilon([DPPhase(sample_rate=q, noise_multiplier=sigma, steps=3)],
                                                     target_delta=1e-5))
    allowed = []
    for i in range(6):
        allowed.append(ledger.allows_next(sample_rate=q, noise_multiplier=sigma))
        if allowed[-1]:
            add(ledger, 1, q=q, sigma=sigma, start=i + 1)
    assert allowed == [True] * 4 + [False] * 2  # 3 planned + 1 more that still fits, then refused
    assert not ledger.allows_next(sample_rate=q, noise_multiplier=0.5)  # other noise: computed exactly
    assert ledger.epsilon() <= 0.15 <= ledger.epsilon_upper_bound() + 0.01
    assert ledger.epsilon_upper_bound() == pytest.approx(ledger.epsilon(), rel=0.01)


def test_torn_last_line_is_counted_conservatively(tmp_path):
    ledger = new(tmp_path)
    add(ledger, 4)
    with open(tmp_path / "ledger.jsonl", "ab") as f:
        f.write(b'{"kind": "step", "phase": "II", "ste')  # killed mid-write
    reopened = PrivacyLedger.open(tmp_path)
    assert reopened.steps == 5
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert all(json.loads(x) for x in lines) and json.loads(lines[-1])["recovered_torn_record"] is True


def test_spent_budget_reads_without_writing_and_never_reports_zero_for_unknown(tmp_path):
    assert spent_budget(tmp_path) is None  # no ledger
    ledger = new(tmp_path)
    assert spent_budget(tmp_path) is None  # a header, no step
    add(ledger, 4)
    ref = compute_epsilon([DPPhase(sample_rate=0.05, noise_multiplier=1.5, steps=5)], target_delta=1e-5)
    with open(tmp_path / "ledger.jsonl", "ab") as f:
        f.write(b'{"kind": "step", "phase": "II", "ste')  # killed mid-write: counted, as open() does
    before = (tmp_path / "ledger.jsonl").read_bytes()
    got = spent_budget(tmp_path)
    assert got["steps"] == 5 and got["delta"] == 1e-5 and got["epsilon"] == pytest.approx(ref, rel=1e-12)
    assert (tmp_path / "ledger.jsonl").read_bytes() == before
    text = before.decode().splitlines()
    text.insert(2, "garbage")
    (tmp_path / "ledger.jsonl").write_text("\n".join(text) + "\n")
    assert spent_budget(tmp_path) == {"steps": None, "epsilon": None, "delta": None}


def test_corrupt_middle_line_is_refused(tmp_path):
    ledger = new(tmp_path)
    add(ledger, 2)
    text = (tmp_path / "ledger.jsonl").read_text().splitlines()
    text.insert(2, "garbage")
    (tmp_path / "ledger.jsonl").write_text("\n".join(text) + "\n")
    with pytest.raises(InputError, match="corrupt"):
        PrivacyLedger.open(tmp_path)


def test_second_ledger_in_same_dir_is_refused(tmp_path):
    new(tmp_path)
    with pytest.raises(InputError, match="already exists"):
        new(tmp_path)


def test_noise_and_sampling_generators_are_secret_unless_deterministic():
    a = st.make_generators(1, deterministic_noise=False)
    b = st.make_generators(1, deterministic_noise=False)
    c = st.make_generators(1, deterministic_noise=True)
    d = st.make_generators(1, deterministic_noise=True)
    import torch

    draw = lambda g: torch.randn(4, generator=g)  # noqa: E731
    assert not torch.equal(draw(a["noise"]), draw(b["noise"]))
    assert not torch.equal(draw(a["sampling"]), draw(b["sampling"]))
    assert torch.equal(draw(a["augment"]), draw(b["augment"]))  # augmentation follows --seed
    assert torch.equal(draw(c["noise"]), draw(d["noise"]))
    assert not torch.equal(draw(st.make_generators(2, deterministic_noise=True)["noise"]),
                           draw(st.make_generators(1, deterministic_noise=True)["noise"]))


def test_secure_checkpoint_omits_private_generator_states(tmp_path):
    import torch

    model = torch.nn.Linear(2, 2)
    for deterministic in (False, True):
        gens = st.make_generators(0, deterministic_noise=deterministic)
        st.save_checkpoint(tmp_path, step=3, phase="II", model=model, optimizer=None, ema=None, generators=gens,
                           config={}, ledger_steps=3, deterministic_noise=deterministic, extra={})
        saved = st.load_checkpoint(tmp_path)["generators"]
        assert ("noise" in saved) == deterministic and ("sampling" in saved) == deterministic
        assert "augment" in saved


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")
    import os

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(InputError, match="No space left"):
        atomic_write_bytes(target, b"new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_run_dir_is_never_clobbered(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="already exists"):
        prepare_run_dir(tmp_path / "mine")
    with pytest.raises(InputError, match="not a dprandp run"):
        prepare_run_dir(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_ledger_write_failure_is_one_clear_error_and_keeps_the_records(tmp_path, monkeypatch):
    import os

    ledger = new(tmp_path)
    add(ledger, 2)
    before = (tmp_path / "ledger.jsonl").read_bytes()

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(InputError, match="No space left.*not applied"):
        add(ledger, 1, start=3)
    assert ledger.steps == 2  # the failed step is not counted in memory as applied ...
    monkeypatch.undo()
    assert (tmp_path / "ledger.jsonl").read_bytes()[: len(before)] == before  # ... and nothing earlier is lost
