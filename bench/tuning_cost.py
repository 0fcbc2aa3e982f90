"""What an accounted hyperparameter search costs in noise (`dprandp tune`), against the alternatives.

    python bench/tuning_cost.py            # writes the `tuning_cost` section of BENCHMARKS.md
    python bench/tuning_cost.py --no-write

The `cpu` preset's mechanism on CIFAR-10 with a 10 % validation split (N = 45,000, B = 1000,
T = 300, delta = 1e-5) at epsilon = 1 for the released model. Rows: one run (PLD and RDP), a
search with a random number of runs (mean m; Papernot & Steinke 2022, through dp-accounting's RDP
accountant; score noise std 20 on the correct count), and m runs of a fixed grid composed with PLD
(which covers releasing every run; its score noise is left out, in its favour). Each row gives the
noise multiplier every run must use and its ratio to one run's.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import write_section  # noqa: E402
from dprandp.accounting import DPPhase, calibrate_noise  # noqa: E402
from dp_accounting import GaussianDpEvent  # noqa: E402

from dprandp.tuning import Repetitions, calibrate_tuning_noise, selection_epsilon  # noqa: E402

N, B, STEPS, PHASE2, EPS, DELTA, SCORE_NOISE = 45_000, 1000, 300, 60, 1.0, 1e-5, 20.0
SHAPES = {"logarithmic (shape 0)": 0.0, "truncated neg. binomial (shape 0.5)": 0.5, "geometric (shape 1)": 1.0,
          "Poisson (shape inf)": math.inf}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--means", type=float, nargs="+", default=[2.0, 3.0, 5.0, 10.0])
    args = ap.parse_args()
    q = B / N
    phases = [DPPhase(sample_rate=q, noise_multiplier=0.0, steps=PHASE2),
              DPPhase(sample_rate=q, noise_multiplier=0.0, steps=STEPS - PHASE2)]
    t0 = time.time()
    one = calibrate_noise(target_epsilon=EPS, target_delta=DELTA, phases=phases).noise_multiplier
    one_rdp = calibrate_noise(target_epsilon=EPS, target_delta=DELTA, phases=phases, accountant="rdp").noise_multiplier
    rows = [("one run (PLD, what `dprandp train` uses)", "1", one), ("one run (RDP)", "1", one_rdp)]
    for m in args.means:
        for name, shape in SHAPES.items():
            if shape == math.inf and m < 2:
                continue
            sigma, _ = calibrate_tuning_noise(target_epsilon=EPS, target_delta=DELTA, phases=phases,
                                              score_noise=SCORE_NOISE, repetitions=Repetitions(mean=m, shape=shape))
            rows.append((f"random search, {name}", f"{m:g} on average", sigma))
        fixed = calibrate_noise(target_epsilon=EPS, target_delta=DELTA, phases=phases * int(m)).noise_multiplier
        rows.append(("fixed grid, every run composed (PLD)", f"{m:g}", fixed))
    lines = [f"Noise multiplier σ every run needs so that the released model meets ε = {EPS:g} (δ = {DELTA:g}), "
             f"for the `cpu` preset's mechanism on CIFAR-10 with a 10 % validation split (N = {N}, B = {B}, "
             f"T = {STEPS}). Ratio: σ over one run's PLD σ; the noise per step grows by that factor.", "",
             "| procedure | runs | σ | σ ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {runs} | {sigma:.3f} | {sigma / one:.2f}x |" for name, runs, sigma in rows]
    lines += ["", "The score's noise (std on the count of correct validation predictions; 3 runs on average, "
              "logarithmic): the second column is the ε that selecting among the scores alone spends; the third is "
              "every run's σ.",
              "", "| score noise std | ε of the scores alone | σ | σ ratio |", "| --- | --- | --- | --- |"]
    for noise in (10.0, 20.0, 50.0, 100.0):
        rep = Repetitions(mean=3.0, shape=0.0)
        alone = selection_epsilon(GaussianDpEvent(noise), rep, target_delta=DELTA)
        sigma, _ = calibrate_tuning_noise(target_epsilon=EPS, target_delta=DELTA, phases=phases, score_noise=noise,
                                          repetitions=rep)
        lines.append(f"| {noise:g} | {alone:.3f} | {sigma:.3f} | {sigma / one:.2f}x |")
    lines += ["", f"Computed in {time.time() - t0:.0f} s. A random search is accounted with RDP (PLD has no "
              "repeat-and-select bound), which alone costs the 'one run (RDP)' row's ratio. The score is the "
              f"validation count of correct predictions plus N(0, {SCORE_NOISE:g}²)."]
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        write_section("tuning_cost", md)


if __name__ == "__main__":
    main()
