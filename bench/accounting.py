"""Calibration speed: dprandp's PLD noise search against prv-accountant's, in one run.

    python bench/accounting.py [--repeats 3]

For each target epsilon (875 steps, q = 4096/50000, delta = 1e-5) it times
``dprandp.accounting.calibrate_noise`` and ``prv_accountant.dpsgd.find_noise_multiplier``
(eps_error = 0.01) side by side, and reports both noise multipliers and the ratio of times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import write_section  # noqa: E402
from dprandp.accounting import DPPhase, calibrate_noise, compute_epsilon  # noqa: E402

Q, STEPS, DELTA = 4096 / 50000, 875, 1e-5


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

    phase = DPPhase(sample_rate=Q, noise_multiplier=1.0, steps=STEPS)
    rows = []
    for eps in args.targets:
        ours, t_ours = timed(lambda: calibrate_noise(target_epsilon=eps, target_delta=DELTA, phases=[phase]), args.repeats)
        theirs, t_theirs = timed(lambda: find_noise_multiplier(Q, STEPS, eps, DELTA, eps_error=0.01), 1)
        # Independent check of their answer with our accountant (PLD, certified upper bound).
        eps_of_theirs = compute_epsilon([phase.with_noise(theirs)], target_delta=DELTA)
        rows.append((eps, ours.noise_multiplier, ours.epsilon, t_ours, theirs, eps_of_theirs, t_theirs))
        print(rows[-1], flush=True)

    lines = [
        "## Accounting: noise calibration (issue 2)",
        "",
        f"q = 4096/50000, {STEPS} steps, delta = {DELTA:g}. dprandp: `calibrate_noise` (PLD, rtol 1e-3, "
        f"median of {args.repeats}); prv-accountant 0.2: `find_noise_multiplier(eps_error=0.01)` (one run).",
        "",
        "| target ε | dprandp σ | its ε (PLD) | dprandp time | prv σ | PLD ε of prv σ | prv time | speed-up | σ ratio prv/dprandp |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for eps, s1, e1, t1, s2, e2, t2 in rows:
        lines.append(f"| {eps:g} | {s1:.4f} | {e1:.4f} | {t1:.2f} s | {s2:.4f} | {e2:.4f} | {t2:.2f} s | {t2 / t1:.0f}× | {s2 / s1:.4f} |")
    write_section("accounting", "\n".join(lines))


if __name__ == "__main__":
    main()
