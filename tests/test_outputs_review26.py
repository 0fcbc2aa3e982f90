"""What a finished run writes, found in review (session 26, outputs): the shared model file named the
private data's and the prior's absolute paths, and did not carry the numbers its privacy claim rests
on; after a crash that lost Phase II steps the per-phase counts and the plots' Phase III boundary
counted the lost steps; a run the budget stopped early was not reported so; flip TTA ran on a model
trained without mirrored views; and malformed model files gave tracebacks."""

import json

import pytest
import torch
from pipeline_helpers import make_prior, tiny_npz

from dprandp.cli.main import main
from dprandp.cli.train import print_result
from dprandp.data import load_dataset
from dprandp.errors import InputError
from dprandp.models import create_model
from dprandp.pipeline import evaluate, predict, report
from dprandp.pipeline.finish import MODEL_FORMAT, load_model, save_model
from dprandp.pipeline.ledger import PrivacyLedger
from dprandp.pipeline.report import make_plots


class Crash(BaseException):
    pass


def _strings(obj):
    """Every string anywhere in a nested structure of dicts, lists and tuples."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A 4 + 8 step run (calibrated sigma) killed after step 3 with a checkpoint at step 2, then resumed:
    the ledger counts a lost Phase II step, so the budget stops the run after 11 of 12 steps."""
    from dprandp.pipeline import preset, resume, train

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("crashed")
    tiny_npz(work / "t.npz")
    make_prior(work / "p.pt")
    config = preset("demo", dataset="npz", data=str(work / "t.npz"), model="wrn-10-1", prior=str(work / "p.pt"),
                    batch_size=16, augmult=1, physical_batch_size=16, steps=12, phase2_steps=4, target_epsilon=8.0,
                    target_delta=1e-3, checkpoint_every=2, eval_every=0, val_fraction=0.25)
    original = PrivacyLedger.record_step

    def record_then_crash(self, **kw):
        rec = original(self, **kw)
        if kw["step"] == 3:
            raise Crash
        return rec

    mp = pytest.MonkeyPatch()
    mp.setattr(PrivacyLedger, "record_step", record_then_crash)
    try:
        with pytest.raises(Crash):
            train(config, out=work / "run", progress=False)
    finally:
        mp.undo()
    plots = {}  # what the report's plots were drawn with

    def spy(metrics, **kw):
        plots.update(kw)
        return make_plots(metrics, **kw)

    mp.setattr(report, "make_plots", spy)
    try:
        result = resume(work / "run", progress=False)
    finally:
        mp.undo()
    return work, result.summary, plots


def test_phase_counts_and_the_phase3_boundary_are_of_the_applied_steps(crashed):
    work, s, plots = crashed
    # the scenario: one Phase II step lost and counted, and the budget stopping the run
    assert (s["steps"], s["steps_applied"], s["planned_steps"]) == (12, 11, 12) and s["stopped_early"]
    assert (s["phase2_steps_done"], s["phase3_steps_done"]) == (4, 7)  # the model received steps 1..11
    assert (s["phase2_steps_counted"], s["phase3_steps_counted"]) == (5, 7)  # the ledger: step 3 twice
    assert plots["phase2_steps"] == 4  # "Phase III ->" after step 4, where the metrics' first III step is 5
    first_iii = next(m["step"] for m in map(json.loads, (work / "run" / "metrics.jsonl").read_text().splitlines())
                     if m.get("kind") == "step" and m.get("phase") == "III")
    assert first_iii == plots["phase2_steps"] + 1
    page = (work / "run" / "report.html").read_text()
    assert "II: 4 · III: 7" in page and "II: 5" not in page


def test_a_run_stopped_early_says_so_on_the_console_and_the_report(crashed, capsys):
    work, s, _ = crashed
    print_result(s, work / "run", as_json=False)
    line = capsys.readouterr().out.splitlines()[0]
    assert "12 DP steps counted, 11 applied (1 lost in a crash; stopped after 11 of 12 steps" in line
    page = (work / "run" / "report.html").read_text()
    assert "11 applied (II: 4 · III: 7); 1 lost in a crash, still counted" in page
    assert "stopped early by the budget after 11 of 12 planned" in page


def test_a_complete_run_keeps_the_short_console_line(crashed, capsys):
    _, s, _ = crashed
    print_result({**s, "steps": 12, "steps_applied": 12, "stopped_early": None}, "run", as_json=False)
    assert "; 12 DP steps, sigma = " in capsys.readouterr().out
    print_result({**s, "steps": 10, "steps_applied": 10}, "run", as_json=False)  # stopped, nothing lost
    assert "10 DP steps counted, 10 applied (stopped after" in capsys.readouterr().out


def test_the_model_file_names_no_private_path_and_states_its_claim(crashed):
    work, s, _ = crashed
    obj = torch.load(work / "run" / "model.pt", map_location="cpu", weights_only=True)
    assert not [v for v in _strings({k: v for k, v in obj.items() if k != "state_dict"}) if str(work) in v]
    assert obj["train_config"]["data"] is None and obj["train_config"]["prior"] is None
    assert len(obj["prior_sha256"]) == 64 and obj["prior_sha256"] == s["prior_sha256"]
    for key in ("noise_multiplier", "sample_rate", "steps", "steps_applied", "epsilon", "delta"):
        assert obj[key] == s[key], key
    # config.json keeps the paths: a resume needs them, and it stays in the private run directory
    assert json.loads((work / "run" / "config.json").read_text())["train"]["data"] == str(work / "t.npz")
    # and the file still scores the run's held-out quarter of the 64 training images
    assert evaluate(work / "run" / "model.pt", load_dataset("npz", str(work / "t.npz")), split="val")[
        "num_examples"] == 16


def test_the_tuning_release_names_no_private_path(crashed, tmp_path):
    from dprandp.tuning.runs import release_model

    work, _, _ = crashed
    record = {"epsilon": 9.0, "target_delta": 1e-3, "epsilon_of_one_run_alone": 8.0,
              "released": {"settings": {"lr_phase3": 2.0}}}
    release_model(work / "run" / "model.pt", tmp_path / "model.pt", record)
    obj = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    assert not [v for v in _strings({k: v for k, v in obj.items() if k != "state_dict"}) if str(work) in v]


@pytest.fixture(scope="module")
def no_flip(tmp_path_factory):
    """A model file of a run trained with --no-flip (random weights: only its metadata matters)."""
    d = tmp_path_factory.mktemp("noflip")
    data = load_dataset("npz", tiny_npz(d / "t.npz"))
    model = create_model("wrn-10-1", num_classes=4, seed=3)
    save_model(d / "model.pt", model, model_name="wrn-10-1", data=data,
               extra={"epsilon": 1.0, "delta": 1e-5, "train_config": {"flip": False, "seed": 0}})
    return d, data


def test_flip_tta_is_refused_for_a_model_trained_without_mirrored_views(no_flip, tmp_path, capsys):
    d, data = no_flip
    with pytest.raises(InputError, match="trained without mirrored views"):
        evaluate(d / "model.pt", data, flip_tta=True)
    with pytest.raises(InputError, match="drop --tta flip"):
        predict(d / "model.pt", data.x_test, flip_tta=True)
    assert evaluate(d / "model.pt", data)["num_examples"] == len(data.x_test)  # without TTA it scores
    # the commands refuse before reading the data: inputs that do not exist are never reached
    for argv in (["evaluate", "--model", str(d), "--dataset", "npz", "--data", str(tmp_path / "no.npz"), "--tta", "flip"],
                 ["predict", "--model", str(d), "--images", str(tmp_path / "no.npy"), "--tta", "flip"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code != 0 and err.startswith("dprandp: error: the model was trained without mirrored views")
        assert len(err.splitlines()) == 1


def _malformed(tmp_path, **change):
    """A valid model file with ``change`` applied (a value of None deletes the key)."""
    data = load_dataset("npz", tiny_npz(tmp_path / "t.npz"))
    save_model(tmp_path / "good.pt", create_model("wrn-10-1", num_classes=4, seed=3), model_name="wrn-10-1",
               data=data, extra={})
    obj = torch.load(tmp_path / "good.pt", map_location="cpu", weights_only=True)
    for k, v in change.items():
        if v is None:
            obj.pop(k)
        else:
            obj[k] = v
    torch.save(obj, tmp_path / "model.pt")
    return tmp_path / "model.pt", data


@pytest.mark.parametrize("change, problem", [
    ({"wrn_config": None}, "no architecture config"),
    ({"wrn_config": [1, 2]}, "no architecture config"),
    ({"model": None}, "no architecture name"),
    ({"state_dict": [1, 2]}, "state_dict"),
    ({"state_dict": None}, "state_dict"),
    ({"num_classes": "4"}, "num_classes"),
    ({"num_classes": None}, "num_classes"),
    ({"class_names": ["a", "b"]}, "class_names must be a list of 4 strings"),
    ({"class_names": [0, 1, 2, 3]}, "class_names must be a list of 4 strings"),
    ({"train_config": [1]}, "train_config"),
    ({"val_split": {"fraction": 0.2}}, "val_split"),
])
def test_a_malformed_model_file_is_refused_in_one_line(tmp_path, capsys, change, problem):
    path, _ = _malformed(tmp_path, **change)
    with pytest.raises(InputError, match=problem) as exc:
        load_model(path, device="cpu")
    assert str(exc.value).startswith(f"model file {path} is malformed: ")
    with pytest.raises(SystemExit) as code:
        main(["evaluate", "--model", str(path), "--dataset", "npz", "--data", str(tmp_path / "t.npz"), "--device", "cpu"])
    assert code.value.code != 0 and capsys.readouterr().err.startswith(f"dprandp: error: model file {path} is malformed")


def test_a_model_file_without_class_names_predicts_numbered_classes(tmp_path):
    path, data = _malformed(tmp_path, class_names=None)
    assert torch.load(path, weights_only=True)["format"] == MODEL_FORMAT
    assert predict(path, data.x_test[:3]).class_names == ("0", "1", "2", "3")
