"""Phase II on cached features (``--phase2-features cached``) against the full model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_helpers import make_prior, tiny_npz

from dprandp.data import to_float
from dprandp.models import create_model
from dprandp.pipeline import preset, train
from dprandp.pipeline.probe import ProbeModel, pooled_features
from dprandp.privacy import DPSGD, DPConfig


def frozen_trunk_model(seed=0, head_pool=1):
    model = create_model("wrn-10-1", num_classes=4, seed=seed, head_pool=head_pool).double()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(model.PRIOR_LACKS))
    return model


@pytest.mark.parametrize("head_pool", [1, 2])
def test_probe_steps_equal_full_model_steps_on_unaugmented_images(head_pool):
    """Same indices, same noise stream: DP-SGD on the probe over cached outputs moves the final
    norm and head exactly as DP-SGD on the whole (trunk-frozen) model over the images."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 4, 40))
    cfg = DPConfig(sample_rate=0.3, noise_multiplier=0.8, max_grad_norm=0.05, batch_size=12, augmult=1,
                   physical_batch_size=5)
    full, probe_owner = frozen_trunk_model(head_pool=head_pool), frozen_trunk_model(head_pool=head_pool)
    cache = pooled_features(probe_owner, images, batch_size=7)
    assert cache.shape == (40, 64 * head_pool**2)
    engines = []
    for m, net, method in ((full, full, "auto"), (probe_owner, ProbeModel(probe_owner), "vmap")):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=3.0, momentum=0.9)
        engines.append(DPSGD(net, opt, config=cfg, noise_generator=torch.Generator().manual_seed(4), method=method))
    x_full = to_float(images).double()
    clipped = []
    for step in range(4):
        idx = torch.from_numpy(np.random.default_rng(step).choice(40, 11, replace=False))
        a = engines[0].step(x_full[idx], labels[idx])
        b = engines[1].step(cache[idx], labels[idx])
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-9)
        clipped.append(a.clipped_fraction)
    assert 0 < max(clipped)  # the clipping bound is active, so clipping is compared too
    for (n, p), (n2, q) in zip(full.named_parameters(), probe_owner.named_parameters()):
        assert n == n2
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=n)


def test_cached_phase2_in_the_pipeline(tmp_path):
    torch.set_num_threads(1)
    data, prior = tiny_npz(tmp_path / "t.npz"), make_prior(tmp_path / "p.pt")
    common = dict(dataset="npz", data=data, model="wrn-10-1", prior=prior, batch_size=16, augmult=2,
                  physical_batch_size=16, steps=8, phase2_steps=5, noise_multiplier=2.0, target_epsilon=50.0,
                  eval_every=0, checkpoint_every=100, lr_phase2=2.0)
    res = train(preset("demo", phase2_features="cached", **common), out=tmp_path / "cached", progress=False)
    steps = [json.loads(x) for x in (tmp_path / "cached" / "ledger.jsonl").read_text().splitlines()]
    steps = [x for x in steps if x["kind"] == "step"]
    assert [x["phase"] for x in steps] == ["II"] * 5 + ["III"] * 3
    assert res.summary["steps"] == 8 and res.summary["epsilon"] <= 50
    # Both phases are composed: the reported epsilon is the accountant's for all 8 steps at q = B/N.
    from dprandp.accounting import DPPhase, compute_epsilon

    expected = compute_epsilon([DPPhase(sample_rate=16 / 64, noise_multiplier=2.0, steps=8)], target_delta=1e-5)
    assert res.summary["epsilon"] == pytest.approx(expected, rel=1e-9)
    # Linear probing only: the trunk stays the prior's (model.pt is the EMA: equal up to rounding).
    lp = train(preset("demo", phase2_features="cached", **{**common, "steps": 5}), out=tmp_path / "lp",
               progress=False)
    trunk = torch.load(prior, weights_only=True)["trunk"]
    state = torch.load(lp.run_dir / "model.pt", weights_only=True)["state_dict"]
    for k, v in trunk.items():
        torch.testing.assert_close(state[f"trunk.{k}"], v, rtol=1e-6, atol=1e-7, msg=k)


def test_grid_pooled_head_through_the_pipeline(tmp_path, capsys):
    """--head-pool 2 with cached Phase II: the saved model has the 2 x 2 head, reloads, and evaluate
    reproduces the reported accuracy; --head-pool 0 is refused in one line."""
    from dprandp.cli.main import main
    from dprandp.pipeline import evaluate, load_model

    torch.set_num_threads(1)
    data, prior = tiny_npz(tmp_path / "t.npz"), make_prior(tmp_path / "p.pt")
    cfg = preset("demo", dataset="npz", data=data, model="wrn-10-1", prior=prior, batch_size=16, augmult=1,
                 physical_batch_size=16, steps=4, phase2_steps=2, noise_multiplier=2.0, target_epsilon=50.0,
                 eval_every=0, checkpoint_every=100, head_pool=2, phase2_features="cached", flip=True)
    res = train(cfg, out=tmp_path / "run", progress=False)
    model, meta = load_model(res.run_dir / "model.pt")
    assert model.head.fc.in_features == 64 * 4 and meta["wrn_config"]["head_pool"] == 2
    from dprandp.data import load_dataset

    again = evaluate(res.run_dir / "model.pt", load_dataset("npz", data))
    assert again["accuracy"] == pytest.approx(res.summary["test_accuracy"], abs=1e-9)
    try:  # the CLI's flip test-time augmentation reproduces the summary's flip accuracy
        main(["evaluate", "--model", str(res.run_dir), "--dataset", "npz", "--data", data, "--tta", "flip", "--json"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["flip_tta"] is True and out["accuracy"] == pytest.approx(res.summary["test_accuracy_flip"], abs=1e-9)
    try:  # the plain-text line names every metric
        main(["evaluate", "--model", str(res.run_dir), "--dataset", "npz", "--data", data])
    except SystemExit as exc:
        assert exc.code in (0, None)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.match(r"accuracy [\d.]+ % \(balanced [\d.]+ %, ROC-AUC [\d.]+\) on npz test \(n = 32\)$", line), line
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "npz", "--data", data, "--prior", str(prior), "--head-pool", "0",
              "--out", str(tmp_path / "bad")])
    assert exc.value.code == 2


def test_bad_phase2_features_refused():
    from dprandp.errors import InputError

    with pytest.raises(InputError, match="phase2-features"):
        preset("demo", phase2_features="precomputed")


def test_runs_record_the_prior_they_loaded(tmp_path):
    """The prior's SHA-256 is taken when the run starts: a prior file replaced later (same path)
    cannot be misreported in summary.json."""
    import hashlib

    from dprandp.pipeline.finish import _prior_record

    torch.set_num_threads(1)
    data, prior = tiny_npz(tmp_path / "t.npz"), make_prior(tmp_path / "p.pt")
    digest = hashlib.sha256(Path(prior).read_bytes()).hexdigest()
    res = train(preset("demo", dataset="npz", data=data, model="wrn-10-1", prior=prior, batch_size=16, augmult=1,
                       steps=2, phase2_steps=1, noise_multiplier=2.0, target_epsilon=50.0, eval_every=0),
                out=tmp_path / "run", progress=False)
    derived = json.loads((res.run_dir / "config.json").read_text())["derived"]
    assert derived["prior_sha256"] == res.summary["prior_sha256"] == digest
    make_prior(tmp_path / "p.pt", seed=9)  # the path now holds another prior
    assert _prior_record(res.run_dir, prior)["prior_sha256"] == digest
