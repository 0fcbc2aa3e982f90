"""What a resume must refuse, or must find, so that a run's epsilon stays the epsilon of what it did.

Found in review (session 25): a resume read `--data` relative to the current directory (so from
another directory it failed, or trained on another file with the same count); two processes could
train one run directory at once (the summary then under-counted the ledger); and a ledger shorter
than the checkpoint was accepted (epsilon under-reported for the steps the model holds).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pipeline_helpers import make_prior, tiny_npz

from dprandp.errors import InputError
from dprandp.pipeline.ledger import PrivacyLedger
from dprandp.pipeline.rundir import run_dir_lock


class Crash(BaseException):
    pass


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    """A run started with relative paths and killed after 6 of 12 steps (checkpoint at step 5)."""
    from dprandp.pipeline import preset, train

    torch.set_num_threads(1)
    work = tmp_path / "work"
    work.mkdir()
    tiny_npz(work / "t.npz")
    make_prior(work / "p.pt")
    monkeypatch.chdir(work)
    config = preset("demo", dataset="npz", data="t.npz", model="wrn-10-1", prior="p.pt", batch_size=16, augmult=1,
                    physical_batch_size=16, steps=12, phase2_steps=4, noise_multiplier=3.0, target_epsilon=50.0,
                    checkpoint_every=5, eval_every=0)
    original = PrivacyLedger.record_step

    def record_then_crash(self, **kw):
        rec = original(self, **kw)
        if kw["step"] == 6:
            raise Crash
        return rec

    with monkeypatch.context() as m:
        m.setattr(PrivacyLedger, "record_step", record_then_crash)
        with pytest.raises(Crash):
            train(config, out=work / "run", progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return work


def test_a_run_records_absolute_paths_and_resumes_from_another_directory(interrupted):
    from dprandp.pipeline import resume

    saved = json.loads((interrupted / "run" / "config.json").read_text())
    assert saved["train"]["data"] == str(interrupted / "t.npz")
    assert saved["train"]["prior"] == str(interrupted / "p.pt")
    result = resume(interrupted / "run", progress=False)
    assert result.summary["steps_applied"] == 12


def test_the_training_fingerprint_is_only_in_the_private_checkpoint(interrupted):
    """An exact hash of the training split is a membership oracle (found in review): it must not be in
    any file a user may share, and it leaves with the checkpoint."""
    from dprandp.pipeline import resume
    from dprandp.pipeline.state import load_checkpoint

    run = interrupted / "run"
    digest = load_checkpoint(run)["train_sha256"]
    assert len(digest) == 64
    resume(run, progress=False)
    assert not (run / "checkpoint.pt").exists()
    for f in run.rglob("*"):
        if f.is_file():
            assert digest.encode() not in f.read_bytes(), f


def test_overwrite_of_a_run_in_use_is_refused_and_deletes_nothing(interrupted):
    from dprandp.pipeline import preset, train

    run = interrupted / "run"
    before = sorted(p.name for p in run.iterdir())
    config = preset("demo", dataset="npz", data=str(interrupted / "t.npz"), model="wrn-10-1", batch_size=16,
                    augmult=1, physical_batch_size=16, steps=2, target_epsilon=50.0, eval_every=0)
    with run_dir_lock(run):  # the first run still trains there
        with pytest.raises(InputError, match="in use by another process"):
            train(config, out=run, overwrite=True, progress=False)
    assert sorted(p.name for p in run.iterdir()) == before


def test_resume_on_other_images_with_the_same_count_is_refused(interrupted):
    from dprandp.pipeline import resume

    tiny_npz(interrupted / "t.npz", seed=1)  # same N and classes, other pictures
    with pytest.raises(InputError, match="training images .* changed since it started"):
        resume(interrupted / "run", progress=False)


def test_a_truncated_ledger_is_refused(interrupted):
    from dprandp.pipeline import resume

    ledger = interrupted / "run" / "ledger.jsonl"
    lines = ledger.read_text().splitlines()
    steps = [i for i, line in enumerate(lines) if json.loads(line)["kind"] == "step"]
    assert len(steps) == 6  # the checkpoint is at step 5
    ledger.write_text("\n".join(lines[: steps[3]]) + "\n")  # 3 step records left
    with pytest.raises(InputError, match="holds 3 DP steps but the checkpoint was taken after 5"):
        resume(interrupted / "run", progress=False)


def test_a_run_in_use_by_another_process_is_refused(interrupted):
    from dprandp.pipeline import resume

    run = interrupted / "run"
    before = (run / "ledger.jsonl").read_bytes()
    with run_dir_lock(run):
        with pytest.raises(InputError, match="in use by another process"):
            resume(run, progress=False)
        r = subprocess.run([sys.executable, "-m", "dprandp", "train", "--resume", str(run), "--threads", "1"],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "in use by another process" in r.stderr, r.stderr
    assert (run / "ledger.jsonl").read_bytes() == before  # nothing appended while it was held
    assert resume(run, progress=False).summary["steps_applied"] == 12  # released: the run goes on


def test_overwrite_through_a_symbolic_link_is_refused_in_one_line(interrupted):
    from dprandp.pipeline import preset, train

    link = interrupted / "link"
    link.symlink_to(interrupted / "run")
    config = preset("demo", dataset="npz", data=str(interrupted / "t.npz"), model="wrn-10-1", batch_size=16,
                    augmult=1, physical_batch_size=16, steps=2, target_epsilon=50.0, eval_every=0)
    with pytest.raises(InputError, match="is a symbolic link"):
        train(config, out=link, overwrite=True, progress=False)
    assert (interrupted / "run" / "ledger.jsonl").exists()


def test_a_fresh_run_directory_filled_meanwhile_is_refused(tmp_path, monkeypatch):
    """Two fresh runs into one --out: the second to take the lock finds the first one's files."""
    from dprandp.pipeline import preset, train
    from dprandp.pipeline import trainer as trainer_module

    data = tiny_npz(tmp_path / "t.npz")
    real = trainer_module.prepare_run_dir

    def racing(out, overwrite=False):
        p = real(out, overwrite=overwrite)
        (p / "config.json").write_text("{}")  # the other process got there first
        return p

    monkeypatch.setattr(trainer_module, "prepare_run_dir", racing)
    config = preset("demo", dataset="npz", data=data, model="wrn-10-1", batch_size=16, augmult=1,
                    physical_batch_size=16, steps=2, target_epsilon=50.0, eval_every=0)
    with pytest.raises(InputError, match="filled by another process"):
        train(config, out=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "config.json").read_text() == "{}"




def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dprandp", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_refuses_an_empty_out_and_a_preset_given_with_resume(interrupted):
    r = _cli("train", "--preset", "demo", "--prior", "none", "--steps", "2", "--out", "")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--out is empty" in r.stderr, r.stderr
    assert not (interrupted.parent / "elsewhere" / "runs").exists()
    r = _cli("train", "--resume", str(interrupted / "run"), "--preset", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "drop --preset" in r.stderr, r.stderr


def test_predict_refuses_an_out_inside_the_images_folder(tmp_path):
    from PIL import Image

    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "a.png")
    (tmp_path / "model.pt").write_bytes(b"x")
    r = _cli("predict", "--model", str(tmp_path / "model.pt"), "--images", str(images), "--out",
             str(images / "a.png"), "--overwrite")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "inside the --images folder" in r.stderr, r.stderr
    assert (images / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_ctrl_c_says_how_to_resume(interrupted):
    """SIGINT mid-run: one line that names `dprandp train --resume`, exit 130 (found in review: click's
    Abort printed a bare 'aborted')."""
    import signal
    import time

    data = tiny_npz(interrupted / "u.npz", n_train=256)
    proc = subprocess.Popen([sys.executable, "-m", "dprandp", "train", "--preset", "demo", "--dataset", "npz", "--data",
                             data, "--prior", "none", "--model", "wrn-10-1", "--steps", "500", "--batch-size", "64",
                             "--threads", "1", "--no-progress", "--eval-every", "0", "--out", str(interrupted / "c")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    ledger = interrupted / "c" / "ledger.jsonl"
    start = time.time()
    while not (ledger.exists() and b'"kind": "step"' in ledger.read_bytes()):
        assert proc.poll() is None and time.time() - start < 120, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("dprandp: error")]
    assert proc.returncode == 130 and len(lines) == 1 and "dprandp train --resume" in lines[0], err[-2000:]


def test_auto_resume_with_the_same_relative_paths_continues_the_run(interrupted, monkeypatch):
    """config.json records absolute paths; --auto-resume given the same relative ones is the same run."""
    from dprandp.pipeline import preset
    from dprandp.pipeline.restart import continue_or_start

    monkeypatch.chdir(interrupted)
    config = preset("demo", dataset="npz", data="t.npz", model="wrn-10-1", prior="p.pt", batch_size=16, augmult=1,
                    physical_batch_size=16, steps=12, phase2_steps=4, noise_multiplier=3.0, target_epsilon=50.0,
                    checkpoint_every=5, eval_every=0)
    assert continue_or_start(config, "run", progress=False).summary["steps_applied"] == 12


def test_evaluate_and_predict_on_an_unfinished_run_say_how_to_finish_it(interrupted):
    run = interrupted / "run"
    for args in (["evaluate", "--model", str(run), "--dataset", "npz", "--data", str(interrupted / "t.npz")],
                 ["predict", "--model", str(run), "--images", str(interrupted / "t.npz")]):
        r = _cli(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "has not finished" in r.stderr and f"dprandp train --resume {run}" in r.stderr, r.stderr


def test_evaluate_on_the_training_split_warns_that_it_is_not_private(interrupted):
    from dprandp.pipeline import resume

    run = interrupted / "run"
    resume(run, progress=False)
    r = _cli("evaluate", "--model", str(run), "--dataset", "npz", "--data", str(interrupted / "t.npz"), "--split", "train")
    assert r.returncode == 0 and "not covered by the model's (epsilon, delta)" in r.stderr, r.stderr
    r = _cli("evaluate", "--model", str(run), "--dataset", "npz", "--data", str(interrupted / "t.npz"))
    assert r.returncode == 0 and "not covered" not in r.stderr, r.stderr


def test_resume_may_lower_the_physical_batch_and_nothing_else(interrupted):
    """The out-of-memory message says to lower --physical-batch-size and resume: --resume accepts it
    (and --eval-batch-size), records it in config.json, and still refuses any setting of the mechanism."""
    run = interrupted / "run"
    refused = subprocess.run([sys.executable, "-m", "dprandp", "train", "--resume", str(run), "--augmult", "2",
                              "--physical-batch-size", "4"], capture_output=True, text=True)
    assert refused.returncode == 2 and "drop --augmult" in refused.stderr and "Traceback" not in refused.stderr
    assert "--physical-batch-size" in refused.stderr.splitlines()[-1].split("may change")[0]
    done = subprocess.run([sys.executable, "-m", "dprandp", "train", "--resume", str(run), "--physical-batch-size",
                           "4", "--threads", "1", "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "physical_batch_size = 4 (was 16)" in done.stderr
    assert json.loads((run / "config.json").read_text())["train"]["physical_batch_size"] == 4
    assert (run / "summary.json").is_file()


def test_an_output_inside_class_folders_is_refused(tmp_path):
    """A run written inside an imagefolder --data became a class of the next read (found in review)."""
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), (40 * i, 200 if cls == "cat" else 0, 0)).save(tmp_path / "images" / cls / f"{i}.png")
    for command, extra in (("train", ["--prior", "none"]), ("run", [])):
        got = subprocess.run([sys.executable, "-m", "dprandp", command, "--preset", "demo", "--dataset", "imagefolder",
                              "--data", str(tmp_path / "images"), "--out", str(tmp_path / "images" / "run1"), *extra],
                             capture_output=True, text=True, env={**os.environ, "DPRANDP_CACHE": str(tmp_path / "c")})
        assert got.returncode == 2 and got.stderr.count("\n") == 1, got.stderr
        assert "whose folders are read as classes" in got.stderr
        assert not (tmp_path / "images" / "run1").exists() and not (tmp_path / "c").exists()


def test_a_config_json_edited_since_the_checkpoint_is_refused(interrupted):
    """Found in review: a resume trains with config.json, which was never compared with the settings the
    checkpoint was taken with; an edited learning rate or epsilon target would have continued silently."""
    from dprandp.pipeline import resume

    run = interrupted / "run"
    saved = json.loads((run / "config.json").read_text())
    edited = json.loads(json.dumps(saved))
    edited["train"]["lr_phase3"] = 123.0
    (run / "config.json").write_text(json.dumps(edited))
    with pytest.raises(InputError, match="differs from the settings its checkpoint was taken with .*lr_phase3"):
        resume(run, progress=False)
    (run / "config.json").write_text(json.dumps(saved))
    assert resume(run, progress=False).summary["steps_applied"] == 12
