"""CIFAR-10 accuracy of `dprandp train --preset cpu` at a given epsilon, with and without a prior.

    python bench/train_cifar10.py --prior prior.pt                 # both runs, then BENCHMARKS.md
    python bench/train_cifar10.py --prior prior.pt --steps 40      # a shorter smoke run
    python bench/train_cifar10.py --prior none                     # only the from-scratch baseline

Each run is the real CLI (`python -m dprandp train ...`) in a subprocess, so the numbers are what
a user gets; extra arguments after `--` go to every run (e.g. `-- --lr-phase3 1.0`). Test accuracy
is that of the final EMA model (n = 10,000), epsilon is recomputed from each run's ledger.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10.npz"


def run(prior: str, args, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "dprandp", "train", "--dataset", "cifar10", "--data", str(args.data),
           "--preset", "cpu", "--epsilon", str(args.epsilon), "--prior", prior, "--threads", str(args.threads),
           "--no-progress", "--out", str(out), "--json"]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    cmd += extra
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{r.stderr}")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    summary["bench_wall_s"] = time.time() - t0
    summary["command"] = "dprandp " + " ".join(cmd[3:])
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prior", required=True, help="prior file, or `none` for the baseline only")
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=None, help="keep run directories here")
    ap.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-cifar10-"))
    priors = ["none"] + ([args.prior] if args.prior != "none" else [])
    rows = []
    for prior in priors:
        s = run(prior, args, extra, out / ("scratch" if prior == "none" else "prior"))
        rows.append(s)
        print(json.dumps({k: s[k] for k in ("prior", "test_accuracy", "epsilon", "steps", "wall_time_s")}))
    from dprandp.pipeline import preset

    cpu = preset("cpu")
    md = [f"`dprandp train --dataset cifar10 --preset cpu` ({cpu.model}, head pool {cpu.head_pool}, B = {cpu.batch_size}, "
          f"K = {cpu.augmult}; flags given: {' '.join(extra) or 'none'}), final EMA model, "
          "test n = 10,000, one seed each (noise from OS entropy).", "",
          "| prior | test accuracy | ε (δ = 1e-5) | σ | steps (II + III) | wall time |",
          "| --- | --- | --- | --- | --- | --- |"]
    for s in rows:
        md.append(f"| {s['prior'] or 'none (DP-SGD from scratch)'} | {100 * s['test_accuracy']:.2f} % | "
                  f"{s['epsilon']:.3f} | {s['noise_multiplier']:.3f} | {s['steps']} ({s['phase2_steps_done']} + "
                  f"{s['phase3_steps_done']}) | {s['wall_time_s'] / 60:.0f} min |")
    md += ["", "Commands:", ""] + [f"    {s['command']}" for s in rows]
    if not args.no_write:
        write_section("train_cifar10", "## CIFAR-10, `--preset cpu`\n\n" + "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
