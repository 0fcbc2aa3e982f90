"""The README's results table, rendered from the measured runs (issue 7).

    python bench/readme_results.py            # rewrite the table in README.md
    python bench/readme_results.py --check    # exit 1 if README.md's table is not what the runs give

Sources, one JSON line per measured run:

* ``bench/results/utility.jsonl``: ``bench/utility.py``, Phases II + III on a stored prior;
* ``bench/results/pipeline_run.jsonl``: ``bench/pipeline_run.py``, the whole ``dprandp run``, Phase I
  included (it records the prior's Phase I recipe itself);
* ``bench/results/priors.json``: the Phase I recipe of each prior by SHA-256, for the runs recorded
  before the records carried it (both scripts now store the recipe read from the prior file).

A table row is a rule, not a list of runs. A run enters the `cpu` preset's row when its DP settings
are the preset's (read from :data:`dprandp.pipeline.config.PRESETS`, so the row follows the preset)
and its prior was pretrained with the `cpu` preset's Phase I recipe (read from
:data:`dprandp.pretrain.config.PRESETS`). Runs on a validation split never enter. A cell is the
mean ± sample std over the runs that match, with n; a prior with several runs counts once per run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- begin: results-table (bench/readme_results.py) -->", "<!-- end: results-table -->"
EPSILONS = (1.0, 2.0, 4.0, 8.0)
#: The DP settings a run must share with the preset to enter its row (engineering knobs such as the
#: physical batch, checkpoints and evaluation cadence do not change the result).
DP_KEYS = ("dataset", "model", "head_pool", "batch_size", "augmult", "steps", "phase2_steps", "lr_phase2", "lr_phase3",
           "momentum", "max_grad_norm", "ema", "phase2_features", "precision", "freeze_stages")
#: What makes two priors the same recipe (the seed does not).
RECIPE_KEYS = ("model", "process", "num_images", "image_size", "epochs", "batch_size", "lr_per_256")
#: Each baseline's own validated recipe (BENCHMARKS.md, utility_tuning): the linear probe trains all
#: its steps in Phase II with momentum; scratch has no Phase II, and its lr was re-validated at T = 300
#: only at epsilon = 1 (lr 2); above it the earlier choice (lr 4, at T = 100) ran.
LINEAR_PROBE = {"lr_phase2": 0.5, "momentum": 0.9}
SCRATCH_LR = {1.0: 2.0, 2.0: 4.0, 4.0: 4.0, 8.0: 4.0}
#: The preset's earlier Phase I recipes (the keys that differ from today's), oldest first: the preset's
#: own runs on such priors get rows of their own, and the baselines measured on them name them.
PHASE1_UNTIL_SESSION_14 = {"num_images": 15_000}
EARLIER_PRESETS = ((PHASE1_UNTIL_SESSION_14, "the preset until session 14"),
                   ({"num_images": 24_000}, "the preset in sessions 15-16"))
#: The Phase I recipe each baseline was measured on (its row names it when it is not the preset's).
BASELINE_PHASE1 = {"k1": PHASE1_UNTIL_SESSION_14, "lp": {}, "nonprivate": {}}
PAPER = {"randp": "72.3 %", "lp": "61.3 %", "scratch": "56.8 % (De et al.)"}  # SPEC.md, eps = 1, WRN-16-4


@dataclass(frozen=True)
class Run:
    """One measured run, from either source, in the terms the rules need."""

    arm: str
    epsilon: float  # the target; "inf" for the non-private ceiling
    config: dict
    prior_recipe: dict | None
    test_accuracy: float
    test_accuracy_flip: float | None
    wall_s: float
    prior_id: str | None  # the prior's SHA-256, or a name for a fresh prior whose hash was not recorded
    whole_pipeline: bool = False  # Phase I included (bench/pipeline_run.py)
    shared: bool = True  # a second job held the other core
    oversubscribed: bool = False  # more jobs than cores: its wall time says nothing about the run
    command: str = ""
    prior_name: str | None = None  # the prior file's short name (priors.json or the record), if known


@dataclass(frozen=True)
class Row:
    label: str
    arm: str
    settings: dict = field(default_factory=dict)  # DP settings that must match (others: the preset's)
    metric: str = "test_accuracy"
    ignore: tuple[str, ...] = ()  # DP keys this arm does not read
    recipe: dict = field(default_factory=dict)  # Phase I recipe keys that differ from the preset's


def load_runs(results: Path = RESULTS) -> list[Run]:
    """Every run of both sources; a config key a run did not record (the option came later) takes
    its default, which is what that run used."""
    from dataclasses import fields

    from dprandp.pipeline.config import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    priors = json.loads((results / "priors.json").read_text()) if (results / "priors.json").exists() else {}
    runs = []
    for name, whole in (("utility.jsonl", False), ("pipeline_run.jsonl", True)):
        path = results / name
        if not path.exists():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            r = json.loads(line)
            prior_id = r.get("prior_sha256") or (f"{name}:{number}" if whole else None)
            known = priors.get(r.get("prior_sha256") or "", {})
            recipe = r.get("prior_recipe") or known.get("recipe")
            config = {k: v for k, v in (r.get("config") or {}).items() if v is not None}
            if not whole:
                config.setdefault("dataset", "cifar10")  # bench/utility.py runs CIFAR-10 only
            config = {**defaults, **config}
            runs.append(Run(arm=r["arm"], epsilon=float(r["epsilon_target"]), config=config,
                            prior_recipe=recipe, prior_id=prior_id, test_accuracy=r["test_accuracy"],
                            test_accuracy_flip=r.get("test_accuracy_flip"), wall_s=r["wall_s"],
                            whole_pipeline=whole, shared=r.get("cores_shared_with_another_run", True),
                            oversubscribed=bool(r.get("oversubscribed", False)),
                            command=r.get("command", ""), prior_name=short_name(known.get("file") or r.get("prior_file"))))
    return runs


def short_name(prior_file: str | None) -> str | None:
    """``prior-cpu-n36k.pt`` -> ``n36k``: the name the README's prose uses."""
    if not prior_file:
        return None
    return Path(prior_file).name.removesuffix(".pt").removeprefix("prior-cpu-")


def provenance(run: Run, metric: str) -> str:
    """One run of a cell: its accuracy and where it came from (its prior, or a whole-pipeline run)."""
    value = f"{100 * getattr(run, metric):.2f}"
    where = [f"`{run.prior_name}`"] if run.prior_name else []
    if run.whole_pipeline:
        where.append("end to end, fresh prior" if not run.prior_name else "end to end")
    return f"{value} ({', '.join(where)})" if where else value


@functools.cache
def preset_at(epsilon: float = 1.0) -> dict:
    """The `cpu` preset's DP settings at a target epsilon (its lr_III depends on it)."""
    from dprandp.pipeline.config import preset

    dp = preset("cpu", prior="a prior", target_epsilon=epsilon if math.isfinite(epsilon) else 1.0).to_dict()
    return {k: dp[k] for k in DP_KEYS}


def preset_recipes() -> tuple[dict, dict]:
    """The `cpu` preset's DP settings (at epsilon = 1) and its Phase I recipe."""
    from dataclasses import asdict

    from dprandp.pretrain.config import preset as pretrain_preset

    phase1 = asdict(pretrain_preset("cpu"))
    return preset_at(1.0), {k: phase1[k] for k in RECIPE_KEYS}


def rows(dp: dict, phase1: dict) -> list[Row]:
    k = dp["augmult"]
    lp = {**LINEAR_PROBE, "phase2_steps": dp["steps"]}

    def images(recipe: dict, sep: str = ", ") -> str:
        """The row's Phase I image count, named only where it is not the preset's."""
        n = recipe.get("num_images", phase1["num_images"])
        return "" if n == phase1["num_images"] else f"{sep}{n // 1000}k Phase I images"

    out = [Row(f"**DP-RandP (Phases I + II + III), the `cpu` preset (K = {k})**", "randp"),
           Row("the same, with flip test-time augmentation", "randp", metric="test_accuracy_flip")]
    for recipe, when in reversed(EARLIER_PRESETS):
        out += [Row(f"DP-RandP with {images(recipe, '')} ({when})", "randp", recipe=recipe),
                Row("the same, with flip test-time augmentation", "randp", metric="test_accuracy_flip", recipe=recipe)]
    k1 = BASELINE_PHASE1["k1"]
    if k != 1:
        out += [Row(f"DP-RandP with K = 1{images(k1)}", "randp", {"augmult": 1}, recipe=k1),
                Row("the same, with flip test-time augmentation", "randp", {"augmult": 1}, "test_accuracy_flip",
                    recipe=k1)]
    out += [Row("DP-RandP without Phase III (linear probe; K does not enter, Phase II trains on cached features"
                f"{images(BASELINE_PHASE1['lp'], '; ')})", "lp", lp, ignore=("augmult", "lr_phase3"),
                recipe=BASELINE_PHASE1["lp"]),
            Row(f"DP-SGD from scratch, K = {k}", "scratch", ignore=("phase2_steps", "lr_phase2", "phase2_features")),
            Row("DP-SGD from scratch, K = 1", "scratch", {"augmult": 1},
                ignore=("phase2_steps", "lr_phase2", "phase2_features")) if k != 1 else None,
            Row("non-private ceiling (the prior fine-tuned without clipping or noise)"
                f"{images(BASELINE_PHASE1['nonprivate'])}", "nonprivate", recipe=BASELINE_PHASE1["nonprivate"])]
    return [r for r in out if r is not None]


def matches(run: Run, row: Row, dp: dict, phase1: dict) -> bool:
    if run.arm != row.arm or run.config.get("val_fraction", 0.0) or run.config.get("dataset") != dp["dataset"]:
        return False
    if row.arm != "scratch":
        recipe = run.prior_recipe or {}
        if any(recipe.get(k) != v for k, v in {**phase1, **row.recipe}.items()):
            return False
    if row.arm == "nonprivate":  # its own fixed recipe; only the model and head must be the preset's
        return all(run.config.get(k) == dp[k] for k in ("model", "head_pool"))
    want = {**preset_at(run.epsilon), **row.settings}
    if row.arm == "scratch":
        want["lr_phase3"] = SCRATCH_LR.get(run.epsilon)
    return all(run.config.get(key) == value for key, value in want.items() if key not in row.ignore)


def cell(runs: list[Run], metric: str) -> str:
    """mean ± std % (n = runs, and how many priors they used when that is not one each)."""
    if not runs:
        return ""
    values = [100 * getattr(r, metric) for r in runs]
    priors = {r.prior_id for r in runs if r.prior_id is not None}
    n = f"n = {len(runs)}"
    if priors and len(priors) == len(runs):
        n += " priors" if len(runs) > 1 else ""
    elif priors:
        n += f" runs on {len(priors)} prior{'s' if len(priors) > 1 else ''}"
    if len(values) == 1:
        return f"{values[0]:.1f} % ({n})"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} % ({n})"


def minutes(seconds: list[float]) -> str:
    lo, hi = min(seconds) / 60, max(seconds) / 60
    return f"{lo:.0f} min" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f} min"


def render(runs: list[Run]) -> str:
    dp, phase1 = preset_recipes()
    lines = [("| arm | ε = 1 | ε = 2 | ε = 4 | ε = 8 | wall time per run: Phases II + III (1 thread with 2 runs "
              "sharing 2 cores, or 2 threads alone) · whole pipeline alone on the machine | paper at ε = 1 (WRN-16-4, GPU budget) |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    papered, commands, sources = set(), [], []
    for row in rows(dp, phase1):
        chosen = [r for r in runs if matches(r, row, dp, phase1) and getattr(r, row.metric) is not None]
        if row.arm == "nonprivate":
            cells = [cell(chosen, row.metric)] + [""] * 3
        else:
            cells = [cell([r for r in chosen if r.epsilon == eps], row.metric) for eps in EPSILONS]
        if row.metric == "test_accuracy":
            dp_only = [r.wall_s for r in chosen if not r.whole_pipeline and not r.oversubscribed]
            alone = [r.wall_s for r in chosen if r.whole_pipeline and not r.shared]
            wall = " · ".join(filter(None, [minutes(dp_only) if dp_only else "",
                                            f"{minutes(alone)} with Phase I" if alone else ""]))
            paper = PAPER.get(row.arm, "") if row.arm not in papered else ""
            papered.add(row.arm)
            if chosen:
                commands.append(f"- {row.label.strip('*')}: `{explicit(representative(chosen).command, row)}`")
                sources.append(cell_sources(row, chosen))
        else:
            wall, paper = "+ a second forward pass at test time", ""
        lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {wall} | {paper} |")
    by_lr: dict[float, list[str]] = {}
    for eps, lr in SCRATCH_LR.items():
        by_lr.setdefault(lr, []).append(f"{eps:g}")
    scratch = "; ".join(f"{lr:g} at ε = {', '.join(e)}" for lr, e in by_lr.items())
    lines += ["", (f"Rendered by `python bench/readme_results.py` from `bench/results/` (utility.jsonl, "
              f"pipeline_run.jsonl, priors.json): every run on the test set whose DP settings are the `cpu` "
              f"preset's (WRN-16-1, {dp['head_pool']} × {dp['head_pool']} head, B = {dp['batch_size']}, "
              f"T = {dp['steps']} with {dp['phase2_steps']} in Phase II, lr {dp['lr_phase2']:g} / "
              f"{lr_phase3_text()}, K = {dp['augmult']}) and whose prior is the preset's Phase I recipe "
              f"({phase1['num_images']} {phase1['process']} images, {phase1['epochs']} epochs). The linear probe "
              f"trains all {dp['steps']} steps at lr "
              f"{LINEAR_PROBE['lr_phase2']:g} with momentum {LINEAR_PROBE['momentum']:g}; scratch uses lr "
              f"{scratch} (re-validated at T = {dp['steps']} at ε = 1 and ε = 4). The ceiling sees as many "
              "sample-views as the K = 1 DP arms.")]
    lines += ["", ("One command per row, the whole pipeline where it was run so, else at ε = 1 (`--epsilon` "
              "sets the other columns, and a scratch row's `--lr-phase3` is the lr above for that ε; the prior files "
              "are named in BENCHMARKS.md with their SHA-256):"), "",
              *commands]
    lines += ["", "<details><summary>The runs in each cell (test accuracy %, and the prior)</summary>", "", *sources,
              "", "</details>"]
    return "\n".join(lines)


def cell_sources(row: Row, chosen: list[Run]) -> str:
    """The row's runs, cell by cell, in the order they were recorded (the flip rows use the same runs)."""
    if row.arm == "nonprivate":
        groups = [("", chosen)]
    else:
        groups = [(f"ε = {eps:g}: ", [r for r in chosen if r.epsilon == eps]) for eps in EPSILONS]
    cells = [label + ", ".join(provenance(r, row.metric) for r in runs) for label, runs in groups if runs]
    return f"- {row.label.strip('*')}: " + "; ".join(cells)


def lr_phase3_text() -> str:
    """The preset's lr_III and the table's epsilons from which it changes (read from the preset)."""
    at = {eps: preset_at(eps)["lr_phase3"] for eps in EPSILONS}
    changes = [f"{at[eps]:g} from ε = {eps:g}" for before, eps in itertools.pairwise(EPSILONS) if at[eps] != at[before]]
    return f"{at[EPSILONS[0]]:g}" + (f" ({'; '.join(changes)})" if changes else "")


def explicit(command: str, row: Row) -> str:
    """``command`` with the row's own settings spelled out, so that it stays exact when the preset moves
    (a whole-pipeline command also names the row's Phase I recipe; a ``train`` command names its prior file)."""
    flags = {"--" + key.replace("_", "-"): value for key, value in row.settings.items()}
    if command.startswith("dprandp run"):
        flags.update({PHASE1_FLAGS[key]: value for key, value in row.recipe.items()})
    for flag, value in flags.items():
        if f"{flag} " not in f"{command} ":
            command += f" {flag} {value:g}"
    return command


#: ``dprandp run``'s flag for each Phase I recipe key a row may change.
PHASE1_FLAGS = {"num_images": "--pretrain-images", "epochs": "--pretrain-epochs"}


def representative(runs: list[Run]) -> Run:
    """The run whose command stands for a row: a whole pipeline alone on the machine, else ε = 1."""
    return min(runs, key=lambda r: (not (r.whole_pipeline and not r.shared), r.epsilon != 1.0, r.epsilon))


def replace_block(text: str, table: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no results-table markers ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def render_into(readme: Path = README, *, check: bool = False) -> bool:
    """Rewrite the table in ``readme`` (or, with ``check``, only compare); True if it was up to date."""
    text = readme.read_text()
    new = replace_block(text, render(load_runs()))
    if not check and new != text:
        readme.write_text(new)
    return new == text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md's table is out of date")
    a = ap.parse_args()
    up_to_date = render_into(README, check=a.check)
    if a.check and not up_to_date:
        sys.exit("README.md's results table is out of date: run `python bench/readme_results.py`")
    print(f"{README}: the results table is {'up to date' if up_to_date else 'rewritten' if not a.check else 'stale'}")


if __name__ == "__main__":
    main()
