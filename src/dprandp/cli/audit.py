"""``dprandp audit``: empirical privacy audit of the DP-SGD engine in one run.

Exit status: 0 when the empirical lower bound does not exceed the claimed ε, 1 when it does
(the engine leaks more than the accountant says), 2 for bad input.
"""

from __future__ import annotations

import click

from dprandp.audit.canaries import AuditConfig, run_audit
from dprandp.cli.options import emit_json
from dprandp.errors import InputError


@click.command("audit")
@click.option("--epsilon", type=float, default=None,
              help="claimed epsilon: the noise is calibrated to it by the accountant  [default: 2]")
@click.option("--noise-multiplier", type=float, default=None,
              help="audit this noise multiplier instead of calibrating one (claim = its epsilon)")
@click.option("--delta", type=float, default=1e-5, show_default=True, help="target delta")
@click.option("--canaries", type=int, default=5000, show_default=True,
              help="number of gradient canaries (each included with probability 1/2)")
@click.option("--steps", type=int, default=10, show_default=True, help="DP-SGD steps of the audited run")
@click.option("--sample-rate", type=float, default=0.5, show_default=True, help="Poisson sampling rate q")
@click.option("--confidence", type=float, default=0.95, show_default=True, help="confidence of the lower bound")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of canaries, sampling and (audit) noise")
@click.option("--insecure-no-noise", is_flag=True,
              help="BREAKS PRIVACY ON PURPOSE: run the engine with sigma = 0 while claiming epsilon, "
                   "to show that the audit catches it (when the claim is below the ceiling of --canaries)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(epsilon, noise_multiplier, delta, canaries, steps, sample_rate, confidence, seed,
            insecure_no_noise, as_json) -> int:
    """Insert white-box gradient canaries into one DP-SGD run of the real engine and turn
    membership guesses into a lower bound on epsilon at --confidence (Steinke, Nasr & Jagielski 2023).

    A correct engine gives a lower bound at or below the claimed epsilon; a bound above it
    means the engine leaks more than its accountant claims. Exit status: 0 PASS, 1 FAIL, 3
    INCONCLUSIVE (the claim is at or above the largest epsilon this many canaries can show, so
    the audit could not have failed), 2 bad input.
    """
    if epsilon is not None and noise_multiplier is not None:
        raise InputError("give either --epsilon or --noise-multiplier, not both")
    config = AuditConfig(
        target_epsilon=2.0 if epsilon is None else epsilon,
        noise_multiplier=noise_multiplier,
        target_delta=delta,
        num_canaries=canaries,
        steps=steps,
        sample_rate=sample_rate,
        confidence=confidence,
        seed=seed,
        insecure_no_noise=insecure_no_noise,
    )
    report = run_audit(config)
    if as_json:
        emit_json(report.to_dict())
    else:
        b = report.bound
        if report.insecure_no_noise:
            click.echo("WARNING: --insecure-no-noise: the engine ran WITHOUT noise (sigma = 0); "
                       "the claimed epsilon below is false on purpose.")
        click.echo(f"claimed:  epsilon = {report.epsilon:.3f} at delta = {report.delta:g} "
                   f"(sigma = {report.noise_multiplier:.4g}, q = {report.sample_rate:g}, {report.steps} steps, PLD)")
        click.echo(f"audit:    epsilon >= {report.epsilon_lower_bound:.3f} with {100 * report.confidence:g}% confidence "
                   f"({report.num_canaries} canaries, {report.num_included} in; "
                   f"{b.k_plus} + {b.k_minus} guesses, {b.num_correct} correct)")
        click.echo(f"ceiling:  {report.num_canaries} canaries cannot show more than epsilon = "
                   f"{report.max_detectable_epsilon:.2f}  ({report.seconds:.1f} s)")
        if not report.passed:
            click.echo(f"result:   FAIL (the engine leaks more than claimed: "
                       f"{report.epsilon_lower_bound:.3f} > {report.epsilon:.3f})")
        elif not report.conclusive:
            click.echo(f"result:   INCONCLUSIVE (the claim epsilon = {report.epsilon:.3f} is at or above what "
                       f"{report.num_canaries} canaries can show, {report.max_detectable_epsilon:.2f}: this audit "
                       "would pass any engine; use more --canaries or audit a smaller --epsilon)")
        else:
            click.echo("result:   PASS (no evidence that the engine leaks more than claimed)")
    return 1 if not report.passed else 3 if not report.conclusive else 0
