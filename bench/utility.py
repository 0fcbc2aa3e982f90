"""The privacy-utility trade-off on CIFAR-10: DP-RandP against DP-SGD from scratch (issue 7).

    python bench/utility.py --prior PRIOR.pt --eps 1 --arms scratch lp randp --seeds 0 1
    python bench/utility.py --table-only        # re-render the table from the results (the analysis above it is kept)

Arms, all with the same model, expected batch B and number of DP steps T; each takes its own
validated recipe (``arm_defaults``: the ``cpu`` preset at each epsilon for DP-RandP; lr 0.5 with
momentum 0.9 and K = 1 for the probe; the validated lr and K = 1 for scratch) for every option
left unset, and a given option (one value or a grid) replaces it:

* ``scratch``  DP-SGD from a random initialisation (``--prior none``), T full-model steps;
* ``lp``       DP-RandP without Phase III: T linear-probing steps on the frozen prior;
* ``randp``    DP-RandP: a share of T in Phase II, the rest in Phase III (fine-tuning);
* ``nonprivate`` the ceiling: the prior fine-tuned without clipping or noise (SGD, momentum 0.9),
  for the same number of sample-views as the DP arms.

Every DP arm runs through the public API (``dprandp.pipeline.train``) exactly as
``dprandp train`` would, reports the FINAL EMA model's test accuracy (never the best step),
and appends one JSON line per run to ``bench/results/utility.jsonl`` so that a long sweep can be
interrupted and the table re-rendered from what has finished.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._report import kept_note, write_section

RESULTS = ROOT / "bench" / "results" / "utility.jsonl"
DATA = ROOT.parent / "shared" / "data" / "cifar10.npz"
PAPER = {  # SPEC.md anchors, CIFAR-10, WRN-16-4
    "randp": {1: 72.3},
    "scratch": {1: 56.8, 2: 65.9, 4: 73.5, 8: 81.4},  # De et al. 2022
    "lp": {1: 61.3},  # DP-RandP ablation: all of the budget in Phase II
}


def command_for(arm: str, eps: float, seed: int, a) -> str:
    base = (f"dprandp train --dataset cifar10 --data ../shared/data/cifar10.npz --preset cpu --epsilon {eps:g} "
            f"--batch-size {a.batch_size} --augmult {a.augmult} --seed {seed}")
    if a.model != "wrn-16-1":
        base += f" --model {a.model}"
    base += f" --head-pool {a.head_pool}"  # always: the preset's default (4 since session 13) is not the flag's old one
    if a.momentum:
        base += f" --momentum {a.momentum:g}"
    if a.val_fraction:
        base += f" --val-fraction {a.val_fraction:g}"
    if arm != "scratch":
        base += f" --phase2-features {a.phase2_features}"  # always, for the same reason
    if getattr(a, "precision", "fp32") != "fp32":
        base += f" --precision {a.precision}"
    if arm == "scratch":
        return f"{base} --prior none --steps {a.steps} --lr-phase3 {a.lr_scratch:g}"
    if arm == "lp":
        return f"{base} --prior {Path(a.prior).name} --steps {a.steps} --phase2-steps {a.steps} --lr-phase2 {a.lr_phase2:g}"
    freeze = f" --freeze-stages {a.freeze_stages}" if a.freeze_stages else ""
    return (f"{base} --prior {Path(a.prior).name} --steps {a.steps} --phase2-steps {round(a.phase2_share * a.steps)} "
            f"--lr-phase2 {a.lr_phase2:g} --lr-phase3 {a.lr_phase3:g}{freeze}")


def prior_recipe(prior: str | None) -> dict | None:
    """The Phase I recipe stored in the prior file (bench/readme_results.py groups runs by it)."""
    if prior is None:
        return None
    from dprandp.pretrain import load_prior

    return load_prior(prior)[1].get("pretrain_config")


def run_dp_arm(arm: str, eps: float, seed: int, a, data) -> dict:
    from dprandp.pipeline import preset, train

    common = dict(dataset="cifar10", data=str(DATA), target_epsilon=eps, batch_size=a.batch_size,
                  augmult=a.augmult, seed=seed, physical_batch_size=a.physical_batch_size,
                  eval_every=0, checkpoint_every=max(a.steps, 1), model=a.model, momentum=a.momentum,
                  val_fraction=a.val_fraction, phase2_features=a.phase2_features, head_pool=a.head_pool,
                  precision=a.precision)
    if arm == "scratch":
        cfg = preset("cpu", prior=None, steps=a.steps, lr_phase3=a.lr_scratch, **common)
    elif arm == "lp":
        cfg = preset("cpu", prior=a.prior, steps=a.steps, phase2_steps=a.steps, lr_phase2=a.lr_phase2, **common)
    else:
        cfg = preset("cpu", prior=a.prior, steps=a.steps, phase2_steps=round(a.phase2_share * a.steps),
                     lr_phase2=a.lr_phase2, lr_phase3=a.lr_phase3, freeze_stages=a.freeze_stages, **common)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        result = train(cfg, out=Path(tmp) / "run", progress=False, data=data)
        wall = time.time() - t0
        s = result.summary
    return dict(arm=arm, epsilon_target=eps, seed=seed, test_accuracy=s["test_accuracy"],
                val_accuracy=s.get("val_accuracy"), test_accuracy_flip=s.get("test_accuracy_flip"),
                val_accuracy_flip=s.get("val_accuracy_flip"), prior_sha256=s.get("prior_sha256"),
                prior_file=Path(a.prior).name if arm != "scratch" else None,
                prior_recipe=prior_recipe(a.prior) if arm != "scratch" else None, epsilon=s["epsilon"],
                noise_multiplier=s["noise_multiplier"], steps=s["steps"], wall_s=wall,
                command=command_for(arm, eps, seed, a), config=cfg.to_dict())


def finetune_nonprivate(*, model_name: str, head_pool: int, prior: str, data, samples: int, seed: int):
    """The model from ``prior`` fine-tuned on ``data``'s training set without clipping or noise
    (SGD, momentum 0.9, one-cycle lr 0.05, batch 128) for about ``samples`` sample-views.
    Returns the model (in eval mode), the number of SGD steps and the wall time."""
    import torch
    import torch.nn.functional as F

    from dprandp.augment import random_crop_flip
    from dprandp.data import to_float
    from dprandp.models import create_model
    from dprandp.pretrain import apply_prior

    model = create_model(model_name, num_classes=data.num_classes, seed=seed, head_pool=head_pool)
    apply_prior(model, prior)
    gen = torch.Generator().manual_seed(seed)
    x = to_float(data.x_train)  # the same normalisation as the DP pipeline
    y = torch.from_numpy(data.y_train).long().reshape(-1)
    batch = min(128, len(y))
    iters = max(1, samples // batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=iters)
    t0 = time.time()
    model.train()
    for _ in range(iters):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        views = random_crop_flip(x[idx], augmult=1, generator=gen)[:, 0]
        loss = F.cross_entropy(model(views), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    wall = time.time() - t0
    model.eval()
    return model, iters, wall


def run_nonprivate(seed: int, a, data) -> dict:
    """Ceiling: the same model from the same prior, fine-tuned without clipping or noise, for as
    many sample-views as the K = 1 DP arms (steps x batch)."""
    from dprandp.pipeline.finish import prior_sha256
    from dprandp.pipeline.trainer import accuracies

    model, iters, wall = finetune_nonprivate(model_name=a.model, head_pool=a.head_pool, prior=a.prior, data=data,
                                             samples=a.steps * a.batch_size, seed=seed)
    acc, acc_flip = accuracies(model, data.x_test, data.y_test)

    return dict(arm="nonprivate", epsilon_target=float("inf"), seed=seed, test_accuracy=acc, test_accuracy_flip=acc_flip,
                epsilon=float("inf"),
                prior_file=Path(a.prior).name, prior_sha256=prior_sha256(a.prior), prior_recipe=prior_recipe(a.prior),
                noise_multiplier=0.0, steps=iters, wall_s=wall,
                command=f"python bench/utility.py --prior PRIOR --arms nonprivate --seeds {seed} --head-pool {a.head_pool} --steps {a.steps} --batch-size {a.batch_size}",
                config={"model": a.model, "head_pool": a.head_pool})


def memoize_pooled_features() -> None:
    """Runs of one invocation share the frozen prior's cached features (``--phase2-features
    cached``): they depend only on the prior's trunk, the images and the head's pooling grid, so
    recomputing them is pure waste."""
    import hashlib

    from dprandp.pipeline import trainer

    compute, memo = trainer.pooled_features, {}

    def cached(model, images, *, batch_size=1024):
        trunk = {k: v for k, v in model.state_dict().items() if k.startswith("trunk.")}
        h = hashlib.sha1()
        for k in sorted(trunk):
            h.update(trunk[k].detach().cpu().numpy().tobytes())
        h.update(images.cpu().numpy().tobytes())
        h.update(f"pool {model.head.pool}".encode())  # the features are pooled to the head's grid
        key = h.hexdigest()
        if key not in memo:
            memo.clear()
            memo[key] = compute(model, images, batch_size=batch_size)
        return memo[key]

    trainer.pooled_features = cached


def load_results() -> list[dict]:
    if not RESULTS.exists():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def prior_label(r: dict) -> str:
    name = r.get("prior_file") or Path((r.get("config") or {}).get("prior") or "none").name
    sha = r.get("prior_sha256")
    return "none" if name == "none" else f"{name} ({sha[:8] if sha else '?'})"


TITLES = {"utility": "## Privacy-utility trade-off on CIFAR-10 (issue 7)",
          "utility_gpu_prior": "## Privacy-utility on CIFAR-10 with the GPU-made priors (issue 7)",
          "utility_tuning": "## Tuning on a validation split (issue 7)"}


TABLE_HEADER = "| arm | prior (SHA-256) | target ε |"


def render(results: list[dict], note: str, section: str = "utility") -> str:
    def fmt(values):
        values = [100 * v for v in values]
        if len(values) == 1:
            return f"{values[0]:.1f} (n = 1)"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} (n = {len(values)})"

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        cfg = r.get("config") or {}
        key = (r["arm"], r["epsilon_target"], r["steps"], cfg.get("batch_size"), cfg.get("augmult"),
               r.get("prior_sha256") or Path(cfg.get("prior") or "none").name, cfg.get("phase2_features", "augmented"),
               cfg.get("lr_phase2"), cfg.get("phase2_steps"),
               cfg.get("lr_phase3"), cfg.get("momentum"), cfg.get("val_fraction", 0.0), cfg.get("model"),
               cfg.get("head_pool", 1), cfg.get("freeze_stages", 0), cfg.get("precision", "fp32"))
        groups.setdefault(key, []).append(r)
    names = {"scratch": "(a) DP-SGD from scratch", "lp": "(b) DP-RandP without Phase III",
             "randp": "(c) DP-RandP (I + II + III)", "nonprivate": "non-private ceiling"}
    lines = [
        TITLES.get(section, f"## {section}"),
        "",
        note,
        "",
        TABLE_HEADER + " test accuracy % (final EMA model) | validation accuracy % | "
        "with flip TTA: test / validation % | ε spent | σ | steps | wall time per run | paper (WRN-16-4) | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    def column(rs, key):
        vals = [r[key] for r in rs if r.get(key) is not None]
        return fmt(vals) if vals else "–"

    order = ["scratch", "lp", "randp", "nonprivate"]
    for (arm, eps, *_), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]), str(kv[0][5]), kv[0][2])):
        paper = PAPER.get(arm, {}).get(eps)
        eps_s = "∞" if eps == float("inf") else f"{eps:g}"
        spent = "∞" if rs[0]["epsilon"] == float("inf") else f"{max(r['epsilon'] for r in rs):.3f}"
        lines.append(
            f"| {names[arm]} | {prior_label(rs[0])} | {eps_s} | {fmt([r['test_accuracy'] for r in rs])} | "
            f"{column(rs, 'val_accuracy')} | {column(rs, 'test_accuracy_flip')} / {column(rs, 'val_accuracy_flip')} | {spent} | "
            f"{rs[0]['noise_multiplier']:.3f} | {rs[0]['steps']} | "
            f"{statistics.mean(r['wall_s'] for r in rs) / 60:.1f} min | {paper if paper else '–'} | "
            f"`{rs[0]['command']}` |")
    return "\n".join(lines)


#: Options that, left unset, take each arm's validated recipe (:func:`arm_defaults`).
RECIPE_OPTIONS = ("head_pool", "batch_size", "augmult", "steps", "phase2_share", "lr_phase2", "lr_phase3",
                  "momentum", "phase2_features", "lr_scratch")
SCALAR_OPTIONS = ("augmult", "phase2_features")  # one value per invocation; the others are grids


def arm_defaults(arm: str, eps: float) -> dict:
    """Each arm's validated recipe (BENCHMARKS.md, utility_tuning), which an option left unset takes:
    DP-RandP is the `cpu` preset at this epsilon (lr_III by epsilon included); the linear probe trains
    every step in Phase II with momentum on one view per sample; scratch runs its validated lr on one
    view per sample (the README's rows); the ceiling sees as many samples as T steps of B."""
    from bench.readme_results import LINEAR_PROBE, SCRATCH_LR
    from dprandp.pipeline import preset

    cfg = preset("cpu", prior="prior.pt", target_epsilon=eps)
    out = dict(head_pool=cfg.head_pool, batch_size=cfg.batch_size, augmult=cfg.augmult, steps=cfg.steps,
               phase2_share=cfg.phase2_steps / cfg.steps, lr_phase2=cfg.lr_phase2, lr_phase3=cfg.lr_phase3,
               momentum=cfg.momentum, phase2_features=cfg.phase2_features,
               lr_scratch=SCRATCH_LR.get(eps, SCRATCH_LR[max(SCRATCH_LR)]))
    if arm == "lp":
        out.update(LINEAR_PROBE, augmult=1)
    elif arm in ("scratch", "nonprivate"):
        out["augmult"] = 1
    return out


def arm_grid(arm: str, a, eps: float = 1.0) -> list[argparse.Namespace]:
    """One namespace per grid point, over only the options this arm reads (no duplicate runs); an
    option left unset (None) takes the arm's validated recipe at ``eps``."""
    recipe = arm_defaults(arm, eps)
    fill = {k: recipe[k] if k in SCALAR_OPTIONS else [recipe[k]] for k in RECIPE_OPTIONS if getattr(a, k, None) is None}
    a = argparse.Namespace(**{**vars(a), **fill})
    axes = {"batch_size": a.batch_size, "steps": a.steps, "momentum": a.momentum, "head_pool": a.head_pool}
    if arm == "scratch":
        axes["lr_scratch"] = a.lr_scratch
    elif arm == "lp":
        axes["lr_phase2"] = a.lr_phase2
    elif arm == "randp":
        axes.update(lr_phase2=a.lr_phase2, lr_phase3=a.lr_phase3, phase2_share=a.phase2_share,
                    freeze_stages=a.freeze_stages)
    else:  # nonprivate: its own fixed recipe, only the sample budget (steps x batch) varies
        axes.pop("momentum")
    names = list(axes)
    return [argparse.Namespace(**{**vars(a), **dict(zip(names, point))})
            for point in itertools.product(*axes.values())]


def main() -> None:
    global RESULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", default=str(Path("/work/cache/prior-cpu.pt")))
    p.add_argument("--eps", type=float, nargs="+", default=[1.0])
    p.add_argument("--arms", nargs="+", default=["scratch", "lp", "randp"],
                   choices=["scratch", "lp", "randp", "nonprivate"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--model", default="wrn-16-1")
    # Unset recipe options (default None) take each arm's validated recipe at each epsilon (arm_defaults).
    p.add_argument("--head-pool", type=int, nargs="+", default=None, help="grid of the head's average pool (1 = global)")
    p.add_argument("--batch-size", type=int, nargs="+", default=None)
    p.add_argument("--augmult", type=int, default=None)
    p.add_argument("--steps", type=int, nargs="+", default=None)
    p.add_argument("--phase2-share", type=float, nargs="+", default=None)
    p.add_argument("--lr-phase2", type=float, nargs="+", default=None)
    p.add_argument("--lr-phase3", type=float, nargs="+", default=None)
    p.add_argument("--freeze-stages", type=int, nargs="+", default=[0],
                   help="randp: trunk stages kept frozen in Phase III (0 = fine-tune all)")
    p.add_argument("--lr-scratch", type=float, nargs="+", default=None)
    p.add_argument("--physical-batch-size", type=int, default=250)
    p.add_argument("--phase2-features", choices=["augmented", "cached"], default=None)
    p.add_argument("--momentum", type=float, nargs="+", default=None)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="forward/backward arithmetic of the DP steps (clipping stays float32)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="carve a validation split from train (for tuning: compare val_accuracy, not test)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--note", default=None, help="the analysis above the table (default: keep the one in BENCHMARKS.md)")
    p.add_argument("--section", default="utility", help="BENCHMARKS.md section to write (e.g. utility_tuning)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the runs append to")
    p.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md (smoke tests)")
    a = p.parse_args()
    RESULTS = a.results

    if not a.table_only:
        import torch

        from dprandp.data import load_dataset

        torch.set_num_threads(a.threads)
        if not DATA.exists():
            sys.exit(f"CIFAR-10 not found at {DATA}")
        data = load_dataset("cifar10", str(DATA), val_fraction=a.val_fraction, val_seed=0)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        memoize_pooled_features()
        for eps in a.eps:
            for arm in a.arms:
                for one in arm_grid(arm, a, eps):
                    for seed in a.seeds:
                        if arm == "nonprivate":
                            r = run_nonprivate(seed, one, data)
                        else:
                            r = run_dp_arm(arm, eps, seed, one, data)
                        print(json.dumps({k: v for k, v in r.items() if k != "config"}), flush=True)
                        with RESULTS.open("a") as fh:
                            fh.write(json.dumps(r) + "\n")
    if a.no_write:
        return
    shown = [arg for arg in sys.argv[1:] if arg not in (a.note, "--note")]
    title = TITLES.get(a.section, f"## {a.section}")
    note = a.note if a.note is not None else kept_note(a.section, title, TABLE_HEADER)
    write_section(a.section, render(load_results(), note, a.section), command="python bench/utility.py " + " ".join(shown))
    if RESULTS.resolve() == (ROOT / "bench" / "results" / "utility.jsonl").resolve():
        from bench.readme_results import README, render_into

        render_into(README)  # the README's table follows the new runs


if __name__ == "__main__":
    main()
