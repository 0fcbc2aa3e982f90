"""DP-RandP on a small medical dataset: BreastMNIST (546 training images, 2 classes).

    python bench/breastmnist.py --prior PRIOR.pt --eps 1 2 4 8 --seeds 0 1 2
    python bench/breastmnist.py --table-only      # re-render BENCHMARKS.md from the results file

The setting our medical users face: a few hundred private scans, no public data like them. Every
arm uses the prior's architecture (WRN-16-1), batch B, K and T, and the official MedMNIST splits:
hyperparameters are chosen on the official validation split (78 images, by ROC-AUC, then
accuracy), the test split (156) only scores the chosen ones. For each epsilon:

1. ``lp``      DP linear probing of the frozen prior (Phase II only, cached features), over the
               head's pooling grid (1 = global average, 4 = 4 x 4) and lr_II;
2. ``randp``   DP-RandP, Phase II then Phase III, on the grid ``lp`` chose, over lr_III;
3. ``scratch`` DP-SGD from a random initialisation, the same model and grid, over lr;
4. ``nonprivate`` the prior fine-tuned without clipping or noise (one run per seed).

The chosen configuration of each arm then runs with every seed; the table gives the mean +- std
of the final EMA model's test metrics over seeds (accuracy, balanced accuracy, ROC-AUC). The
selection among the grid reads the validation split of the private data: like any
hyperparameter search on private data, it is not covered by the (epsilon, delta) of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._report import kept_note, write_section  # noqa: E402
from dprandp.pipeline.metrics import METRICS  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "breastmnist.jsonl"
DATA = ROOT.parent / "shared" / "data" / "breastmnist.npz"
#: MedMNIST v2 (Yang et al., Scientific Data 2023), BreastMNIST, non-private ResNet-18 at 28 px.
PUBLISHED = {"accuracy": 0.863, "auc": 0.901}
ARMS = ("lp", "randp", "scratch", "nonprivate")


def dp_config(arm: str, eps: float, seed: int, hp: dict, a):
    from dprandp.pipeline import preset

    common = dict(dataset="medmnist", data=str(a.data), target_epsilon=eps, batch_size=a.batch_size,
                  seed=seed, steps=a.steps, head_pool=hp["head_pool"], physical_batch_size=a.batch_size,
                  eval_every=0, checkpoint_every=a.steps, phase2_features="cached", eval_batch_size=256)
    if arm == "lp":
        return preset("cpu", prior=a.prior, phase2_steps=a.steps, lr_phase2=hp["lr_phase2"], augmult=1, **common)
    if arm == "randp":
        return preset("cpu", prior=a.prior, phase2_steps=round(a.phase2_share * a.steps), lr_phase2=hp["lr_phase2"],
                      lr_phase3=hp["lr_phase3"], augmult=a.augmult, **common)
    return preset("cpu", prior=None, lr_phase3=hp["lr_phase3"], augmult=a.augmult, **common)


def command_for(cfg, a) -> str:
    """The ``dprandp train`` command of one configuration."""
    prior = f"--prior {Path(cfg.prior).name}" if cfg.prior else "--prior none"
    out = (f"dprandp train --dataset medmnist --data ../shared/data/breastmnist.npz --preset cpu {prior} "
           f"--epsilon {cfg.target_epsilon:g} --batch-size {cfg.batch_size} --augmult {cfg.augmult} "
           f"--steps {cfg.steps} --head-pool {cfg.head_pool} --seed {cfg.seed}")
    if cfg.prior:
        out += f" --phase2-steps {cfg.phase2_steps} --lr-phase2 {cfg.lr_phase2:g}"
    if cfg.phase3_steps:
        out += f" --lr-phase3 {cfg.lr_phase3:g}"
    return out


def scores(summary: dict, split: str) -> dict:
    return {m: summary.get(f"{split}_{m}") for m in METRICS}


def run_dp(arm: str, eps: float, seed: int, hp: dict, a, data, stage: str) -> dict:
    from dprandp.pipeline import train

    cfg = dp_config(arm, eps, seed, hp, a)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        s = train(cfg, out=Path(tmp) / "run", progress=False, data=data).summary
        wall = time.time() - t0
    return dict(arm=arm, stage=stage, epsilon_target=eps, seed=seed, hp=hp, val=scores(s, "val"),
                test=scores(s, "test"), epsilon=s["epsilon"], noise_multiplier=s["noise_multiplier"],
                steps=s["steps"], wall_s=wall, prior_sha256=s.get("prior_sha256"), command=command_for(cfg, a))


def run_nonprivate(seed: int, hp: dict, a, data) -> dict:
    from bench.utility import finetune_nonprivate, prior_sha256
    from dprandp.pipeline.metrics import classification_metrics
    from dprandp.pipeline.trainer import image_logits

    model, iters, wall = finetune_nonprivate(model_name="wrn-16-1", head_pool=hp["head_pool"], prior=a.prior,
                                             data=data, samples=a.steps * a.batch_size, seed=seed)
    out = {}
    for split, x, y in (("val", data.x_val, data.y_val), ("test", data.x_test, data.y_test)):
        logits, _ = image_logits(model, x, 256, with_flip=False)
        out[split] = classification_metrics(logits, y, data.num_classes)
    return dict(arm="nonprivate", stage="final", epsilon_target=float("inf"), seed=seed, hp=hp, **out,
                epsilon=float("inf"), noise_multiplier=0.0, steps=iters, wall_s=wall, prior_sha256=prior_sha256(a.prior),
                command=f"python bench/breastmnist.py --prior PRIOR --arms nonprivate --seeds {seed}")


def best(runs: list[dict]) -> dict:
    """The hyperparameters of the run with the best validation ROC-AUC (then accuracy)."""
    key = lambda r: (r["val"]["auc"] if r["val"]["auc"] is not None else -1.0, r["val"]["accuracy"])  # noqa: E731
    return max(runs, key=key)["hp"]


def grids(a) -> dict[str, list[dict]]:
    return {
        "lp": [dict(head_pool=p, lr_phase2=lr) for p in a.head_pool for lr in a.lr_phase2],
        "randp": [dict(lr_phase3=lr) for lr in a.lr_phase3],
        "scratch": [dict(lr_phase3=lr) for lr in a.lr_scratch],
    }


def sweep_epsilon(eps: float, a, data, write) -> None:
    """Tune each DP arm on seed 0 (validation), then run its choice with every seed."""
    g = grids(a)
    # the linear probe's choice (pooling grid, lr_II) also serves DP-RandP's Phase II and the model of scratch
    lp_runs = [write(run_dp("lp", eps, a.seeds[0], hp, a, data, "tune")) for hp in g["lp"]]
    lp_hp = best(lp_runs)
    chosen = {"lp": lp_hp}
    for arm in ("randp", "scratch"):
        if arm not in a.arms:
            continue
        base = {"head_pool": lp_hp["head_pool"]} | ({"lr_phase2": lp_hp["lr_phase2"]} if arm == "randp" else {})
        runs = [write(run_dp(arm, eps, a.seeds[0], base | hp, a, data, "tune")) for hp in g[arm]]
        chosen[arm] = best(runs)
    for arm, hp in chosen.items():
        if arm not in a.arms:
            continue
        for seed in a.seeds:
            write(run_dp(arm, eps, seed, hp, a, data, "final"))


def load_results(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return ""
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def chosen_by_epsilon(chosen: list[tuple[float, str]]) -> str:
    """'ε = 1, 2: A; ε = 4: B' from (epsilon, choice) pairs; one choice for every ε is written alone."""
    groups: dict[str, list[float]] = {}
    for e, hp in chosen:
        groups.setdefault(hp, []).append(e)
    if len(groups) == 1 or all(e == float("inf") for e, _ in chosen):
        return next(iter(groups), "")
    return "; ".join(f"ε = {', '.join(f'{e:g}' for e in es)}: {hp}" for hp, es in groups.items())


TITLE = "## BreastMNIST: DP-RandP on 546 private medical images"
GENERATED_FROM = "Test split (156 images)"  # the first generated words after the hand-written analysis


def render(results: list[dict], note: str = "", data: Path = DATA) -> str:
    finals = [r for r in results if r["stage"] == "final"]
    eps_list = sorted({r["epsilon_target"] for r in finals if r["arm"] != "nonprivate"})
    names = {"randp": "DP-RandP (Phases II + III)", "lp": "DP-RandP without Phase III (linear probe)",
             "scratch": "DP-SGD from scratch", "nonprivate": "non-private (the prior fine-tuned, no noise)"}
    head = ("| arm | " + " | ".join(f"ε = {e:g}: AUC · acc · balanced acc" for e in eps_list)
            + " | chosen on validation (per ε) | wall per run |")
    lines = [head, "| --- " * (len(eps_list) + 3) + "|"]
    for arm in ("randp", "lp", "scratch", "nonprivate"):
        cells, chosen, walls = [], [], []
        for e in eps_list if arm != "nonprivate" else [float("inf")]:
            rs = [r for r in finals if r["arm"] == arm and r["epsilon_target"] == e]
            if not rs:
                cells.append("")
                continue
            n = len({r["seed"] for r in rs})
            cells.append(f"{_cell([r['test']['auc'] for r in rs], 1.0, 3)} · {_cell([r['test']['accuracy'] for r in rs])} % · "
                         f"{_cell([r['test']['balanced_accuracy'] for r in rs])} % (n = {n})")
            chosen.append((e, ", ".join(f"{k} {v:g}" for k, v in sorted(rs[0]["hp"].items()))))
            walls += [r["wall_s"] for r in rs]
        if arm == "nonprivate":
            cells = cells + [""] * (len(eps_list) - 1)
        if not walls:
            continue
        lo, hi = f"{min(walls) / 60:.1f}", f"{max(walls) / 60:.1f}"
        lines.append(f"| {names[arm]} | " + " | ".join(cells) + f" | {chosen_by_epsilon(chosen)} | "
                     f"{lo if lo == hi else f'{lo}-{hi}'} min |")
    commands = sorted({(r["arm"], r["epsilon_target"], r["command"]) for r in finals if r["seed"] == 0},
                      key=lambda t: (ARMS.index(t[0]), t[1]))
    tuned = [r for r in results if r["stage"] == "tune"]
    tune_lines = ["| ε | arm | hyperparameters | val AUC | val acc |", "| --- " * 5 + "|"]
    for r in sorted(tuned, key=lambda r: (r["epsilon_target"], ARMS.index(r["arm"]))):
        hp = ", ".join(f"{k} {v:g}" for k, v in sorted(r["hp"].items()))
        auc = r["val"]["auc"]
        tune_lines.append(f"| {r['epsilon_target']:g} | {r['arm']} | {hp} | {'' if auc is None else f'{auc:.3f}'} | "
                          f"{100 * r['val']['accuracy']:.1f} % |")
    parts = [
        TITLE,
        note.strip(),
        GENERATED_FROM + " of the official MedMNIST v2 file, δ = 1e-5, the final EMA model; mean ± std "
        "over seeds. AUC is MedMNIST's (the softmax probability of class 1); balanced accuracy is the mean "
        f"recall of the two classes. Predicting the majority class scores {100 * majority_rate(data):.1f} % accuracy, "
        "50 % balanced accuracy and AUC 0.5. Published non-private reference (MedMNIST v2, ResNet-18 at "
        f"28 px, 100 epochs): AUC {PUBLISHED['auc']}, accuracy {100 * PUBLISHED['accuracy']:.1f} %.",
        "\n".join(lines),
        "Commands (seed 0; `--seed` gives the others):\n\n" + "\n".join(f"- {arm}, ε = {e:g}: `{c}`"
                                                                       for arm, e, c in commands),
        "<details><summary>Every tuning run (seed 0), chosen by validation AUC</summary>\n\n"
        + "\n".join(tune_lines) + "\n\n</details>",
    ]
    return "\n\n".join(p for p in parts if p)


def majority_rate(data: Path = DATA) -> float:
    """The common class's share of the test split in the BreastMNIST file at ``data`` (nan if absent)."""
    import numpy as np

    if not data.exists():
        return float("nan")
    with np.load(data) as f:
        y = f["test_labels"].reshape(-1)
    return float(np.bincount(y).max() / len(y))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", default="/work/cache/prior-cpu-e48b.pt")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--eps", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--augmult", type=int, default=1, help="K views per sample in Phase III and scratch")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--phase2-share", type=float, default=0.5)
    p.add_argument("--head-pool", type=int, nargs="+", default=[1, 4])
    p.add_argument("--lr-phase2", type=float, nargs="+", default=[0.5, 2.0])
    p.add_argument("--lr-phase3", type=float, nargs="+", default=[0.25, 1.0])
    p.add_argument("--lr-scratch", type=float, nargs="+", default=[0.5, 2.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--note", default=None,
                   help="the analysis above the tables (default: keep the one in BENCHMARKS.md)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    a = p.parse_args()

    if not a.table_only:
        import torch

        from dprandp.data import load_dataset

        if not a.data.exists():
            sys.exit(f"BreastMNIST not found at {a.data}")
        torch.set_num_threads(a.threads)
        data = load_dataset("medmnist", str(a.data))
        a.results.parent.mkdir(parents=True, exist_ok=True)

        def write(r: dict) -> dict:
            print(json.dumps(r), flush=True)
            with a.results.open("a") as fh:
                fh.write(json.dumps(r) + "\n")
            return r

        for eps in a.eps if set(a.arms) - {"nonprivate"} else []:
            sweep_epsilon(eps, a, data, write)
        if "nonprivate" in a.arms:
            hp = {"head_pool": max(a.head_pool)}
            for seed in a.seeds:
                write(run_nonprivate(seed, hp, a, data))
    if a.no_write:
        return
    shown = [arg for arg in sys.argv[1:] if arg not in (a.note, "--note")]
    note = a.note if a.note is not None else kept_note("breastmnist", TITLE, GENERATED_FROM)
    write_section("breastmnist", render(load_results(a.results), note, a.data), command="python bench/breastmnist.py " + " ".join(shown))


if __name__ == "__main__":
    main()
