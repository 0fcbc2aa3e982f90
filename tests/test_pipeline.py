"""Phases II + III end to end on tiny data: the summary against the ledger, the run directory,
linear probing leaves the trunk untouched, evaluate agrees, presets follow SPEC.md."""

import base64
import json
import re

import pytest
import torch
from pipeline_helpers import make_prior, tiny_npz

from dprandp.accounting import DPPhase, compute_epsilon
from dprandp.errors import InputError
from dprandp.pipeline import evaluate, load_model, preset, train
from dprandp.pipeline.config import PAPER_PHASE2_SHARE

torch.set_num_threads(1)


def tiny_config(data, prior, **kw):
    base = dict(dataset="npz", data=data, model="wrn-10-1", prior=prior, batch_size=16, augmult=2,
                physical_batch_size=16, steps=6, phase2_steps=2, target_epsilon=1.0, checkpoint_every=3,
                eval_every=3, lr_phase2=2.0, lr_phase3=0.5, flip=True)  # the demo preset does not mirror (digits)
    base.update(kw)
    return preset("demo", **base)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    data, prior = tiny_npz(d / "tiny.npz"), make_prior(d / "prior.pt")
    result = train(tiny_config(data, prior), out=d / "run", progress=False)
    return d, result


def ledger_steps(run_dir):
    lines = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "step"]


def test_summary_epsilon_is_the_accountants_epsilon_of_the_ledger(finished):
    d, result = finished
    run = d / "run"
    summary = json.loads((run / "summary.json").read_text())
    steps = ledger_steps(run)
    assert len(steps) == summary["steps"] == 6
    assert [s["phase"] for s in steps] == ["II", "II", "III", "III", "III", "III"]
    # independent reference: q = B / N from the config, one sigma, 6 Poisson-Gaussian steps
    assert {s["sample_rate"] for s in steps} == {16 / 64} and summary["sample_rate"] == 16 / 64
    sigma = {s["noise_multiplier"] for s in steps}
    assert sigma == {summary["noise_multiplier"]}
    ref = compute_epsilon([DPPhase(sample_rate=0.25, noise_multiplier=sigma.pop(), steps=6)], target_delta=1e-5)
    assert summary["epsilon"] == pytest.approx(ref, rel=1e-9)
    assert summary["epsilon"] <= summary["target_epsilon"] == 1.0
    assert summary["epsilon"] > 0.99 * 1.0  # sigma was calibrated to use the budget
    for key in ("test_accuracy", "test_accuracy_flip", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "num_train",
                "dataset", "prior", "wall_time_s", "code_version", "deterministic_noise"):
        assert key in summary
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["num_train"] == 64
    assert summary["deterministic_noise"] is False and summary["delta"] == 1e-5


def test_overwrite_records_the_budget_the_deleted_run_had_spent(finished, tmp_path):
    """--overwrite deletes a run whose steps already spent privacy on the data; the new run says so
    (a warning, and config.json's discarded_run), since its own epsilon does not cover them."""
    import shutil

    d, _ = finished
    old = tmp_path / "run"
    shutil.copytree(d / "run", old)
    spent = json.loads((old / "summary.json").read_text())
    messages = []
    train(tiny_config(str(d / "tiny.npz"), str(d / "prior.pt"), steps=2, phase2_steps=1), out=old, overwrite=True,
          progress=False, log=messages.append)
    discarded = json.loads((old / "config.json").read_text())["derived"]["discarded_run"]
    assert discarded["steps"] == spent["steps"] == 6 and discarded["delta"] == spent["delta"]
    assert discarded["epsilon"] == pytest.approx(spent["epsilon"], rel=1e-9)
    warning = [m for m in messages if "--overwrite deletes" in m]
    assert len(warning) == 1 and "6 DP steps" in warning[0] and f"{spent['epsilon']:.4g}" in warning[0]
    assert len(ledger_steps(old)) == 2  # the new ledger holds only the new run's steps
    summary = json.loads((old / "summary.json").read_text())  # what people share says so too
    assert summary["discarded_run"] == discarded
    assert "--overwrite deleted an earlier run" in (old / "report.html").read_text()
    train(tiny_config(str(d / "tiny.npz"), str(d / "prior.pt"), steps=2, phase2_steps=1), out=tmp_path / "fresh",
          overwrite=True, progress=False)
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["derived"]["discarded_run"] is None
    assert json.loads((tmp_path / "fresh" / "summary.json").read_text())["discarded_run"] is None


def test_run_directory_contents(finished):
    d, result = finished
    assert result.summary["reported_model"] == "final EMA model"
    run = d / "run"
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "ledger.jsonl", "model.pt", "summary.json", "report.html",
            "accuracy.png", "epsilon.png"} <= names
    assert "checkpoint.pt" not in names and not any(n.endswith(".tmp") for n in names)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    per_step = [m for m in metrics if m["kind"] == "step"]
    assert [m["step"] for m in per_step] == list(range(1, 7))
    for m in per_step:
        assert {"phase", "loss", "train_accuracy", "lr", "epsilon"} <= m.keys()
    assert [m["lr"] for m in per_step] == [2.0, 2.0, 0.5, 0.5, 0.5, 0.5]
    eps = [m["epsilon"] for m in per_step]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(result.epsilon, rel=0.01)
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert evals[-1]["step"] == 6 and evals[-1]["test_accuracy"] == result.test_accuracy
    html = (run / "report.html").read_text()
    assert not re.search(r'src="(?!data:)', html)  # self-contained: every image inlined
    png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["batch_size"] == 16 and cfg["derived"]["num_train"] == 64


def test_evaluate_reproduces_the_reported_accuracy(finished):
    from dprandp.data import load_dataset

    d, result = finished
    data = load_dataset("npz", str(d / "tiny.npz"))
    out = evaluate(d / "run" / "model.pt", data)
    assert out["accuracy"] == result.test_accuracy
    model, meta = load_model(d / "run" / "model.pt")
    assert meta["num_classes"] == 4 and meta["model"] == "wrn-10-1"
    flip = evaluate(d / "run" / "model.pt", data, flip_tta=True)
    assert flip["flip_tta"] is True and flip["accuracy"] == result.summary["test_accuracy_flip"]
    # the summary's balanced accuracy and ROC-AUC are those of the saved model's test logits
    for key in ("balanced_accuracy", "auc"):
        assert out[key] == pytest.approx(result.summary[f"test_{key}"], abs=1e-6)
        assert flip[key] == pytest.approx(result.summary[f"test_{key}_flip"], abs=1e-6)
    assert 0 <= out["balanced_accuracy"] <= 1
    assert 0 <= out["auc"] <= 1  # every class is in the tiny test set
    assert "ROC-AUC" in (d / "run" / "report.html").read_text()


def test_evaluate_carves_the_validation_split_the_run_held_out(tmp_path):
    """A run trained with --val-fraction held a seeded split of train out; `evaluate --split val`
    scores that very split (the summary's val accuracy), and `--split train` only what it trained on.
    It used to load the dataset unsplit: no val split at all, and train with the held-out images in."""
    from dprandp.data import load_dataset

    data, prior = tiny_npz(tmp_path / "tiny.npz", n_train=80), make_prior(tmp_path / "prior.pt")
    result = train(tiny_config(data, prior, steps=2, phase2_steps=1, val_fraction=0.25, seed=5), out=tmp_path / "run",
                   progress=False)
    _, meta = load_model(tmp_path / "run" / "model.pt")
    assert meta["val_split"] == {"fraction": 0.25, "seed": 5}
    unsplit = load_dataset("npz", data)
    val = evaluate(tmp_path / "run" / "model.pt", unsplit, split="val")
    assert val["num_examples"] == 20 and val["accuracy"] == result.summary["val_accuracy"]
    assert evaluate(tmp_path / "run" / "model.pt", unsplit, split="train")["num_examples"] == 60
    assert evaluate(tmp_path / "run" / "model.pt", unsplit)["accuracy"] == result.test_accuracy
    train(tiny_config(data, prior, steps=1, phase2_steps=1), out=tmp_path / "plain", progress=False)
    with pytest.raises(InputError, match="trained without --val-fraction"):  # a run without one says so
        evaluate(tmp_path / "plain" / "model.pt", unsplit, split="val")


def test_evaluate_refuses_a_dataset_whose_class_names_are_other_classes(finished, tmp_path):
    """Same class count, other folders: each label would be scored against another class. Numbered
    names (what a loader without metadata falls back to, e.g. MedMNIST without its package) pass."""
    from dataclasses import replace

    from dprandp.data import load_dataset

    d, result = finished
    obj = torch.load(d / "run" / "model.pt", weights_only=True)
    obj["class_names"] = ["cat", "dog", "fox", "owl"]
    torch.save(obj, tmp_path / "model.pt")
    data = load_dataset("npz", str(d / "tiny.npz"))
    assert data.class_names == ("0", "1", "2", "3")
    assert evaluate(tmp_path / "model.pt", data)["accuracy"] == result.test_accuracy
    same = replace(data, class_names=("cat", "dog", "fox", "owl"))
    assert evaluate(tmp_path / "model.pt", same)["accuracy"] == result.test_accuracy
    with pytest.raises(InputError, match=r"the model's classes \['cat', 'dog', 'fox', 'owl'\] are not the dataset's"):
        evaluate(tmp_path / "model.pt", replace(data, class_names=("cat", "dog", "owl", "fox")))


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    """Reference by hand: a model that reads only the leftmost column sees the rightmost one
    under the flip, so TTA logits must be the mean of the two columns' read-outs."""
    from dprandp.pipeline.trainer import predict_logits

    class LeftColumn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([[1.0, -1.0]]))

        def forward(self, x):
            v = x[:, 0, 0, 0:1]  # channel 0, row 0, leftmost pixel
            return v * self.w

    x = torch.zeros(2, 3, 4, 4)
    x[0, 0, 0, 0], x[0, 0, 0, -1] = 3.0, -1.0  # left 3, right -1: mean 1 -> class 0
    x[1, 0, 0, 0], x[1, 0, 0, -1] = 1.0, -5.0  # left 1, right -5: mean -2 -> class 1
    m = LeftColumn()
    plain, tta = predict_logits(m, x), predict_logits(m, x, flip_tta=True)
    assert torch.allclose(plain, torch.tensor([[3.0, -3.0], [1.0, -1.0]]))
    assert torch.allclose(tta, torch.tensor([[1.0, -1.0], [-2.0, 2.0]]))
    assert plain.argmax(1).tolist() == [0, 0] and tta.argmax(1).tolist() == [0, 1]


def test_linear_probing_only_leaves_the_trunk_equal_to_the_prior(tmp_path):
    data, prior = tiny_npz(tmp_path / "t.npz"), make_prior(tmp_path / "p.pt")
    cfg = tiny_config(data, prior, steps=3, phase2_steps=3, eval_every=0, ema=False, noise_multiplier=3.0)
    assert cfg.phase3_steps == 0
    train(cfg, out=tmp_path / "run", progress=False)
    model, _ = load_model(tmp_path / "run" / "model.pt")
    from dprandp.pretrain import load_prior

    trunk, _ = load_prior(prior)
    for k, v in trunk.items():
        assert torch.equal(model.trunk.state_dict()[k], v), k
    assert {s["phase"] for s in ledger_steps(tmp_path / "run")} == {"II"}
    # without EMA the reported model is the last iterate, and nothing calls it the EMA model
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["reported_model"] == "final model (no EMA)"
    report = (tmp_path / "run" / "report.html").read_text()
    assert "EMA model" not in report and "final model (no EMA)" in report


def test_without_prior_every_step_trains_everything(tmp_path):
    data = tiny_npz(tmp_path / "t.npz")
    cfg = preset("demo", dataset="npz", data=data, model="wrn-10-1", prior=None, batch_size=16, augmult=1,
                 physical_batch_size=16, steps=2, eval_every=0, target_epsilon=8.0, noise_multiplier=3.0)
    assert cfg.phase2_steps == 0
    result = train(cfg, out=tmp_path / "run", progress=False)
    assert {s["phase"] for s in ledger_steps(tmp_path / "run")} == {"III"}
    assert result.summary["prior"] is None and result.summary["phase2_steps_done"] == 0


def test_divergence_is_read_off_the_parameters_and_stops_the_run(tmp_path):
    """An absurd learning rate sends the weights to ~1e29 after one step: still finite, but the model's
    outputs overflow. The run stops with a one-line error naming the step, and the ledger keeps
    every step spent (the budget is not forgotten)."""
    data = tiny_npz(tmp_path / "t.npz")
    cfg = preset("demo", dataset="npz", data=data, model="wrn-10-1", prior=None, batch_size=16, augmult=1,
                 physical_batch_size=16, steps=4, eval_every=0, target_epsilon=8.0, noise_multiplier=3.0,
                 lr_phase3=1e30)
    with pytest.raises(InputError, match=r"training diverged at step 1: the model's parameters or outputs are no longer finite"):
        train(cfg, out=tmp_path / "run", progress=False)
    assert len(ledger_steps(tmp_path / "run")) == 1


def test_delta_must_be_below_one_over_n(tmp_path):
    data, prior = tiny_npz(tmp_path / "t.npz"), make_prior(tmp_path / "p.pt")
    with pytest.raises(InputError, match="N = 64"):
        train(tiny_config(data, prior, target_delta=1 / 64), out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_paper_preset_is_spec():
    c = preset("paper", prior="prior.pt")
    assert (c.model, c.batch_size, c.augmult, c.steps, c.phase2_steps, c.phase3_steps) == (
        "wrn-16-4", 4096, 16, 875, 96, 779)
    assert (c.lr_phase2, c.lr_phase3, c.momentum, c.max_grad_norm, c.ema) == (15.0, 0.4, 0.0, 1.0, True)
    assert (c.target_epsilon, c.target_delta, c.dataset) == (1.0, 1e-5, "cifar10")
    assert PAPER_PHASE2_SHARE * 875 == pytest.approx(96)
    # share flag and explicit phase steps
    assert preset("paper", prior="p", steps=1000).phase2_steps == round(1000 * 96 / 875)
    # a new step count alone keeps each preset's own share, not the paper's
    assert preset("cpu", prior="p", steps=600).phase2_steps == 120
    assert preset("demo", prior="p", steps=120).phase2_steps == 60
    assert preset("paper", prior="p", phase2_share=0.5).phase2_steps == 438
    assert preset("paper", prior="p", phase3_steps=0).steps == 96
    # --steps with --phase3-steps: Phase II gets the rest (the total was silently 20 + 50 = 70 here)
    c = preset("cpu", prior="p", steps=100, phase3_steps=50)
    assert (c.steps, c.phase2_steps, c.phase3_steps) == (100, 50, 50)
    with pytest.raises(InputError, match="exceeds --steps"):
        preset("cpu", prior="p", steps=100, phase3_steps=150)
    with pytest.raises(InputError, match="--phase2-share or --phase3-steps, not both"):  # a share of which total?
        preset("demo", prior="p", phase2_share=0.5, phase3_steps=10)
    assert preset("paper", prior=None).phase2_steps == 0


def test_cpu_preset_lr_phase3_follows_the_target_epsilon_unless_given():
    from dprandp.pipeline.config import lr_phase3_for

    assert [preset("cpu", prior="p", target_epsilon=e).lr_phase3 for e in (1, 2, 3.99, 4, 8, 16)] == [
        2.0, 2.0, 2.0, 4.0, 4.0, 4.0]
    assert preset("cpu", prior="p", target_epsilon=8, lr_phase3=1.5).lr_phase3 == 1.5  # a flag wins
    assert preset("paper", prior="p", target_epsilon=8).lr_phase3 == 0.4  # no schedule: the base lr
    assert "lr_phase3_by_epsilon" not in preset("cpu", prior="p").to_dict()  # a preset rule, not a field
    # the largest threshold reached, whatever the order it was written in
    assert lr_phase3_for(5.0, 1.0, ((8.0, 3.0), (2.0, 2.0), (4.0, 2.5))) == 2.5
    assert lr_phase3_for(0.5, 1.0, ((2.0, 2.0),)) == 1.0


def test_readme_preset_table_states_each_presets_values():
    """The README's preset table is written by hand: it must say what ``preset()`` does."""
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    if not readme.exists():
        pytest.skip("no README.md beside the tests")
    rows = {}
    for line in readme.read_text().splitlines():
        m = re.match(r"\| `(\w+)` \| ([\w-]+)[^|]* \| (\d+) \| (\d+) \| (\d+) \((\d+) \+ (\d+)\) \| ([^|]+) \|", line)
        if m:
            rows[m.group(1)] = m.groups()[1:]
    assert set(rows) == {"paper", "cpu", "demo"}

    def number(x):
        return f"{x:g}"

    for name, (model, b, k, steps, p2, p3, lrs) in rows.items():
        c = preset(name, prior="p")
        assert (model, int(b), int(k), int(steps), int(p2), int(p3)) == (
            c.model, c.batch_size, c.augmult, c.steps, c.phase2_steps, c.phase3_steps), name
        assert lrs.strip().startswith(f"{number(c.lr_phase2)} / {number(c.lr_phase3)}"), name
        for epsilon in (2, 4, 8):  # a per-epsilon lr_III must be stated as "(L from ε = E)"
            lr = preset(name, prior="p", target_epsilon=epsilon).lr_phase3
            if lr != c.lr_phase3:
                assert f"({number(lr)} from ε = " in lrs, name


def test_paper_sigma_matches_spec():
    """q = 4096 / 50000, 875 steps, epsilon 1: SPEC.md gives sigma ~ 9.19 (PRV); PLD within 1 %."""
    from dprandp.pipeline import make_plan

    plan = make_plan(preset("paper", prior="p"), 50_000)
    assert plan.sample_rate == 4096 / 50_000
    assert plan.noise_multiplier == pytest.approx(9.19, rel=0.01)
    assert plan.planned_epsilon <= 1.0


def test_sample_rate_is_batch_over_n_from_the_config_not_from_a_loader():
    """Sharp edge: q = B / N. With N = 64 and B = 12, a loader-derived 1/len(loader) would be 1/6."""
    from dprandp.pipeline import make_plan

    config = preset("demo", prior=None, batch_size=12, noise_multiplier=5.0, target_epsilon=10.0, steps=6)
    plan = make_plan(config, 64)
    assert plan.sample_rate == 12 / 64
    assert plan.sample_rate != 1 / -(-64 // 12)
    assert all(p.sample_rate == 12 / 64 for p in plan.phases(config))


def test_bf16_precision_trains_and_spends_the_same_budget(tmp_path, finished):
    """bf16 changes the arithmetic of the passes, never the mechanism: same sigma, same epsilon."""
    _, fp32 = finished
    data, prior = tiny_npz(tmp_path / "t.npz"), make_prior(tmp_path / "p.pt")
    result = train(tiny_config(data, prior, precision="bf16"), out=tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["precision"] == "bf16"
    assert result.summary["noise_multiplier"] == fp32.summary["noise_multiplier"]
    assert result.epsilon == fp32.epsilon
    assert 0.0 <= result.test_accuracy <= 1.0


def test_no_flip_never_mirrors_a_training_view_and_reports_no_mirror_tta(tmp_path, monkeypatch, finished):
    """--no-flip (digits, text, X-rays with laterality): every view the DP steps see is an unmirrored
    crop, and the summary carries no flip-TTA numbers (a mirror the model never saw is no augmentation)."""
    import dprandp.pipeline.trainer as trainer_module
    from dprandp.augment import random_crop_flip

    calls = []

    def recording(x, **kwargs):
        calls.append(kwargs.get("flip", True))
        return random_crop_flip(x, **kwargs)

    monkeypatch.setattr(trainer_module, "random_crop_flip", recording)
    data, prior = tiny_npz(tmp_path / "t.npz"), make_prior(tmp_path / "p.pt")
    result = train(tiny_config(data, prior, steps=3, phase2_steps=1, eval_every=0, flip=False), out=tmp_path / "run",
                   progress=False)
    assert calls and not any(calls)
    assert result.summary["test_accuracy"] is not None and result.summary["test_accuracy_flip"] is None
    assert finished[1].summary["test_accuracy_flip"] is not None  # the same run with mirrored views has them
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["flip"] is False
    assert "the training views were not mirrored" in (tmp_path / "run" / "report.html").read_text()


def test_no_flip_flag_reaches_the_config():
    from dprandp.cli.train_options import TRAIN_FLAGS, overrides_from

    flags = {dest: None for _, dest, _ in TRAIN_FLAGS} | {"no_ema": False, "deterministic_noise": False}
    assert overrides_from(flags | {"flip": False})["flip"] is False
    assert overrides_from(flags | {"flip": True})["flip"] is True
    assert overrides_from(flags | {"flip": None})["flip"] is None  # not given: the preset decides
    assert preset("demo", flip=True).flip and not preset("demo").flip and preset("cpu").flip
    # digits is never mirrored unless asked, whatever the preset; other datasets are unless told not to
    assert not preset("cpu", dataset="digits").flip and preset("cpu", dataset="digits", flip=True).flip
    assert preset("demo", dataset="npz").flip and not preset("cpu", dataset="cifar10", flip=False).flip
