"""``dprandp calibrate``: the smallest noise multiplier for a target epsilon."""

from __future__ import annotations

import click

from dprandp.accounting import ACCOUNTANTS, DPPhase, calibrate_noise
from dprandp.cli.options import emit_json
from dprandp.errors import require


@click.command("calibrate")
@click.option("--epsilon", "target_epsilon", type=float, required=True, help="target epsilon")
@click.option("--delta", "target_delta", type=float, default=1e-5, show_default=True, help="target delta")
@click.option("--sample-rate", type=float, required=True, help="Poisson sampling rate q = B / N")
@click.option("--steps", type=int, required=True, help="number of DP-SGD steps (all phases)")
@click.option("--accountant", type=click.Choice(ACCOUNTANTS), default="pld", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
            accountant: str, as_json: bool) -> None:
    """Smallest noise multiplier whose epsilon does not exceed the target."""
    require(steps > 0, f"--steps must be > 0, got {steps}")
    require(0.0 < sample_rate <= 1.0, f"--sample-rate must be in (0, 1], got {sample_rate}")
    phase = DPPhase(sample_rate=sample_rate, noise_multiplier=1.0, steps=steps)
    result = calibrate_noise(target_epsilon=target_epsilon, target_delta=target_delta,
                             phases=[phase], accountant=accountant)
    if as_json:
        emit_json({"noise_multiplier": result.noise_multiplier, "epsilon": result.epsilon,
                   "delta": target_delta, "accountant": accountant})
    else:
        click.echo(f"noise_multiplier = {result.noise_multiplier:.4f} "
                   f"(epsilon = {result.epsilon:.4f} at delta = {target_delta:g}, {accountant})")
