"""``dprandp train``: Phases II + III (DP-SGD) on private data from a prior; ``--resume`` a run."""

from __future__ import annotations

import click

from dprandp.cli.options import emit_json
from dprandp.cli.train_options import (
    default_run_dir,
    make_log,
    overrides_from,
    preset_option,
    progress_default,
    set_threads,
    train_options,
)
from dprandp.errors import InputError, require


def print_result(summary: dict, run_dir, as_json: bool) -> None:
    if as_json:
        emit_json({**summary, "run_dir": str(run_dir)})
        return
    val = f", validation {100 * summary['val_accuracy']:.2f} %" if summary.get("val_accuracy") is not None else ""
    steps, applied = summary["steps"], summary.get("steps_applied", summary["steps"])
    stopped = summary.get("stopped_early")
    if applied != steps or stopped:  # the model received fewer steps than the ledger counts, or than planned
        why = [f"{steps - applied} lost in a crash"] if applied != steps else []
        why += [stopped] if stopped else []  # "stopped after N of M steps: ..."
        steps_text = f"{steps} DP steps counted, {applied} applied ({'; '.join(why)})"
    else:
        steps_text = f"{steps} DP steps"
    click.echo(f"test accuracy {100 * summary['test_accuracy']:.2f} % ({summary.get('reported_model', 'final EMA model')}, n = "
               f"{summary['num_test']}{val}) "
               f"at (epsilon = {summary['epsilon']:.3f}, delta = {summary['delta']:g}); "
               f"{steps_text}, sigma = {summary['noise_multiplier']:.3f}")
    if summary.get("test_balanced_accuracy") is not None:
        auc = summary.get("test_auc")
        click.echo(f"balanced accuracy {100 * summary['test_balanced_accuracy']:.2f} %"
                   f"{'' if auc is None else f', ROC-AUC {auc:.4f}'} (test; read these on imbalanced classes)")
    if summary.get("test_accuracy_flip") is not None:
        click.echo(f"with flip test-time augmentation: test accuracy {100 * summary['test_accuracy_flip']:.2f} % "
                   "(`dprandp evaluate --tta flip`)")
    click.echo(f"run directory: {run_dir} (report.html, summary.json, ledger.jsonl, model.pt; "
               f"`dprandp predict --model {run_dir} --images IMAGES` labels new images)")


@click.command("train")
@preset_option("paper")
@click.option("--prior", type=str, default=None,
              help="Phase I prior file (from `dprandp pretrain`), or `none` for DP-SGD from scratch")
@train_options
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="run directory to create (default: runs/<dataset>-<time>)")
@click.option("--overwrite", is_flag=True, help="replace an existing run directory")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="continue the killed run in this directory (other flags are taken from its config.json)")
@click.option("--auto-resume", is_flag=True,
              help="if --out holds this same run: continue it (or report it if complete); else start it. "
                   "Implied when torchrun --max-restarts restarts the command")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, or 1 if the machine is busy)")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--json", "as_json", is_flag=True, help="print summary.json as one JSON object")
def command(preset: str, prior: str | None, out, overwrite: bool, resume_dir, auto_resume: bool, threads,
            no_progress: bool, as_json: bool, **flags) -> None:
    """DP-SGD Phases II (linear probing) + III (fine-tuning) with one (epsilon, delta) budget.

    Example: dprandp train --dataset cifar10 --data ../shared/data/cifar10.npz --prior prior.pt
    --preset cpu --epsilon 1
    """
    from dprandp.pipeline import preset as make_preset
    from dprandp.pipeline import resume, train

    require(out is None or str(out).strip() != "", "--out is empty; give a run directory or leave --out out")
    log = make_log(set_threads(threads))
    overrides = overrides_from(flags)
    progress = progress_default(no_progress)
    if resume_dir is not None:
        from dprandp.cli.train_options import TRAIN_FLAGS

        flag_of = {dest: flag for flag, dest, _ in TRAIN_FLAGS} | {"ema": "--no-ema", "deterministic_noise":
                                                                    "--deterministic-noise"}
        from dprandp.pipeline.config import MEMORY_ONLY

        memory = {k: overrides.pop(k, None) for k in MEMORY_ONLY}
        given = [flag_of.get(k, k) for k, v in overrides.items() if v is not None]
        given += [flag for flag, on in (("--prior", prior), ("--out", out is not None), ("--overwrite", overwrite),
                                        ("--auto-resume", auto_resume)) if on]
        ctx = click.get_current_context()
        if ctx.get_parameter_source("preset") not in (None, click.core.ParameterSource.DEFAULT):
            given.append("--preset")
        require(not given, f"--resume takes its settings from the run's config.json (only "
                f"{', '.join(flag_of[k] for k in MEMORY_ONLY)} may change); drop {', '.join(sorted(given))}")
        result = resume(resume_dir, progress=progress, log=log, memory=memory)
    else:
        if prior is None:
            raise InputError("--prior is required: a prior file from `dprandp pretrain`, or `none` for DP-SGD from scratch")
        prior_path = None if prior.lower() == "none" else prior
        config = make_preset(preset, prior=prior_path, **overrides)
        from dprandp.pipeline.restart import continue_or_start, restart_count

        if auto_resume or restart_count() > 0:
            require(out is not None, "--auto-resume needs --out (the run directory to continue)")
            require(not overwrite, "--auto-resume and --overwrite exclude each other")
            result = continue_or_start(config, out, progress=progress, log=log)
        else:
            result = train(config, out=out or default_run_dir(config.dataset), overwrite=overwrite,
                           progress=progress, log=log)
    from dprandp.distributed import init_distributed

    if init_distributed().is_main:  # under torchrun only rank 0 reports
        print_result(result.summary, result.run_dir, as_json)
