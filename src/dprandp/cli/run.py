"""``dprandp run``: Phase I (or a cached prior) + II + III in one command.

With no arguments: the offline demo (tiny Phase I on StyleGAN-Oriented images, then DP
Phases II + III on scikit-learn's digits), a few minutes on 2 cores, into runs/demo-<time>.
"""

from __future__ import annotations

import click

from dprandp.cli.train import print_result
from dprandp.cli.train_options import (
    default_run_dir,
    make_log,
    overrides_from,
    preset_option,
    progress_default,
    set_threads,
    train_options,
)
from dprandp.errors import require


@click.command("run")
@preset_option("demo")
@click.option("--prior", type=str, default=None,
              help="use this prior file and skip Phase I (`none`: DP-SGD from scratch)")
@click.option("--pretrain-preset", type=click.Choice(["demo", "cpu", "paper"]), default=None,
              help="Phase I settings (default: the one named like --preset)")
@click.option("--pretrain-epochs", type=int, default=None, help="override Phase I epochs")
@click.option("--pretrain-images", type=int, default=None, help="override the number of Phase I images")
@click.option("--pretrain-seed", type=int, default=None,
              help="override the Phase I seed (its images, init and augmentation; a different prior)")
@click.option("--no-cache", is_flag=True, help="always run Phase I (do not reuse a cached prior)")
@train_options
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="run directory to create (default: runs/<preset>-<time>)")
@click.option("--overwrite", is_flag=True, help="replace an existing run directory")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, or 1 if the machine is busy)")
@click.option("--no-progress", is_flag=True, help="no progress bars")
@click.option("--json", "as_json", is_flag=True, help="print summary.json as one JSON object")
def command(preset: str, prior, pretrain_preset, pretrain_epochs, pretrain_images, pretrain_seed, no_cache: bool, out,
            overwrite: bool, threads, no_progress: bool, as_json: bool, **flags) -> None:
    """Phases I + II + III end to end; prints test accuracy with (epsilon, delta)."""
    from dprandp.pipeline.config import preset as make_preset
    from dprandp.pipeline.run import PHASE_I_PRIOR, RunConfig, pretrain_config_for, run_all

    log = make_log(set_threads(threads))
    overrides = overrides_from(flags)
    pretrain_config = None
    require(out is None or str(out).strip() != "", "--out is empty; give a run directory or leave --out out")
    require(pretrain_seed is None or 0 <= pretrain_seed < 2**63,
            f"--pretrain-seed must be an integer from 0 to 2**63 - 1, got {pretrain_seed}")
    if prior is not None:
        phase1 = {"--pretrain-preset": pretrain_preset, "--pretrain-epochs": pretrain_epochs,
                  "--pretrain-images": pretrain_images, "--pretrain-seed": pretrain_seed, "--no-cache": no_cache or None}
        given = [flag for flag, value in phase1.items() if value is not None]
        require(not given, f"--prior skips Phase I, so {', '.join(given)} would have no effect; drop "
                           f"{'it' if len(given) == 1 else 'them'} or drop --prior")
        prior_path = None if prior.lower() == "none" else prior
    else:
        prior_path = PHASE_I_PRIOR
        model = overrides.get("model") or make_preset(preset, prior="x").model
        pretrain_config = pretrain_config_for(preset, model=model, pretrain_preset=pretrain_preset,
                                              epochs=pretrain_epochs, num_images=pretrain_images,
                                              seed=pretrain_seed)
    config = make_preset(preset, prior=prior_path, **overrides)
    progress = progress_default(no_progress)
    result = run_all(RunConfig(train=config, pretrain=pretrain_config, cache=not no_cache),
                     out=out or default_run_dir(preset), overwrite=overwrite, progress=progress, log=log)
    print_result(result.summary, result.run_dir, as_json)
