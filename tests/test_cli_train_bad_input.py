"""Bad input to `dprandp train / run / evaluate / tune / pretrain`: exit 2, one line on stderr, nothing written over.

Table-driven through the real CLI entry point (``dprandp.cli.main.main``, in process to keep the
suite fast; one case also runs as a subprocess to cover the console script path).
"""

import hashlib
import subprocess
import sys

import numpy as np
import torch
import pytest
from pipeline_helpers import make_prior, tiny_flags, tiny_npz

from dprandp.cli.main import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = tiny_npz(d / "good.npz")
    arrays = dict(np.load(good))

    def variant(name, **changes):
        a = dict(arrays)
        a.update(changes)
        np.savez(d / name, **{k: v for k, v in a.items() if v is not None})
        return str(d / name)

    f = {
        "dir": d, "good": good, "prior": make_prior(d / "prior.pt"),
        "prior16": make_prior(d / "prior16.pt", model="wrn-16-1"),
        "junk": d / "junk.npz", "keys": variant("keys.npz", x_train=None),
        "shape": variant("shape.npz", x_train=np.zeros((64, 7), np.uint8)),
        "nan": variant("nan.npz", x_test=np.full((32, 32, 32, 3), np.nan, np.float32)),
        "range": variant("range.npz", y_train=arrays["y_train"] + 7),
        "oneclass": variant("oneclass.npz", y_train=np.zeros(64, np.int64)),
        "empty": variant("empty.npz", x_test=np.zeros((0, 32, 32, 3), np.uint8), y_test=np.zeros(0, np.int64)),
    }
    f["junk"].write_bytes(b"\x00garbage, not an npz")
    raw = (d / "good.npz").read_bytes()
    (d / "trunc.npz").write_bytes(raw[: len(raw) // 3])
    f["trunc"] = str(d / "trunc.npz")
    (d / "badprior.pt").write_bytes(b"not a checkpoint")
    f["badprior"] = str(d / "badprior.pt")
    (d / "existing_run").mkdir()
    (d / "existing_run" / "notes.txt").write_text("precious")
    (d / "a_file").write_text("i am a file")
    from dprandp.models import create_model
    from dprandp.pipeline.finish import save_model
    from dprandp.data import load_dataset

    three = load_dataset("npz", variant("three.npz", y_train=arrays["y_train"] % 3, y_test=arrays["y_test"] % 3))
    save_model(d / "model3.pt", create_model("wrn-10-1", num_classes=3, seed=0), model_name="wrn-10-1",
               data=three, extra={})
    (d / "badmodel.pt").write_bytes(b"\x80\x02garbage")
    np.save(d / "store.npy", np.zeros((8, 16, 16, 3), np.uint8))
    f["store"] = str(d / "store.npy")
    nan_prior = torch.load(f["prior"], weights_only=True)
    next(iter(nan_prior["trunk"].values())).fill_(float("nan"))
    torch.save(nan_prior, d / "nanprior.pt")
    f["nanprior"] = str(d / "nanprior.pt")
    nan_model = torch.load(d / "model3.pt", weights_only=True)
    next(iter(nan_model["state_dict"].values())).fill_(float("nan"))
    torch.save(nan_model, d / "nanmodel.pt")
    f["nanmodel"] = str(d / "nanmodel.pt")
    (d / "npy_as.npz").write_bytes((d / "store.npy").read_bytes())
    f["npy_as_npz"] = str(d / "npy_as.npz")
    (d / "broken.png").write_bytes(b"\x89PNG but not really")
    return f


def train_cmd(f, data_key="good", *extra, dataset="npz", prior="prior"):
    args = ["train", *tiny_flags(f[data_key] if data_key in f else data_key), "--steps", "2"]
    args[args.index("--dataset") + 1] = dataset
    if prior:
        args += ["--prior", str(f[prior]) if prior in f else prior]
    return args + ["--out", str(f["dir"] / "newrun"), *extra]


CASES = {
    "unknown dataset": lambda f: train_cmd(f, dataset="imagenet"),
    "missing file": lambda f: train_cmd(f, str(f["dir"] / "nope.npz")),
    "corrupt file": lambda f: train_cmd(f, str(f["junk"])),
    "truncated file": lambda f: train_cmd(f, "trunc"),
    "wrong keys": lambda f: train_cmd(f, "keys"),
    "wrong shapes": lambda f: train_cmd(f, "shape"),
    "NaN pixels": lambda f: train_cmd(f, "nan"),
    "labels out of range (cifar10)": lambda f: train_cmd(f, "range", dataset="cifar10"),
    "fewer than 2 classes": lambda f: train_cmd(f, "oneclass"),
    "empty split": lambda f: train_cmd(f, "empty"),
    "prior of another architecture": lambda f: train_cmd(f, prior="prior16"),
    "corrupt prior": lambda f: train_cmd(f, prior="badprior"),
    "missing prior": lambda f: train_cmd(f, prior=str(f["dir"] / "nope.pt")),
    "no --prior": lambda f: train_cmd(f, prior=None),
    "epsilon zero": lambda f: train_cmd(f, "good", "--epsilon", "0"),
    "epsilon negative": lambda f: train_cmd(f, "good", "--epsilon", "-1"),
    "epsilon nan": lambda f: train_cmd(f, "good", "--epsilon", "nan"),
    "delta >= 1/N": lambda f: train_cmd(f, "good", "--delta", "0.02"),
    "delta >= 1": lambda f: train_cmd(f, "good", "--delta", "1.5"),
    "noise too small for epsilon": lambda f: train_cmd(f, "good", "--noise-multiplier", "1.5", "--epsilon", "1"),
    "batch larger than dataset": lambda f: train_cmd(f, "good", "--batch-size", "1000"),
    "existing run dir": lambda f: train_cmd(f)[:-2] + ["--out", str(f["dir"] / "existing_run")],
    "overwrite a non-run dir": lambda f: train_cmd(f)[:-2] + ["--out", str(f["dir"] / "existing_run"), "--overwrite"],
    "unwritable output": lambda f: train_cmd(f)[:-2] + ["--out", str(f["dir"] / "a_file" / "run")],
    "resume a missing dir": lambda f: ["train", "--resume", str(f["dir"] / "nope")],
    "resume a non-run dir": lambda f: ["train", "--resume", str(f["dir"] / "existing_run")],
    "resume with flags": lambda f: ["train", "--resume", str(f["dir"] / "existing_run"), "--epsilon", "2"],
    "unknown preset": lambda f: train_cmd(f, "good", "--preset", "gpu"),
    "epsilon above the maximum": lambda f: train_cmd(f, "good", "--epsilon", "1e9"),
    "head pool finer than the feature grid": lambda f: train_cmd(f, "good", "--head-pool", "1000"),
    "prior is a directory": lambda f: train_cmd(f, prior=str(f["dir"] / "existing_run")),
    "phase II steps without a prior": lambda f: train_cmd(f, "good", "--phase2-steps", "1", prior="none"),
    "phase II share without a prior": lambda f: train_cmd(f, "good", "--phase2-share", "0.5", prior="none"),
    "steps and phase III steps disagree without a prior": lambda f: train_cmd(f, "good", "--phase3-steps", "5",
                                                                              prior="none"),
    "evaluate: missing model": lambda f: ["evaluate", "--model", str(f["dir"] / "nope.pt"), "--dataset", "npz",
                                          "--data", f["good"]],
    "evaluate: corrupt model": lambda f: ["evaluate", "--model", str(f["dir"] / "badmodel.pt"), "--dataset", "npz",
                                          "--data", f["good"]],
    "evaluate: a prior is not a model": lambda f: ["evaluate", "--model", f["prior"], "--dataset", "npz",
                                                   "--data", f["good"]],
    "evaluate: class count mismatch": lambda f: ["evaluate", "--model", str(f["dir"] / "model3.pt"),
                                                 "--dataset", "npz", "--data", f["good"]],
    "evaluate: an unknown device": lambda f: ["evaluate", "--model", str(f["dir"] / "model3.pt"), "--dataset", "npz",
                                              "--data", f["good"], "--device", "gpu"],
    "evaluate: a CUDA index the machine lacks": lambda f: ["evaluate", "--model", str(f["dir"] / "model3.pt"),
                                                           "--dataset", "npz", "--data", f["good"], "--device", "cuda:64"],
    "run: epsilon zero": lambda f: ["run", "--epsilon", "0", "--out", str(f["dir"] / "newrun")],
    "run: delta >= 1/N (digits)": lambda f: ["run", "--prior", "none", "--delta", "0.01",
                                             "--out", str(f["dir"] / "newrun")],
    "run: --prior with Phase I flags": lambda f: ["run", "--prior", "none", "--pretrain-epochs", "3", "--no-cache",
                                                  "--out", str(f["dir"] / "newrun")],
    "run: negative --pretrain-seed": lambda f: ["run", "--pretrain-seed", "-1", "--out", str(f["dir"] / "newrun")],
    "tune: a grid setting that changes the mechanism": lambda f: tune_cmd(f, "--grid", "steps=1,2"),
    "tune: a grid value that is no number": lambda f: tune_cmd(f, "--grid", "lr-phase3=fast"),
    "tune: a grid without '='": lambda f: tune_cmd(f, "--grid", "lr-phase3"),
    "tune: no grid": lambda f: tune_cmd(f),
    "tune: no validation split": lambda f: tune_cmd(f, "--grid", "lr-phase3=1,2", val=None),
    "tune: fewer than one run on average": lambda f: tune_cmd(f, "--grid", "lr-phase3=1", "--runs-mean", "0.5"),
    "tune: a negative shape": lambda f: tune_cmd(f, "--grid", "lr-phase3=1", "--runs-shape", "-1"),
    "tune: the score noise alone spends the budget": lambda f: tune_cmd(f, "--grid", "lr-phase3=1", "--score-noise",
                                                                        "0.5", "--runs-mean", "20"),
    "tune: noiseless score": lambda f: tune_cmd(f, "--grid", "lr-phase3=1", "--score-noise", "0"),
    "tune: an astronomical score noise": lambda f: tune_cmd(f, "--grid", "lr-phase3=1", "--score-noise", "1e308"),
    "tune: a missing prior": lambda f: tune_cmd(f, "--grid", "lr-phase3=1,2", "--prior", str(f["dir"] / "nope.pt")),
    "tune: a corrupt prior": lambda f: tune_cmd(f, "--grid", "lr-phase3=1,2", "--prior", f["badprior"]),
    "tune: a prior of another architecture": lambda f: tune_cmd(f, "--grid", "lr-phase3=1,2", "--prior", f["prior16"]),
    "tune: a CUDA index the machine lacks": lambda f: tune_cmd(f, "--grid", "lr-phase3=1,2", "--device", "cuda:64"),
    "tune: deterministic noise": lambda f: tune_cmd(f, "--grid", "lr-phase3=1", "--deterministic-noise"),
    "tune: output exists": lambda f: tune_cmd(f, "--grid", "lr-phase3=1", out=str(f["dir"])),
    "tune: output under a file": lambda f: tune_cmd(f, "--grid", "lr-phase3=1", out=str(f["dir"] / "a_file" / "t")),
    "tune: a freeze-stages value the model lacks": lambda f: tune_cmd(f, "--grid", "freeze-stages=0,99"),
    "tune: a head pool finer than the feature grid": lambda f: tune_cmd(f, "--grid", "head-pool=1,1000"),
    "predict: missing images": lambda f: predict_cmd(f, str(f["dir"] / "nope")),
    "predict: a folder without images": lambda f: predict_cmd(f, str(f["dir"] / "existing_run")),
    "predict: a corrupt image": lambda f: predict_cmd(f, str(f["dir"] / "broken.png")),
    "predict: a text file": lambda f: predict_cmd(f, str(f["dir"] / "existing_run" / "notes.txt")),
    "predict: a corrupt .npz": lambda f: predict_cmd(f, str(f["junk"])),
    "predict: an .npz array that is not images": lambda f: predict_cmd(f, f["shape"], "--key", "x_train"),
    "predict: an .npz key that is missing": lambda f: predict_cmd(f, f["good"], "--key", "pixels"),
    "predict: --key on a .npy": lambda f: predict_cmd(f, f["store"], "--key", "x"),
    "predict: a prior is not a model": lambda f: predict_cmd(f, f["store"], model=f["prior"]),
    "predict: output exists": lambda f: predict_cmd(f, f["store"], "--out", str(f["dir"] / "a_file")),
    "predict: output under a file": lambda f: predict_cmd(f, f["store"], "--out", str(f["dir"] / "a_file" / "p.csv")),
    "predict: output is a directory": lambda f: predict_cmd(f, f["store"], "--out", str(f["dir"] / "existing_run"),
                                                            "--overwrite"),
    "predict: an unknown device": lambda f: predict_cmd(f, f["store"], "--device", "tpu"),
    "pretrain: output under a file": lambda f: pretrain_cmd(f, "--out", str(f["dir"] / "a_file" / "p.pt")),
    "pretrain: negative seed": lambda f: pretrain_cmd(f, "--seed", "-1"),
    "train: both --phase2-steps and --phase2-share": lambda f: train_cmd(f, "good", "--phase2-steps", "1",
                                                                        "--phase2-share", "0.5"),
    "train: --resume with --overwrite": lambda f: ["train", "--resume", str(f["dir"] / "existing_run"), "--overwrite"],
    "tune: a grid setting also fixed by its flag": lambda f: tune_cmd(f, "--grid", "lr-phase3=1,2", "--lr-phase3", "3"),
    "tune: a Phase II grid without a prior": lambda f: tune_cmd(f, "--grid", "lr-phase2=1,2", "--prior", "none"),
    "train: a million threads": lambda f: train_cmd(f, "good", "--threads", "1000000"),
    "pretrain: a trillion images": lambda f: ["pretrain", "--process", "spectrum", "--num", "1000000000000",
                                              "--out", str(f["dir"] / "newprior.pt")],
    "predict: a model with non-finite weights": lambda f: predict_cmd(f, f["store"], model=f["nanmodel"]),
    "predict: --out under a file": lambda f: predict_cmd(f, f["store"], "--out", str(f["dir"] / "a_file" / "x.csv")),
    "train: an lr beyond float32": lambda f: train_cmd(f, "good", "--lr-phase3", "1e308"),
    "train: a clipping norm beyond float32": lambda f: train_cmd(f, "good", "--max-grad-norm", "1e308"),
    "train: a negative seed": lambda f: train_cmd(f, "good", "--seed", "-1"),
    "train: a prior with non-finite weights": lambda f: train_cmd(f, prior="nanprior"),
    "tune: a prior with non-finite weights": lambda f: tune_cmd(f, "--grid", "lr-phase3=1,2", "--prior", f["nanprior"]),
    "pretrain: an infinite lr": lambda f: pretrain_cmd(f, "--lr-per-256", "inf"),
    "pretrain: a seed above 2**63": lambda f: pretrain_cmd(f, "--seed", "99999999999999999999999"),
    "train: an .npy renamed .npz": lambda f: train_cmd(f, f["npy_as_npz"]),
    "predict: an .npy renamed .npz": lambda f: predict_cmd(f, f["npy_as_npz"]),
    "pretrain: a text file as the store": lambda f: pretrain_cmd(f)[:1] + ["--images", str(f["dir"] / "a_file")]
    + pretrain_cmd(f)[3:],
    "predict: --out is the --images file": lambda f: predict_cmd(f, f["store"], "--out", f["store"], "--overwrite"),
    "predict: --out is the model": lambda f: predict_cmd(f, f["store"], "--out", str(f["dir"] / "model3.pt"),
                                                         "--overwrite"),
    "pretrain: --out is the --images store": lambda f: pretrain_cmd(f, "--out", f["store"], "--overwrite"),
    "train: --data inside the --out that --overwrite deletes": lambda f: train_cmd(f, "good")[:-2] + [
        "--out", str(f["dir"]), "--overwrite"],
}


def predict_cmd(f, images, *extra, model=None):
    return ["predict", "--model", model or str(f["dir"] / "model3.pt"), "--images", images, *extra]


def pretrain_cmd(f, *extra):
    out = [] if "--out" in extra else ["--out", str(f["dir"] / "newprior.pt")]
    return ["pretrain", "--images", f["store"], "--preset", "cpu", "--model", "wrn-10-1", "--epochs", "1",
            "--batch-size", "4", "--no-progress", *out, *extra]


def tune_cmd(f, *extra, val="0.25", out=None):
    return ["tune", *tiny_flags(f["good"]), "--prior", f["prior"], "--epsilon", "1",
            *(["--val-fraction", val] if val else []), "--out", out or str(f["dir"] / "newtune"), *extra]


def snapshot(d):
    return {p.relative_to(d): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, files, capsys):
    before = snapshot(files["dir"])
    with pytest.raises(SystemExit) as exc:
        main(CASES[case](files))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dprandp: error: "), err
    assert "Traceback" not in err
    assert snapshot(files["dir"]) == before  # nothing written, nothing overwritten


def test_console_script_path(files):
    r = subprocess.run([sys.executable, "-m", "dprandp", *train_cmd(files, "nan")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "NaN" in r.stderr


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_missing_model_is_named_before_the_data_is_read(command, files, capsys):
    """The cheap check first: a missing model file is reported even when the data is missing too."""
    data = ["--dataset", "npz", "--data", str(files["dir"] / "no-data.npz")] if command == "evaluate" else \
        ["--images", str(files["dir"] / "no-images")]
    with pytest.raises(SystemExit) as exc:
        main([command, "--model", str(files["dir"] / "nope.pt"), *data])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "model file not found" in err and "no-" not in err


def test_an_input_inside_a_run_directory_that_overwrite_deletes_is_refused(files, tmp_path, capsys):
    """--overwrite deletes the old run directory before training: a prior kept inside it would be
    destroyed first. Refused with one line, the run directory and its prior untouched."""
    import shutil

    run = tmp_path / "old_run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # a dprandp run directory, so --overwrite alone would delete it
    prior = run / "prior.pt"
    shutil.copy(files["prior"], prior)
    before = snapshot(run)
    with pytest.raises(SystemExit) as exc:
        main(["train", *tiny_flags(files["good"]), "--prior", str(prior), "--epsilon", "1", "--out", str(run),
              "--overwrite"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "lies inside the output directory" in err and snapshot(run) == before


def test_resume_names_the_flags_to_drop(files, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(files["dir"] / "existing_run"), "--epsilon", "2", "--out", "x"])
    assert "drop --epsilon, --out" in capsys.readouterr().err


@pytest.mark.parametrize("error, size", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 96000000000 bytes. Error code 12 (Cannot allocate memory)"), "96 GB"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139 GiB"),
     "2.00 GiB"),
    (MemoryError(), None),
])
def test_out_of_memory_is_one_line_naming_the_memory_options(error, size, files, tmp_path, monkeypatch, capsys):
    import dprandp.pipeline

    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(dprandp.pipeline, "train", oom)
    with pytest.raises(SystemExit) as exc:
        main(["train", *tiny_flags(files["good"]), "--prior", "none", "--epsilon", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == 1 and len(lines) == 1 and lines[0].startswith("dprandp: error: out of memory"), err
    assert "--physical-batch-size" in err and (size is None or f"allocation of {size}" in err)


def test_an_internal_error_is_not_disguised_as_out_of_memory(files, tmp_path, monkeypatch):
    import dprandp.pipeline

    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(dprandp.pipeline, "train", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["train", *tiny_flags(files["good"]), "--prior", "none", "--epsilon", "1", "--out", str(tmp_path / "r")])
