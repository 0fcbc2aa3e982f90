"""``dprandp tune``: private hyperparameter search whose released model meets one (epsilon, delta)."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import click

from dprandp.cli.options import emit_json
from dprandp.cli.train_options import (
    make_log,
    overrides_from,
    preset_option,
    progress_default,
    set_threads,
    train_options,
)
from dprandp.errors import InputError, require


def parse_grid(specs: tuple[str, ...]) -> dict[str, list]:
    """``name=v1,v2,...`` (``lr-phase3`` or ``lr_phase3``) -> {field: [values]}, typed like the field."""
    from dprandp.pipeline.config import TrainConfig
    from dprandp.tuning.runs import TUNABLE

    kinds = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
    grid: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        require(sep == "=" and values.strip(), f"--grid {spec!r}: write NAME=V1,V2,... (e.g. lr-phase3=1,2,4)")
        require(name in TUNABLE, f"--grid {name}: only settings that leave the DP mechanism unchanged can be "
                                 f"searched ({', '.join(TUNABLE)})")
        require(name not in grid, f"--grid {name} is given twice")
        kind = kinds[name] if kinds[name] in (int, float) else float
        try:
            grid[name] = [kind(v) for v in values.split(",")]
        except ValueError:
            raise InputError(f"--grid {name}: {values!r} is not a list of {kind.__name__} values") from None
    return grid


@click.command("tune")
@preset_option("paper")
@click.option("--prior", type=str, default=None, help="Phase I prior file, or `none` for DP-SGD from scratch")
@train_options
@click.option("--grid", "grid_specs", multiple=True, metavar="NAME=V1,V2,...",
              help="a setting to search and its values (repeatable): lr-phase2, lr-phase3, momentum, augmult, "
                   "max-grad-norm, freeze-stages, head-pool")
@click.option("--runs-mean", type=float, default=3.0, show_default=True,
              help="mean number of training runs (the number is random; that is what makes tuning cheap to account)")
@click.option("--runs-shape", type=float, default=0.0, show_default=True,
              help="distribution of the number of runs: 0 logarithmic (of the families that always release a "
                   "model, the least noise for 2-10 runs on average; BENCHMARKS.md tuning_cost), 1 geometric, "
                   "other > 0 truncated negative binomial, inf Poisson (can draw 0 runs: releases nothing)")
@click.option("--score-noise", type=float, default=None,
              help="std of the Gaussian noise on each run's count of correct validation predictions (default 20)")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="directory to create: model.pt and tuning.json (to release), private-run/ (default: runs/tune-<dataset>-<random>)")
@click.option("--threads", type=int, default=None, help="torch CPU threads")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--json", "as_json", is_flag=True, help="print tuning.json as one JSON object")
def command(preset: str, prior: str | None, grid_specs, runs_mean: float, runs_shape: float, score_noise,
            out, threads, no_progress: bool, as_json: bool, **flags) -> None:
    """Private random search: K runs (K random, mean --runs-mean), each on settings drawn from --grid,
    scored by a noisy validation count; only the best run is released, and --epsilon covers it all.

    Example: dprandp tune --preset cpu --dataset cifar10 --data cifar10.npz --prior prior.pt
    --epsilon 1 --val-fraction 0.1 --grid lr-phase3=1,2,4
    """
    from dprandp.pipeline import preset as make_preset
    from dprandp.tuning import Repetitions
    from dprandp.tuning.runs import SCORE_NOISE, TuningConfig, tune

    log = make_log(set_threads(threads))
    require(prior is not None, "--prior is required: a prior file from `dprandp pretrain`, or `none`")
    require(grid_specs, "--grid is required: at least one setting to search, e.g. --grid lr-phase3=1,2,4")
    overrides = overrides_from(flags)
    grid = parse_grid(grid_specs)
    both = sorted(name.replace("_", "-") for name in grid if overrides.get(name) is not None)
    require(not both, f"--grid searches {', '.join(both)}: drop the fixed --{', --'.join(both)}")
    config = make_preset(preset, prior=None if prior.lower() == "none" else prior, **overrides)
    require(config.prior is not None or "lr_phase2" not in grid,
            "--grid lr-phase2 without a prior searches a setting no run uses (there is no Phase II)")
    tuning = TuningConfig.from_mapping(grid, repetitions=Repetitions(mean=runs_mean, shape=runs_shape),
                                       score_noise=SCORE_NOISE if score_noise is None else score_noise)
    out = out or Path("runs") / f"tune-{config.dataset}-{secrets.token_hex(4)}"  # no start time in the name
    record = tune(config, tuning, out=out, progress=progress_default(no_progress), log=log)
    if as_json:
        emit_json({**record, "out": str(out)})
        return
    eps = f"(epsilon = {record['epsilon']:.3f}, delta = {record['target_delta']:g}) for the whole search"
    if record["released"] is None:
        click.echo(f"nothing is released: no run was drawn (a Poisson number can be 0) or every run failed; {eps}")
        return
    chosen = ", ".join(f"{k} = {v:g}" for k, v in record["released"]["settings"].items())
    click.echo(f"selected: {chosen}; noisy score {record['released']['noisy_val_correct']:.1f} correct of "
               f"{record['num_val']} validation images (noise std {record['score_noise']:g}) at {eps}; "
               f"sigma = {record['noise_multiplier']:.3f}")
    click.echo(f"release {out}/model.pt and {out}/tuning.json; keep {out}/private-run private (its exact scores "
               "and times are not covered)")
