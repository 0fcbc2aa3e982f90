"""Calibration speed: dprandp's PLD noise search against prv-accountant's, in one run.

    python bench/accounting.py [--repeats 3]

For each workload and target epsilon (delta = 1e-5) it times ``dprandp.accounting.calibrate_noise``
and ``prv_accountant.dpsgd.find_noise_multiplier`` (eps_error = 0.01) side by side, and reports
both noise multipliers and the ratio of times. Workloads: the paper's Phases II + III (q =
4096/50000, 96 + 779 steps), the ``cpu`` preset's (q = 1000/50000, 60 + 240 steps) and a long
run (q = 1e-3, 1e5 steps, at epsilon 1 only). prv-accountant takes one phase: it gets the
summed steps of the same mechanism.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import write_section
from dprandp.accounting import DPPhase, calibrate_noise, compute_epsilon

DELTA = 1e-5
#: name -> (sample rate, steps per phase, targets: None = --targets)
WORKLOADS = {
    "paper": (4096 / 50000, (96, 779), None),
    "cpu": (1000 / 50000, (60, 240), None),
    "long": (1e-3, (10**5,), (1.0,)),
}


def timed(fn, repeats):
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return value, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    args = parser.parse_args()
    try:
        from prv_accountant.dpsgd import find_noise_multiplier
    except ImportError:  # pragma: no cover
        sys.exit("pip install prv-accountant to run this benchmark")

    rows = []
    for name, (q, steps, targets) in WORKLOADS.items():
        phases = [DPPhase(sample_rate=q, noise_multiplier=1.0, steps=t) for t in steps]
        for eps in targets or args.targets:
            ours, t_ours = timed(functools.partial(calibrate_noise, target_epsilon=eps, target_delta=DELTA,
                                                   phases=phases), args.repeats)
            theirs, t_theirs = timed(functools.partial(find_noise_multiplier, q, sum(steps), eps, DELTA,
                                                       eps_error=0.01), 1)
            # Independent check of their answer with our accountant (PLD, certified upper bound).
            eps_of_theirs = compute_epsilon([p.with_noise(theirs) for p in phases], target_delta=DELTA)
            rows.append((name, q, steps, eps, ours.noise_multiplier, ours.epsilon, t_ours, theirs, eps_of_theirs,
                         t_theirs))
            print(rows[-1], flush=True)

    lines = [
        "## Accounting: noise calibration (issue 2)",
        "",
        (f"delta = {DELTA:g}. dprandp: `calibrate_noise` (PLD, rtol 1e-3, median of {args.repeats}); "
         "prv-accountant 0.2: `find_noise_multiplier(eps_error=0.01)` (one run) on the summed steps."),
        "",
        ("| workload | q | steps | target ε | dprandp σ | its ε (PLD) | dprandp time | prv σ | PLD ε of prv σ "
         "| prv time | speed-up | σ ratio prv/dprandp |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, q, steps, eps, s1, e1, t1, s2, e2, t2 in rows:
        lines.append(f"| {name} | {q:g} | {' + '.join(map(str, steps))} | {eps:g} | {s1:.4f} | {e1:.4f} | {t1:.2f} s "
                     f"| {s2:.4f} | {e2:.4f} | {t2:.2f} s | {t2 / t1:.0f}× | {s2 / s1:.4f} |")
    write_section("accounting", "\n".join(lines))


if __name__ == "__main__":
    main()
