"""bench/breastmnist.py: selection on validation only, and the feature cache the sweeps share."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pipeline_helpers import make_prior

from bench import breastmnist


def record(arm, hp, *, val_auc, val_acc=0.5, test_auc=0.5, seed=0, stage="tune", eps=1.0):
    return dict(arm=arm, stage=stage, epsilon_target=eps, seed=seed, hp=hp, wall_s=60.0,
                val={"accuracy": val_acc, "balanced_accuracy": 0.5, "auc": val_auc},
                test={"accuracy": 0.7, "balanced_accuracy": 0.6, "auc": test_auc}, command=f"cmd {arm} {seed}")


def test_best_reads_validation_auc_then_accuracy_never_test():
    runs = [record("lp", {"lr_phase2": 1}, val_auc=0.70, test_auc=0.99),
            record("lp", {"lr_phase2": 2}, val_auc=0.80, val_acc=0.6, test_auc=0.10),
            record("lp", {"lr_phase2": 4}, val_auc=0.80, val_acc=0.7, test_auc=0.20),
            record("lp", {"lr_phase2": 8}, val_auc=None, val_acc=0.9)]
    assert breastmnist.best(runs) == {"lr_phase2": 4}


def test_sweep_tunes_on_seed_zero_then_runs_every_seed_of_the_choice(monkeypatch):
    calls = []

    def fake_run(arm, eps, seed, hp, a, data, stage):
        calls.append((arm, seed, dict(hp), stage))
        # the validation AUC prefers pool 4 with lr_II 2, lr_III 0.5 for randp and 2 for scratch
        good = {("lp", 4, 2.0): 0.9, ("randp", 0.5): 0.8, ("scratch", 2.0): 0.7}
        key = (arm, hp.get("head_pool"), hp.get("lr_phase2")) if arm == "lp" else (arm, hp.get("lr_phase3"))
        return record(arm, hp, val_auc=good.get(key, 0.5), seed=seed, stage=stage)

    monkeypatch.setattr(breastmnist, "run_dp", fake_run)
    a = SimpleNamespace(head_pool=[1, 4], lr_phase2=[2.0, 8.0], lr_phase3=[0.5, 2.0], lr_scratch=[0.5, 2.0],
                        seeds=[0, 1, 2], arms=["lp", "randp", "scratch"])
    breastmnist.sweep_epsilon(1.0, a, None, lambda r: r)
    tune = [c for c in calls if c[3] == "tune"]
    assert all(seed == 0 for _, seed, _, _ in tune) and len(tune) == 4 + 2 + 2
    # randp and scratch are tuned on the linear probe's pooling grid; randp keeps its lr_II
    assert {c[2]["head_pool"] for c in tune if c[0] != "lp"} == {4}
    assert all(c[2]["lr_phase2"] == 2.0 for c in tune if c[0] == "randp")
    final = {(arm, seed): hp for arm, seed, hp, stage in calls if stage == "final"}
    assert final == {**{("lp", s): {"head_pool": 4, "lr_phase2": 2.0} for s in (0, 1, 2)},
                     **{("randp", s): {"head_pool": 4, "lr_phase2": 2.0, "lr_phase3": 0.5} for s in (0, 1, 2)},
                     **{("scratch", s): {"head_pool": 4, "lr_phase3": 2.0} for s in (0, 1, 2)}}


def test_table_reports_the_final_runs_only():
    rs = [record("lp", {"lr_phase2": 2}, val_auc=0.9, test_auc=0.99, stage="tune"),
          record("lp", {"lr_phase2": 2}, val_auc=0.9, test_auc=0.70, seed=0, stage="final"),
          record("lp", {"lr_phase2": 2}, val_auc=0.9, test_auc=0.80, seed=1, stage="final")]
    table = breastmnist.render(rs)
    row = next(line for line in table.splitlines() if line.startswith("| DP-RandP without Phase III"))
    assert "0.750 ± 0.071" in row and "(n = 2)" in row and "0.99" not in row


def test_memoized_features_follow_the_heads_pooling_grid(tmp_path):
    """Two runs on one prior with different head grids must not share cached features."""
    from bench.utility import memoize_pooled_features
    from dprandp.models import create_model
    from dprandp.pipeline import trainer
    from dprandp.pretrain import apply_prior

    original = trainer.pooled_features
    prior = make_prior(tmp_path / "p.pt")
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    try:
        memoize_pooled_features()
        for pool in (1, 2, 1):
            model = create_model("wrn-10-1", num_classes=3, seed=0, head_pool=pool)
            apply_prior(model, prior)
            got = trainer.pooled_features(model, images)
            assert torch.equal(got, original(model, images)), pool
    finally:
        trainer.pooled_features = original


@pytest.mark.skipif(not breastmnist.DATA.exists(), reason="../shared/data/breastmnist.npz is absent")
def test_majority_rate_is_read_from_the_test_labels():
    with np.load(breastmnist.DATA) as f:
        y = f["test_labels"].reshape(-1)
    assert breastmnist.majority_rate() == pytest.approx(max(np.mean(y == 0), np.mean(y == 1)))


def test_majority_rate_reads_the_file_it_is_given(tmp_path):
    path = tmp_path / "small.npz"
    np.savez(path, test_labels=np.array([[1], [1], [1], [0]], dtype=np.uint8))
    assert breastmnist.majority_rate(path) == pytest.approx(0.75)
    assert np.isnan(breastmnist.majority_rate(tmp_path / "absent.npz"))
    assert "75.0 % accuracy" in breastmnist.render([], data=path)


def test_chosen_hyperparameters_are_grouped_by_epsilon():
    assert breastmnist.chosen_by_epsilon([(1.0, "a"), (2.0, "a"), (8.0, "b")]) == "ε = 1, 2: a; ε = 8: b"
    assert breastmnist.chosen_by_epsilon([(1.0, "a"), (8.0, "a")]) == "a"
