"""``dprandp epsilon``: privacy spent by one or more DP-SGD phases."""

from __future__ import annotations

import math

import click

from dprandp.accounting import ACCOUNTANTS, MAX_STEPS, DPPhase, explain_epsilon
from dprandp.cli.options import emit_json
from dprandp.errors import InputError


def parse_phase(text: str) -> DPPhase:
    """Parse ``Q:SIGMA:STEPS`` into a :class:`DPPhase`."""
    parts = text.split(":")
    if len(parts) != 3:
        raise InputError(f"--phase must look like Q:SIGMA:STEPS (e.g. 0.08192:9.3:875), got {text!r}")
    try:
        q, sigma = float(parts[0]), float(parts[1])
        steps_f = float(parts[2])
    except ValueError:
        raise InputError(f"--phase {text!r}: Q, SIGMA and STEPS must be numbers") from None
    if not math.isfinite(steps_f) or steps_f != int(steps_f):
        raise InputError(f"--phase {text!r}: STEPS must be a whole number")
    steps = int(steps_f)
    if steps <= 0:
        raise InputError(f"--phase {text!r}: STEPS must be > 0, got {steps}")
    if steps > MAX_STEPS:
        raise InputError(f"--phase {text!r}: STEPS must be at most {MAX_STEPS:.0e} steps, got {steps_f:g}")
    return DPPhase(sample_rate=q, noise_multiplier=sigma, steps=steps)


@click.command("epsilon")
@click.option("--phase", "phases", multiple=True, required=True, metavar="Q:SIGMA:STEPS",
              help="sample rate, noise multiplier and number of steps of one DP-SGD phase; repeat to compose")
@click.option("--delta", type=float, default=1e-5, show_default=True, help="target delta")
@click.option("--accountant", type=click.Choice(ACCOUNTANTS), default="pld", show_default=True,
              help="pld: tight certified upper bound (the smaller of the PLD and RDP bounds; RDP alone past 1e6 steps); "
                   "rdp: Renyi DP cross-check")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(phases: tuple[str, ...], delta: float, accountant: str, as_json: bool) -> None:
    """Epsilon spent by Poisson-subsampled Gaussian DP-SGD phases, composed."""
    parsed = [parse_phase(p) for p in phases]
    report = explain_epsilon(parsed, target_delta=delta, accountant=accountant)
    steps = sum(p.steps for p in parsed)
    if as_json:
        # "reason": why the RDP bound answered for --accountant pld (null where the accountant asked for did)
        emit_json({"epsilon": report.epsilon, "delta": delta, "accountant": accountant, "bound": report.bound,
                   "reason": report.reason, "steps": steps})
    else:
        source = accountant if report.reason is None else f"{accountant}: the {report.bound.upper()} bound ({report.reason})"
        click.echo(f"epsilon = {report.epsilon:.4f} at delta = {delta:g} ({source}, {steps} steps)")
