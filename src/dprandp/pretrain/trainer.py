"""The Phase I training loop: contrastive learning of a WRN trunk on random-process images.

One step: draw a batch of image indices (a seeded permutation per epoch, last partial batch
dropped so every step sees the same number of pairs), make two views of each image
(:mod:`dprandp.pretrain.views`), embed both views in one forward pass (GroupNorm is per-sample, so
concatenating the views changes nothing but the speed), compute the loss, take an SGD step. The lr
is multiplied by ``gamma`` at the milestones after each epoch.

After every epoch the prior and the full training state are written atomically; ``resume=True``
picks the state up and produces bit-for-bit the weights an uninterrupted run would (same device and
thread count), because the permutation and augmentation generators are part of the state.

The forward/backward runs under bf16 autocast where the hardware has native bf16 (CUDA, and CPUs
with AVX512-BF16 or AMX; see :mod:`dprandp.pretrain.precision`); the loss, the weights and the
prior stay float32. On CUDA the tensors are also channels_last (on the CPU that is slower).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dprandp import distributed as dist
from dprandp.errors import InputError, require
from dprandp.models import ProjectionHead, create_model
from dprandp.pretrain import checkpoint as ckpt
from dprandp.pretrain.config import PretrainConfig
from dprandp.pretrain.loss import align_uniform_loss, info_nce_loss
from dprandp.pretrain.precision import resolve_precision
from dprandp.pretrain.views import ViewConfig, two_views


class ContrastiveModel(nn.Module):
    """A WRN trunk with the Phase I projection head: images -> unit-norm embeddings."""

    def __init__(self, config: PretrainConfig) -> None:
        super().__init__()
        wrn = create_model(config.model, seed=config.seed)
        self.model_name = config.model
        self.wrn_config = wrn.config
        self.trunk = wrn.trunk
        spatial = config.crop_size // 4
        with torch.random.fork_rng(devices=[]):  # seeded head init without touching global state
            torch.manual_seed(config.seed + 1)
            self.head = ProjectionHead(
                wrn.config.feature_dim * spatial * spatial, hidden=config.hidden, out_dim=config.out_dim,
                groups=config.head_groups,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def contrastive_loss(config: PretrainConfig, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    if config.loss == "infonce":
        return info_nce_loss(z1, z2, temperature=config.temperature)
    return align_uniform_loss(z1, z2)


def train_step(
    model: ContrastiveModel, optimizer: torch.optim.Optimizer, views: torch.Tensor, config: PretrainConfig, *,
    bf16: bool, forward=None,
) -> torch.Tensor:
    """One Phase I SGD step on ``views`` (the first views of a batch, then the second) -> the detached loss.

    The forward runs under bf16 autocast when ``bf16``; the embeddings are cast back to float32 and,
    under torchrun, gathered from every rank so that the loss sees the global batch; the gradients
    are then averaged over ranks before the step. ``forward`` replaces ``model`` for the forward
    pass only (a ``torch.compile``-d model, say); the optimizer and the gradient reduction still use
    ``model``.
    """
    with torch.autocast(device_type=views.device.type, dtype=torch.bfloat16, enabled=bf16):
        z = (forward or model)(views)
    z1, z2 = (dist.gather_with_grad(v) for v in z.float().chunk(2))  # loss over the global batch
    loss = contrastive_loss(config, z1, z2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    dist.all_reduce_gradients(model)
    optimizer.step()
    return loss.detach()


def make_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """Independent generators for the data order and the augmentations, derived from one seed."""
    a, b = (int(s.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)) for s in np.random.SeedSequence(seed).spawn(2))
    return torch.Generator().manual_seed(a), torch.Generator().manual_seed(b)


@dataclass
class PretrainResult:
    prior_path: Path
    config: PretrainConfig
    epochs_done: int
    epoch_losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0  # across resumes
    images_per_s: float = float("nan")  # this call's throughput (images, each giving two views)


def _config_diff(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_prior_out(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse, in one line, an ``out`` that :func:`pretrain` must not or cannot write.

    An existing prior (or its training state) needs ``resume`` or ``overwrite``; a missing
    directory is created at the first save, so only an existing ancestor that is not a writable
    directory is refused. Cheap: callers run it before rendering any images.
    """
    out = Path(out)
    if (out.exists() or ckpt.state_path(out).exists()) and not (resume or overwrite):
        raise InputError(f"{str(out)!r} already exists; pass --resume to continue it or --overwrite to replace it")
    for parent in out.parents:  # refuse now what the first save (after an epoch) would fail on
        if parent.exists():
            require(parent.is_dir(), f"cannot write {str(out)!r}: {parent} is not a directory")
            require(os.access(parent, os.W_OK | os.X_OK), f"cannot write {str(out)!r}: directory {parent} is not writable")
            break


def pretrain(
    config: PretrainConfig, source, *, out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
    device: torch.device | str | None = None, progress: bool | None = None, log=None,
    stop_after_epoch: int | None = None, keep_state: bool = False, precision: str = "auto",
) -> PretrainResult:
    """Run Phase I on ``source`` (see :mod:`dprandp.pretrain.data`) and write the prior to ``out``.

    ``resume`` continues from ``out``'s training state; without it (or ``overwrite``) an existing
    ``out`` is refused. ``stop_after_epoch`` ends the call early (a time-boxed run to be resumed
    later). The training state is deleted when the run completes unless ``keep_state``.
    ``precision`` is ``auto``, ``bf16`` or ``fp32`` (:func:`~dprandp.pretrain.precision.resolve_precision`).
    """
    out = Path(out)
    state_file = ckpt.state_path(out)
    log = log or (lambda msg: None)
    progress = sys.stderr.isatty() if progress is None else progress
    ctx = dist.init_distributed(device=device)  # torchrun: data parallel, rank 0 writes
    device, log, progress = ctx.device, ctx.main_only(log), progress and ctx.is_main
    described = source.describe()
    config = replace(config, num_images=len(source), image_size=source.image_size,
                     process=described.get("process") or (described.get("store_meta") or {}).get("process"))
    require(config.batch_size % ctx.world_size == 0,
            f"batch size {config.batch_size} must be divisible by the number of processes {ctx.world_size}")
    require(config.batch_size <= len(source),
            f"batch size {config.batch_size} is larger than the {len(source)} images available")
    check_prior_out(out, resume=resume, overwrite=overwrite)

    model = ContrastiveModel(config).to(device)
    cuda = device.type == "cuda"
    bf16 = resolve_precision(precision, device) == "bf16"
    if cuda:
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=config.milestone_epochs, gamma=config.gamma)
    data_gen, aug_gen = make_generators(config.seed)
    start_epoch, train_seconds, epoch_losses = 0, 0.0, []
    resumed_streams = False

    if resume and state_file.exists():
        state = ckpt.load_state(state_file)
        ckpt.check_architecture(model.wrn_config.to_dict(), state.get("wrn_config", {}), f"checkpoint {str(state_file)!r}")
        diff = _config_diff(config.to_dict(), state["config"])
        require(not diff, f"checkpoint {str(state_file)!r} was made with different settings: "
                + ", ".join(f"{k}={state['config'].get(k)!r} (now {config.to_dict().get(k)!r})" for k in diff))
        then, now = state.get("source"), _source_identity(source)
        require(then is None or _same_source(then, now), f"checkpoint {str(state_file)!r} was trained on other images: "
                f"{then} (now {now}); resume with the same --images or --process")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        data_gen.set_state(state["data_generator"])
        rank_states = state.get("aug_generators") or [state["aug_generator"]]  # (older states: rank 0's only)
        if len(rank_states) == ctx.world_size:  # every rank takes its own stream back: bit-for-bit resume
            aug_gen.set_state(rank_states[ctx.rank])
            resumed_streams = True
        else:  # another number of processes: fork rank 0's stream again
            aug_gen.set_state(rank_states[0])
            log(f"{state_file.name} was saved by {len(rank_states)} process(es), this run has "
                f"{ctx.world_size}: the augmentation streams are forked again (not bit-for-bit)")
        start_epoch, train_seconds = int(state["epoch"]), float(state["train_seconds"])
        epoch_losses = list(state["epoch_losses"])
        log(f"resuming {out} at epoch {start_epoch}/{config.epochs}")
    elif resume and out.exists():
        _, meta = ckpt.load_prior(out)
        ckpt.check_architecture(model.wrn_config.to_dict(), meta.get("wrn_config", {}), f"prior {str(out)!r}")
        provenance = meta.get("provenance", {})
        done = int(provenance.get("epochs_done", -1))
        require(done >= config.epochs, f"{str(out)!r} has no training state to resume from ({state_file.name} is missing)")
        then_config = meta.get("pretrain_config") or {}
        diff = _config_diff(config.to_dict(), then_config)
        require(not diff, f"{str(out)!r} is complete but was made with different settings: "
                + ", ".join(f"{k}={then_config.get(k)!r} (now {config.to_dict().get(k)!r})" for k in diff))
        then, now = _source_identity_of(provenance.get("source") or {}), _source_identity(source)
        require(_same_source(then, now), f"{str(out)!r} is complete but was trained on other images: {then} (now {now})")
        log(f"{out} is already complete ({done} epochs)")
        return PretrainResult(out, PretrainConfig.from_dict(then_config), done, list(provenance.get("epoch_losses", [])),
                              float(provenance.get("train_seconds", 0.0)))

    elif resume:  # the torchrun restart path resumes by default, before the first epoch was saved
        log(f"--resume: neither {out} nor {state_file.name} exists yet; starting a fresh run")

    dist.broadcast_module(model)
    if not resumed_streams:
        dist.fork_generator(aug_gen, ctx.rank)  # each rank augments its own slice with its own stream
    view_cfg = ViewConfig(size=config.crop_size)
    steps = len(source) // config.batch_size
    end_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
    images_seen, t_call = 0, time.perf_counter()

    from tqdm.auto import tqdm

    for epoch in range(start_epoch, end_epoch):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(source), generator=data_gen).numpy()
        total = torch.zeros((), dtype=torch.float64, device=device)
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", disable=not progress,
                   leave=False, dynamic_ncols=True)
        for step in bar:
            idx = dist.shard_batch(order[step * config.batch_size:(step + 1) * config.batch_size], ctx)
            v1, v2 = two_views(source.batch(idx), aug_gen, view_cfg, device=device)
            x = torch.cat([v1, v2])
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = train_step(model, optimizer, x, config, bf16=bf16)
            total += loss.double()
            if progress and (step % 5 == 0 or step == steps - 1):
                rate = (step + 1) * config.batch_size / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.1f}")
        bar.close()
        scheduler.step()
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        images_seen += steps * config.batch_size
        mean_loss = float(total.item() / steps)
        epoch_losses.append(mean_loss)
        done = epoch + 1
        # A diverged epoch is never written: the prior and the state on disk stay those of the last good epoch.
        require(np.isfinite(mean_loss), f"loss became {mean_loss} at epoch {done}; lower the learning rate "
                "(this epoch was not written)")
        aug_states = dist.gather_generator_states(aug_gen)  # a collective: every rank takes part
        if ctx.is_main:
            _save(out, state_file, model, optimizer, scheduler, data_gen, aug_states, config, source, done,
                  train_seconds, epoch_losses, "bf16" if bf16 else "fp32")
        log(f"epoch {done}/{config.epochs}: loss {mean_loss:.4f}, lr {optimizer.param_groups[0]['lr']:.4g}, "
            f"{steps * config.batch_size / seconds:.1f} img/s, {seconds:.0f} s")

    dist.barrier()  # rank 0's prior is on disk before any rank returns (and, say, loads it)
    done = max(start_epoch, end_epoch)
    if done >= config.epochs and not keep_state and ctx.is_main:
        state_file.unlink(missing_ok=True)
    elapsed = time.perf_counter() - t_call
    return PretrainResult(out, config, done, epoch_losses, train_seconds,
                          images_seen / elapsed if images_seen else float("nan"))


def _source_identity(source) -> dict:
    """What identifies the images of a run: the process and its seed, or the store's path and shape."""
    return _source_identity_of(source.describe())


def _source_identity_of(d: dict) -> dict:
    keys = (("kind", "process", "num_images", "size", "seed") if d.get("kind") == "process"
            else ("kind", "path", "shape", "content_sha256"))
    return {k: d.get(k) for k in keys}


def _same_source(then: dict, now: dict) -> bool:
    """The same images: every identity field recorded on both sides agrees (a state saved before a field
    was recorded is compared on the fields it has)."""
    return all(then.get(k) == now.get(k) for k in then.keys() | now.keys()
               if then.get(k) is not None and now.get(k) is not None)


def _save(out, state_file, model, optimizer, scheduler, data_gen, aug_states, config, source, epoch, train_seconds, epoch_losses,
          precision):
    """Training state first, then the prior: a crash in between leaves a state that is ahead, never behind."""
    cfg = config.to_dict()
    wrn = model.wrn_config.to_dict()
    ckpt.atomic_save({
        "format": ckpt.STATE_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": _to_cpu(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "data_generator": data_gen.get_state(),
        "aug_generators": list(aug_states),  # every rank's, in rank order
        "config": cfg,
        "wrn_config": wrn,
        "epoch": epoch,
        "train_seconds": train_seconds,
        "epoch_losses": list(epoch_losses),
        "source": _source_identity(source),
    }, state_file)
    described = source.describe()
    store_meta = described.get("store_meta") or {}
    provenance = {
        "source": described,
        "process": described.get("process") or store_meta.get("process"),
        "process_seed": described.get("seed", store_meta.get("seed")),
        "num_images": len(source),
        "image_size": source.image_size,
        "epochs": config.epochs,
        "epochs_done": epoch,
        "seed": config.seed,
        "loss": config.loss,
        "epoch_losses": list(epoch_losses),
        "train_seconds": train_seconds,
        "device": _device_description(next(model.parameters()).device),
        "precision": precision,  # of the last epoch (a resumed run may have changed machines)
        "code_version": ckpt.code_version(),
        "date": ckpt.utc_now(),
    }
    ckpt.atomic_save(ckpt.prior_dict(model.trunk, model_name=config.model, wrn_config=wrn,
                                     provenance=provenance, config=cfg), out)


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
