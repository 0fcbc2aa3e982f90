"""The README's results table is rendered from the measured runs by rule (bench/readme_results.py)."""

import json

import pytest

from bench import readme_results as rr

PRESET_RECIPE = {"model": "wrn-16-1", "process": "stylegan-oriented", "num_images": 36000, "image_size": 64,
                 "epochs": 48, "batch_size": 128, "lr_per_256": 0.12, "seed": 0}
PRESET_DP = {"dataset": "cifar10", "model": "wrn-16-1", "head_pool": 4, "batch_size": 1000, "augmult": 2,
             "steps": 300, "phase2_steps": 60, "lr_phase2": 8.0, "lr_phase3": 2.0, "momentum": 0.0,
             "phase2_features": "cached", "precision": "fp32"}


def test_the_readme_table_is_what_the_committed_runs_give():
    text = rr.README.read_text()
    assert rr.BEGIN in text and rr.END in text
    assert rr.replace_block(text, rr.render(rr.load_runs())) == text, \
        "README.md's results table is out of date: run `python bench/readme_results.py`"


def test_the_rule_reads_the_preset_from_the_code():
    from dprandp.pipeline.config import PRESETS

    dp, phase1 = rr.preset_recipes()
    assert dp["augmult"] == PRESETS["cpu"]["augmult"] and dp["steps"] == PRESETS["cpu"]["steps"]
    assert phase1["epochs"] == 48 and phase1["num_images"] == 36000


def _write(tmp_path, utility=(), pipeline=(), priors=None):
    (tmp_path / "utility.jsonl").write_text("".join(json.dumps(r) + "\n" for r in utility))
    (tmp_path / "pipeline_run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pipeline))
    (tmp_path / "priors.json").write_text(json.dumps(priors or {}))
    return rr.load_runs(tmp_path)


def _run(acc, *, eps=1.0, sha="a" * 64, val=0.0, **config):
    return {"arm": "randp", "epsilon_target": eps, "test_accuracy": acc, "test_accuracy_flip": acc + 0.01,
            "wall_s": 600.0, "prior_sha256": sha, "config": {**PRESET_DP, "val_fraction": val, **config}}


def _preset_row(runs):
    return rr.render(runs).splitlines()[2]


def test_a_cell_is_the_mean_and_std_of_exactly_the_matching_runs(tmp_path):
    priors = {"a" * 64: {"recipe": PRESET_RECIPE}, "b" * 64: {"recipe": PRESET_RECIPE},
              "c" * 64: {"recipe": {**PRESET_RECIPE, "epochs": 36}}}
    runs = _write(tmp_path, utility=[
        _run(0.60), _run(0.62, sha="b" * 64),
        _run(0.99, augmult=1),              # not the preset's K: the K = 1 row, not this one
        _run(0.99, lr_phase3=4.0),          # another lr
        _run(0.99, val=0.1),                # a validation-split run never enters
        _run(0.99, sha="c" * 64),           # a prior of another Phase I recipe
        _run(0.99, sha="d" * 64),           # an unknown prior
        _run(0.99, dataset="svhn"),
        _run(0.70, eps=8.0, lr_phase3=4.0),  # the preset's lr_III at epsilon = 8
        _run(0.99, eps=8.0),                # lr 2 is the preset only below epsilon = 4
    ], priors=priors)
    row = _preset_row(runs)
    assert "| 61.0 ± 1.4 % (n = 2 priors) |  |  | 70.0 % (n = 1) |" in row


def test_two_runs_on_one_prior_are_counted_as_runs_not_priors(tmp_path):
    runs = _write(tmp_path, utility=[_run(0.60), _run(0.62)], priors={"a" * 64: {"recipe": PRESET_RECIPE}})
    assert "61.0 ± 1.4 % (n = 2 runs on 1 prior)" in _preset_row(runs)


def test_whole_pipeline_runs_carry_their_own_prior_recipe(tmp_path):
    e2e = {**_run(0.64, sha=None), "prior_recipe": {**PRESET_RECIPE, "seed": 3}, "wall_s": 3600.0,
           "cores_shared_with_another_run": False}
    e2e_36 = {**_run(0.10, sha=None), "prior_recipe": {**PRESET_RECIPE, "epochs": 36}}
    runs = _write(tmp_path, pipeline=[e2e, e2e_36])
    row = _preset_row(runs)
    assert "| 64.0 % (n = 1) |" in row and "60 min with Phase I" in row


def test_a_prior_of_the_old_phase1_recipe_enters_its_own_row_only(tmp_path):
    old = {**PRESET_RECIPE, **rr.PHASE1_UNTIL_SESSION_14}
    runs = _write(tmp_path, utility=[_run(0.64), _run(0.60, sha="s" * 64), _run(0.99, sha="o" * 64)],
                  priors={"a" * 64: {"recipe": PRESET_RECIPE}, "s" * 64: {"recipe": old},
                          "o" * 64: {"recipe": {**old, "epochs": 36}}})
    lines = rr.render(runs).splitlines()
    assert "| 64.0 % (n = 1) |" in lines[2] and "60.0" not in lines[2]
    row = next(line for line in lines if "the preset until session 14" in line)
    assert "| 60.0 % (n = 1) |" in row and "99.0" not in row and "64.0" not in row


def test_a_whole_pipeline_command_names_the_rows_phase1_recipe():
    row = rr.Row("15k", "randp", recipe={"num_images": 15000})
    assert rr.explicit("dprandp run --preset cpu", row) == "dprandp run --preset cpu --pretrain-images 15000"
    assert rr.explicit("dprandp train --prior p.pt", row) == "dprandp train --prior p.pt"  # the file says it


@pytest.mark.parametrize("missing", ["begin", "end"])
def test_a_readme_without_markers_is_refused(missing):
    text = f"{rr.BEGIN}\nold\n{rr.END}".replace(rr.BEGIN if missing == "begin" else rr.END, "")
    with pytest.raises(SystemExit, match="markers"):
        rr.replace_block(text, "new")


def test_a_row_command_spells_out_the_settings_where_the_row_leaves_the_preset():
    row = rr.Row("K = 1", "randp", {"augmult": 1})
    assert rr.explicit("dprandp run --preset cpu --epsilon 1", row) == "dprandp run --preset cpu --epsilon 1 --augmult 1"
    assert rr.explicit("dprandp train --augmult 1 --epsilon 1", row) == "dprandp train --augmult 1 --epsilon 1"


def test_a_baseline_row_reads_only_priors_of_the_recipe_it_was_measured_on(tmp_path, monkeypatch):
    monkeypatch.setitem(rr.BASELINE_PHASE1, "lp", rr.PHASE1_UNTIL_SESSION_14)
    old = {**PRESET_RECIPE, **rr.PHASE1_UNTIL_SESSION_14}
    probe = {**PRESET_DP, "phase2_steps": 300, "lr_phase2": 0.5, "momentum": 0.9}
    runs = _write(tmp_path, utility=[{**_run(0.57, sha="o" * 64), "arm": "lp", "config": probe},
                                     {**_run(0.99), "arm": "lp", "config": probe}],
                  priors={"a" * 64: {"recipe": PRESET_RECIPE}, "o" * 64: {"recipe": old}})
    row = next(line for line in rr.render(runs).splitlines() if "linear probe" in line)
    assert "15k Phase I images" in row and "| 57.0 % (n = 1) |" in row and "99.0" not in row


def test_the_list_under_the_table_names_each_cells_runs_and_priors(tmp_path):
    e2e = {**_run(0.64, sha="e" * 64), "prior_recipe": PRESET_RECIPE, "cores_shared_with_another_run": False}
    runs = _write(tmp_path, utility=[{**_run(0.6012), "prior_file": "/somewhere/prior-cpu-n36k.pt"},
                                     _run(0.70, eps=8.0, sha="b" * 64, lr_phase3=4.0),
                                     _run(0.99, val=0.1)],  # a validation run is in no cell, so not listed
                  pipeline=[e2e, {**_run(0.62, sha=None), "prior_recipe": PRESET_RECIPE}],
                  priors={"a" * 64: {"recipe": PRESET_RECIPE},
                          "b" * 64: {"recipe": PRESET_RECIPE, "file": "my-prior.pt"},
                          "e" * 64: {"file": "prior-cpu-n36k-s1.pt"}})
    listed = next(line for line in rr.render(runs).splitlines() if line.startswith("- DP-RandP (Phases I + II + III)")
                  and "ε = 1:" in line)
    assert listed.endswith("ε = 1: 60.12 (`n36k`), 64.00 (`n36k-s1`, end to end), 62.00 (end to end, fresh prior); "
                           "ε = 8: 70.00 (`my-prior`)")
