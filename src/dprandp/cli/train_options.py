"""Flags shared by ``dprandp train`` and ``dprandp run``: they only fill a TrainConfig.

Every hyperparameter of :class:`~dprandp.pipeline.config.TrainConfig` has a flag; a flag left
out keeps the preset's value (``None`` means "not given").
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
from pathlib import Path

import click

from dprandp.data import DATASETS
from dprandp.pipeline.config import PRECISIONS, PRESETS


def _positive(name, allow_zero=False):
    def convert(ctx, param, value):
        if value is None:
            return value
        ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            raise click.BadParameter(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}",
                                     ctx, param)
        return value

    return convert


def _int_at_least(name, minimum):
    def convert(ctx, param, value):
        if value is not None and value < minimum:
            raise click.BadParameter(f"{name} must be >= {minimum}, got {value}", ctx, param)
        return value

    return convert


# (flag, config field, click kwargs)
TRAIN_FLAGS = [
    ("--dataset", "dataset", dict(type=click.Choice(list(DATASETS)), help="private dataset (default: the preset's, digits for demo)")),
    ("--data", "data", dict(type=str, help="dataset path: .npz file, folder or torchvision root (see README)")),
    ("--val-fraction", "val_fraction", dict(type=float, help="carve this fraction of train as a validation split (seeded)")),
    ("--model", "model", dict(type=str, help="architecture, e.g. wrn-16-4 (paper), wrn-16-1 (cpu)")),
    ("--head-pool", "head_pool", dict(type=int, callback=_int_at_least("--head-pool", 1), help="the linear head reads the final features average-pooled to a P x P grid (1 = global pool, the paper)")),
    ("--epsilon", "target_epsilon", dict(type=float, callback=_positive("--epsilon"), help="target epsilon for Phases II + III together")),
    ("--delta", "target_delta", dict(type=float, callback=_positive("--delta"), help="target delta (default 1e-5; must be < 1/N)")),
    ("--noise-multiplier", "noise_multiplier", dict(type=float, callback=_positive("--noise-multiplier"), help="fix sigma instead of calibrating it (refused if it overshoots epsilon)")),
    ("--accountant", "accountant", dict(type=click.Choice(["pld", "rdp"]), help="privacy accountant (default pld)")),
    ("--max-grad-norm", "max_grad_norm", dict(type=float, callback=_positive("--max-grad-norm"), help="per-sample clipping bound C")),
    ("--batch-size", "batch_size", dict(type=int, callback=_int_at_least("--batch-size", 1), help="expected logical batch B (q = B / N)")),
    ("--augmult", "augmult", dict(type=int, callback=_int_at_least("--augmult", 1), help="augmented views per sample K")),
    ("--steps", "steps", dict(type=int, callback=_int_at_least("--steps", 1), help="DP steps in total (Phase II + III)")),
    ("--phase2-share", "phase2_share", dict(type=float, help="fraction of steps in Phase II (default: the preset's share: paper 96/875, cpu 0.2)")),
    ("--phase2-steps", "phase2_steps", dict(type=int, callback=_int_at_least("--phase2-steps", 0), help="steps of Phase II (linear probing)")),
    ("--phase3-steps", "phase3_steps", dict(type=int, callback=_int_at_least("--phase3-steps", 0), help="steps of Phase III (0: linear probing only)")),
    ("--lr-phase2", "lr_phase2", dict(type=float, callback=_positive("--lr-phase2"), help="SGD learning rate of Phase II")),
    ("--lr-phase3", "lr_phase3", dict(type=float, callback=_positive("--lr-phase3"), help="SGD learning rate of Phase III (default: the preset's; `cpu` uses 2, and 4 from --epsilon 4 up)")),
    ("--freeze-stages", "freeze_stages", dict(type=int, callback=_int_at_least("--freeze-stages", 0), help="Phase III keeps the trunk's first k stages frozen (0: fine-tune all, the paper; frozen stages cost no backward pass)")),
    ("--phase2-features", "phase2_features", dict(type=click.Choice(["augmented", "cached"]), help="Phase II inputs: K augmented views through the frozen trunk (paper) or its features of the un-augmented images, computed once (much faster)")),
    ("--precision", "precision", dict(type=click.Choice(PRECISIONS), help="forward/backward arithmetic of the DP steps: fp32 (default) or bf16 autocast (CUDA, CPUs with native bf16); clipping, sums and noise stay float32")),
    ("--flip/--no-flip", "flip", dict(help="mirror half the training views left-right (default, except on digits) or never (digits, text, X-rays with laterality: images whose mirror is another class)")),
    ("--momentum", "momentum", dict(type=float, callback=_positive("--momentum", allow_zero=True), help="SGD momentum (paper: 0)")),
    ("--device", "device", dict(type=str, help="auto (CUDA if available; default), cpu, cuda or cuda:N")),
    ("--physical-batch-size", "physical_batch_size", dict(type=int, callback=_int_at_least("--physical-batch-size", 1), help="samples per forward pass (memory only; train --resume may change it)")),
    ("--eval-batch-size", "eval_batch_size", dict(type=int, callback=_int_at_least("--eval-batch-size", 1), help="images per evaluation or feature pass (memory only; train --resume may change it)")),
    ("--seed", "seed", dict(type=int, help="seed of model init and augmentation (and noise with --deterministic-noise)")),
    ("--checkpoint-every", "checkpoint_every", dict(type=int, callback=_int_at_least("--checkpoint-every", 1), help="steps between resumable checkpoints")),
    ("--eval-every", "eval_every", dict(type=int, callback=_int_at_least("--eval-every", 0), help="steps between test evaluations for the plot (0: end only)")),
]


def train_options(func):
    """Decorate a click command with every TrainConfig flag plus --no-ema / --deterministic-noise."""
    for flag, dest, kwargs in reversed(TRAIN_FLAGS):
        func = click.option(flag, dest, default=None, **kwargs)(func)
    func = click.option("--no-ema", "no_ema", is_flag=True, help="report the last iterate instead of the EMA")(func)
    func = click.option("--deterministic-noise", is_flag=True,
                        help="derive DP noise and batch sampling from --seed (research reproducibility only; "
                             "default: OS entropy)")(func)
    return func


def overrides_from(kwargs: dict) -> dict:
    """The TrainConfig overrides named by the parsed flags (pops them from ``kwargs``)."""
    out = {dest: kwargs.pop(dest) for _, dest, _ in TRAIN_FLAGS}
    if kwargs.pop("no_ema"):
        out["ema"] = False
    if kwargs.pop("deterministic_noise"):
        out["deterministic_noise"] = True
    return out


def preset_option(default: str):
    return click.option("--preset", type=click.Choice(list(PRESETS)), default=default, show_default=True,
                        help="starting values of every hyperparameter (flags override them)")


def default_run_dir(prefix: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{prefix}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def progress_default(no_progress: bool) -> bool:
    return (not no_progress) and sys.stderr.isatty()


def set_threads(threads: int | None) -> str | None:
    """``--threads N``; without it, torch's default unless the machine is already busy.

    torch's intra-op threads spin while they wait for each other, so on a machine whose load
    already exceeds its cores they slow each other down (3x measured on a shared 2-core box);
    one thread is then faster. Results differ only by floating-point summation order.
    Returns a note for the log (printed once the inputs are validated), or None.
    """
    import os

    import torch

    from dprandp.errors import require

    if threads is not None:
        require(1 <= threads <= 1024, f"--threads must be in 1..1024, got {threads}")
        torch.set_num_threads(threads)
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not available on this platform
        return None
    cores = os.cpu_count() or 1
    if cores > 1 and load >= cores:
        torch.set_num_threads(1)
        return f"the machine is busy (load {load:.1f} on {cores} cores): using 1 thread (--threads to override)"
    return None


def make_log(note: str | None):
    """The progress logger of a command: stderr lines, ``note`` first (after input checks passed)."""
    pending = [note] if note else []

    def log(message: str) -> None:
        while pending:
            echo_log(pending.pop())
        echo_log(message)

    return log


def echo_log(message: str) -> None:
    click.echo(f"dprandp: {message}", err=True)
