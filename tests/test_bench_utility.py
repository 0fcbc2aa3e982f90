"""bench/utility.py re-renders its BENCHMARKS.md table from the results and keeps the analysis above it."""

from bench import utility as u
from bench._report import kept_note


def current_note(section, bench):
    return kept_note(section, u.TITLES.get(section, f"## {section}"), u.TABLE_HEADER, bench)


def _record(acc, eps=1.0):
    return {"arm": "randp", "epsilon_target": eps, "seed": 0, "test_accuracy": acc, "epsilon": eps,
            "noise_multiplier": 1.5, "steps": 300, "wall_s": 60.0, "command": "dprandp train ...",
            "prior_file": "p.pt", "prior_sha256": "ab" * 32, "config": {"batch_size": 1000, "lr_phase3": 2.0}}


def test_a_rerender_keeps_the_hand_written_analysis(tmp_path):
    bench = tmp_path / "BENCHMARKS.md"
    note = "### Session 9: what we learned\n\n- a finding, with | a pipe"
    old = u.render([_record(0.60)], note, "utility")
    bench.write_text(f"# B\n\n<!-- begin: other -->\n{u.TABLE_HEADER} x |\n<!-- end: other -->\n\n"
                     f"<!-- begin: utility -->\n{old}\n\nCommand: `x`\n<!-- end: utility -->\n")
    assert current_note("utility", bench) == note
    new = u.render([_record(0.60), _record(0.70, eps=2.0)], current_note("utility", bench), "utility")
    assert new.startswith(u.TITLES["utility"] + "\n\n" + note + "\n\n" + u.TABLE_HEADER)
    assert "70.0 (n = 1)" in new and "60.0 (n = 1)" in new


def test_no_note_where_the_section_or_its_table_is_missing(tmp_path):
    bench = tmp_path / "BENCHMARKS.md"
    assert current_note("utility", bench) == ""
    bench.write_text(f"<!-- begin: utility -->\nno table\n<!-- end: utility -->\n<!-- begin: x -->\n{u.TABLE_HEADER}\n"
                     "<!-- end: x -->\n")
    assert current_note("utility", bench) == ""  # another section's table is not this one's


def _namespace(**given):
    import argparse

    base = {k: None for k in u.RECIPE_OPTIONS}
    base.update(freeze_stages=[0], prior="p.pt", model="wrn-16-1", val_fraction=0.0, precision="fp32")
    return argparse.Namespace(**{**base, **given})


def test_unset_options_take_each_arms_validated_recipe_at_each_epsilon():
    from bench.readme_results import LINEAR_PROBE, SCRATCH_LR
    from dprandp.pipeline import preset

    for eps in (1.0, 4.0):
        cfg = preset("cpu", prior="p.pt", target_epsilon=eps)
        (randp,) = u.arm_grid("randp", _namespace(), eps)
        assert (randp.lr_phase2, randp.lr_phase3, randp.steps, randp.augmult, randp.head_pool, randp.momentum) == (
            cfg.lr_phase2, cfg.lr_phase3, cfg.steps, cfg.augmult, cfg.head_pool, cfg.momentum)
        assert round(randp.phase2_share * randp.steps) == cfg.phase2_steps
        assert randp.phase2_features == cfg.phase2_features
        (lp,) = u.arm_grid("lp", _namespace(), eps)
        assert (lp.lr_phase2, lp.momentum, lp.augmult) == (LINEAR_PROBE["lr_phase2"], LINEAR_PROBE["momentum"], 1)
        (scratch,) = u.arm_grid("scratch", _namespace(), eps)
        assert (scratch.lr_scratch, scratch.augmult) == (SCRATCH_LR[eps], 1)
    assert preset("cpu", prior="p.pt", target_epsilon=4.0).lr_phase3 != preset("cpu", prior="p.pt").lr_phase3


def test_given_options_override_the_recipe_and_span_the_grid():
    grid = u.arm_grid("randp", _namespace(lr_phase3=[1.0, 3.0], steps=[50], augmult=1), 1.0)
    assert [(g.lr_phase3, g.steps, g.augmult) for g in grid] == [(1.0, 50, 1), (3.0, 50, 1)]
    assert "--lr-phase3 3 " in u.command_for("randp", 1.0, 0, grid[1]) + " "
