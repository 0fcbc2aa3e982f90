"""``dprandp pretrain``: Phase I, contrastive pretraining of a prior on random-process images.

Flags only build a :class:`~dprandp.pretrain.PretrainConfig` (a preset with overrides) and an image
source, then call :func:`dprandp.pretrain.pretrain`. Prints one JSON line with the result.
"""

from __future__ import annotations

import click

from dprandp.errors import InputError, check_not_an_input


@click.command("pretrain")
@click.option("--images", "images", type=click.Path(dir_okay=False), default=None,
              help="uint8 (N, H, W, 3) .npy image store (e.g. from `dprandp generate`).")
@click.option("--process", default=None, help="Generate images on the fly from this random process.")
@click.option("--num", "--num-images", "num", type=click.IntRange(min=2), default=None, help="Number of images to generate (with --process).")
@click.option("--size", type=click.IntRange(min=8), default=None, help="Generated image size in px (with --process; default: preset).")
@click.option("--preset", "preset_name", type=click.Choice(["paper", "cpu"]), default="paper", show_default=True,
              help="paper: SPEC.md exactly (WRN-16-4, 200 epochs); cpu: WRN-16-1 sized for a 2-core machine.")
@click.option("--model", default=None, help="Encoder from the model registry (default: preset).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs (default: preset; lr milestones scale with it).")
@click.option("--batch-size", type=click.IntRange(min=2), default=None, help="Batch size (default: preset; lr = --lr-per-256 * B / 256).")
@click.option("--lr-per-256", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate per 256 images (lr = this * B / 256; default: preset, paper 0.12).")
@click.option("--hidden", type=click.IntRange(min=1), default=None, help="Projection head width (default: preset).")
@click.option("--loss", type=click.Choice(["align-uniform", "infonce"]), default=None, help="Contrastive loss (default align-uniform).")
@click.option("--seed", type=int, default=None, help="Seed of the initialisation, data order and augmentations, and (with --process) of the images (default 0).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Prior checkpoint to write (PRIOR.pt).")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out (its .state file).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out and start again.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="Phase I arithmetic: auto = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch (default: torch's choice, or 1 when the machine's load already exceeds its cores).")
@click.option("--no-progress", is_flag=True, help="No progress bar (it is off anyway when stderr is not a terminal).")
def command(images, process, num, size, preset_name, model, epochs, batch_size, lr_per_256, hidden, loss, seed, out, resume,
            overwrite, device, precision, threads, no_progress):
    """Phase I: learn a prior (WRN trunk) from random-process images; costs no privacy."""
    import sys

    import torch

    from dprandp.cli.options import emit_json
    from dprandp.pretrain import check_prior_out, open_store, pretrain, preset, process_source

    if (images is None) == (process is None):
        raise InputError("give exactly one of --images STORE.npy or --process NAME --num N")
    if process is not None and num is None:
        raise InputError("--process needs --num N (how many images to generate)")
    if images is not None and (num is not None or size is not None):
        raise InputError("--num and --size go with --process, not with --images")
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    from dprandp.pipeline.restart import restart_count

    if restart_count() > 0:  # torchrun --max-restarts reran this command after a failure: continue
        resume, overwrite = True, False
    from dprandp.cli.train_options import set_threads

    busy_note = set_threads(threads)
    if device is not None and device not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but no CUDA device is available")

    config = preset(preset_name, model=model, epochs=epochs, batch_size=batch_size, lr_per_256=lr_per_256, hidden=hidden, loss=loss, seed=seed,
                    process=process)
    progress = False if no_progress else None
    check_not_an_input(out, {"--images": images})
    check_prior_out(out, resume=resume, overwrite=overwrite)  # before rendering: a refusal costs nothing
    from dprandp.models import list_models

    if config.model not in list_models():
        raise InputError(f"unknown model {config.model!r}; known models: {', '.join(list_models())}")
    if images is None:
        from dprandp.processes import get_process

        get_process(process)  # an unknown name is refused before anything is rendered
    if images is None and config.batch_size > num:
        raise InputError(f"batch size {config.batch_size} is larger than the {num} images of --num")
    if images is not None:
        source = open_store(images)
    else:
        source = process_source(process, num, size=size or config.image_size, seed=config.seed,
                                progress=sys.stderr.isatty() and not no_progress)

    pending = [busy_note] if busy_note else []
    ignored = source.describe().get("store_meta_ignored") if images is not None else None
    if ignored:
        pending.insert(0, f"note: {ignored}")

    def log(msg: str) -> None:  # the thread note waits for pretrain()'s checks: an error stays one line
        while pending:
            click.echo(pending.pop(), err=True)
        click.echo(msg, err=True)

    result = pretrain(config, source, out=out, resume=resume, overwrite=overwrite, device=device,
                      precision=precision, progress=progress, log=log)
    from dprandp.distributed import init_distributed

    if not init_distributed().is_main:  # under torchrun only rank 0 reports
        return
    emit_json({
        "prior": str(result.prior_path),
        "model": result.config.model,
        "epochs_done": result.epochs_done,
        "final_loss": result.epoch_losses[-1] if result.epoch_losses else None,
        "train_seconds": round(result.train_seconds, 1),
        "images_per_s": round(result.images_per_s, 1),
    })
