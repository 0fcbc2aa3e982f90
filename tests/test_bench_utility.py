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
