"""Privacy audit figures: claimed epsilon vs the one-run empirical lower bound (BENCHMARKS.md "audit").

For each claimed epsilon the noise is calibrated once (PLD), then the white-box gradient-canary
audit runs on the real DP-SGD engine for several seeds (canaries, sampling and noise all change
with the seed), and once more with ``insecure_no_noise`` (sigma = 0 while claiming epsilon).

    python bench/audit.py            # ~5 min on 2 busy cores
    python bench/audit.py --quick    # 2 seeds, no large-m row
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import write_section  # noqa: E402
from dprandp.accounting import DPPhase, calibrate_noise  # noqa: E402
from dprandp.audit.canaries import AuditConfig, run_audit  # noqa: E402

DELTA = 1e-5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--canaries", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sample-rate", type=float, default=0.5)
    parser.add_argument("--large-canaries", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = range(2 if args.quick else 5)
    m, steps, q = args.canaries, args.steps, args.sample_rate

    rows, broken_rows, large_rows = [], [], []
    for eps in (1.0, 2.0, 4.0, 8.0):
        t0 = time.perf_counter()
        cal = calibrate_noise(target_epsilon=eps, target_delta=DELTA,
                              phases=[DPPhase(sample_rate=q, noise_multiplier=1.0, steps=steps)])
        cal_s = time.perf_counter() - t0
        reports = [run_audit(AuditConfig(noise_multiplier=cal.noise_multiplier, target_delta=DELTA,
                                         num_canaries=m, steps=steps, sample_rate=q, seed=s)) for s in seeds]
        lbs = np.array([r.epsilon_lower_bound for r in reports])
        rows.append(
            f"| {eps:g} | {reports[0].epsilon:.3f} | {cal.noise_multiplier:.3f} | {lbs.mean():.3f} | "
            f"{lbs.min():.3f} – {lbs.max():.3f} | {sum(r.passed for r in reports)}/{len(reports)} | "
            f"{np.mean([r.seconds for r in reports]):.1f} (+{cal_s:.1f} calibration) |"
        )
        print(rows[-1], flush=True)
        broken = run_audit(AuditConfig(noise_multiplier=cal.noise_multiplier, target_delta=DELTA, num_canaries=m,
                                       steps=steps, sample_rate=q, seed=0, insecure_no_noise=True))
        verdict = "caught (FAIL)" if not broken.passed else "not caught: claim above the ceiling"
        broken_rows.append(
            f"| {eps:g} | {broken.epsilon:.3f} | {broken.epsilon_lower_bound:.3f} | "
            f"{broken.max_detectable_epsilon:.2f} | {verdict} | {broken.seconds:.1f} |"
        )
        print(broken_rows[-1], flush=True)
        if not args.quick and eps in (2.0, 8.0):
            big = run_audit(AuditConfig(noise_multiplier=cal.noise_multiplier, target_delta=DELTA,
                                        num_canaries=args.large_canaries, steps=steps, sample_rate=q, seed=0))
            large_rows.append(
                f"| {eps:g} | {big.epsilon:.3f} | {args.large_canaries} | {big.epsilon_lower_bound:.3f} | "
                f"{big.max_detectable_epsilon:.2f} | {big.seconds:.1f} |"
            )
            print(large_rows[-1], flush=True)

    md = [
        "## Privacy audit (one run, white-box gradient canaries)",
        "",
        "Steinke, Nasr & Jagielski (2023) one-run audit of the real DP-SGD engine (Poisson sampler, "
        "per-sample clipping, Gaussian noise, SGD update): Dirac gradient canaries of norm C (inputs of "
        "norm 10 C, so clipping must act), each included with probability 1/2; score = canary direction "
        "· sum of the noisy updates; lower bound at 95 % confidence (Bonferroni over 6 guess counts), "
        f"delta = {DELTA:g}. m = {m} canaries, {steps} steps, q = {q:g}; {len(seeds)} seeds per row. "
        "Claimed epsilon = PLD accountant epsilon of the calibrated sigma.",
        "",
        "| target ε | claimed ε | σ | lower bound (mean) | min – max | passed | s per audit |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Deliberately broken engine (`--insecure-no-noise`: σ = 0 while claiming ε), seed 0. The ceiling "
        "is the bound if every guess were right: with m canaries no audit can show more.",
        "",
        "| target ε | claimed ε | lower bound | ceiling | verdict | s |",
        "| --- | --- | --- | --- | --- | --- |",
        *broken_rows,
    ]
    if large_rows:
        md += [
            "",
            "More canaries tighten the audit (seed 0):",
            "",
            "| target ε | claimed ε | canaries | lower bound | ceiling | s |",
            "| --- | --- | --- | --- | --- | --- |",
            *large_rows,
        ]
    write_section("audit", "\n".join(md), command="python bench/audit.py" + (" --quick" if args.quick else ""))


if __name__ == "__main__":
    main()
