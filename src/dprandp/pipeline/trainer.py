"""Phases II + III: DP-SGD on the private data from a prior, with ledger, checkpoints and EMA.

``train(config, out=RUN_DIR)`` runs a fresh run, ``resume(RUN_DIR)`` continues a killed one.
Order of one step (this order is what makes the ledger trustworthy):

1. ask the ledger whether one more step stays within the target epsilon; if not, stop;
2. Poisson-sample a logical batch, augment K views per sample, clip per-sample gradients
   (averaged over the views first), add Gaussian noise once (the DP-SGD engine);
3. ``before_update``: append the step to ``ledger.jsonl`` and fsync;
4. apply the update, fold it into the EMA, log metrics; every ``checkpoint_every`` steps
   write an atomic checkpoint.

Phase II trains only the parameters the prior lacks (final norm + head): the trunk's parameters
have ``requires_grad=False``, so the engine computes no per-sample gradient for them. Phase III
trains all parameters, or all but the trunk's first ``freeze_stages`` stages. Both phases use the
same noise multiplier, calibrated over all steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from dprandp.accounting import DPPhase, calibrate_noise, compute_epsilon
from dprandp.augment import random_crop_flip
from dprandp.data import ImageData, load_dataset, to_float
from dprandp.distributed import (
    barrier,
    broadcast_module,
    distribute_generators,
    init_distributed,
    rank_run_dir,
    shard_sampler,
)
from dprandp.errors import InputError, check_not_an_input, require
from dprandp.models import create_model
from dprandp.pipeline import state as st
from dprandp.pipeline.config import MEMORY_ONLY, TrainConfig, is_device_name
from dprandp.pipeline.finish import prior_provenance, prior_sha256
from dprandp.pipeline.ledger import PrivacyLedger, spent_budget
from dprandp.pipeline.memory import check_chunk_fits, trainable_in_phase
from dprandp.pipeline.probe import ProbeModel, pooled_features
from dprandp.pipeline.rundir import (
    MetricsLog,
    atomic_write_json,
    check_run_dir,
    code_version,
    prepare_run_dir,
    read_json,
    run_dir_lock,
)
from dprandp.privacy import DPSGD, EMA, DPConfig


@dataclass(frozen=True)
class Plan:
    """What a config means for a dataset: q, sigma and the epsilon the full schedule reaches."""

    num_train: int
    sample_rate: float
    noise_multiplier: float
    planned_epsilon: float

    def phases(self, config: TrainConfig) -> list[DPPhase]:
        return [DPPhase(sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=s)
                for s in (config.phase2_steps, config.phase3_steps) if s > 0]


def sample_rate_for(config: TrainConfig, num_train: int) -> float:
    """q = B / N from the config (never from a loader), after checking delta < 1/N and B <= N."""
    n = num_train
    require(config.target_delta < 1.0 / n,
            f"delta = {config.target_delta:g} must be below 1/N = 1/{n} = {1.0 / n:.3g} "
            f"(N = {n} training images); a larger delta allows leaking whole records")
    require(config.batch_size <= n, f"batch size {config.batch_size} exceeds the {n} training images; pass a smaller "
                                    f"--batch-size (for a few hundred images: 128, as in README.md's BreastMNIST section)")
    return config.batch_size / n


def make_plan(config: TrainConfig, num_train: int) -> Plan:
    """q = B / N from the config; one sigma for all steps (calibrated unless given)."""
    n = num_train
    q = sample_rate_for(config, n)
    shape = [DPPhase(sample_rate=q, noise_multiplier=1.0, steps=config.steps)]
    if config.noise_multiplier is None:
        cal = calibrate_noise(target_epsilon=config.target_epsilon, target_delta=config.target_delta,
                              phases=shape, accountant=config.accountant)
        sigma, eps = cal.noise_multiplier, cal.epsilon
    else:
        sigma = float(config.noise_multiplier)
        eps = compute_epsilon([shape[0].with_noise(sigma)], target_delta=config.target_delta,
                              accountant=config.accountant)
        require(eps <= config.target_epsilon,
                f"noise multiplier {sigma:g} over {config.steps} steps spends epsilon = {eps:.4f} "
                f"> target {config.target_epsilon:g}; raise it or drop --noise-multiplier to calibrate")
    return Plan(num_train=n, sample_rate=q, noise_multiplier=sigma, planned_epsilon=eps)


def resolve_device(name: str, *, world_size: int = 1, local_rank: int = 0) -> torch.device:
    """The torch device of a run: ``auto`` is CUDA when available, else the CPU.

    Under torchrun (``world_size > 1``) each process computes on ``cuda:LOCAL_RANK`` (one GPU per
    process, NCCL collectives) or on the CPU (gloo); a fixed ``cuda:N`` is refused there because
    every rank would pick the same GPU.
    """
    require(is_device_name(name), f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        require(torch.cuda.is_available(), f"--device {name}: CUDA is not available on this machine")
        if world_size > 1:
            require(name == "cuda", f"--device {name} under torchrun: each process uses cuda:LOCAL_RANK; "
                    "pass --device cuda (or auto)")
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if name == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        require(int(name[5:]) < torch.cuda.device_count(),
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def _run_device(config: TrainConfig):
    """(device, distributed context): the process group is joined with the backend of the device."""
    import os

    device = resolve_device(config.device, world_size=_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    ctx = init_distributed(device=device)
    # No TF32 switch here: the per-sample clipping runs in full float32 by itself (privacy.tf32_off).
    return device, ctx


def build_model(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The classifier, initialised from ``--seed``, with the prior's trunk loaded if any."""
    model = create_model(config.model, head_pool=config.head_pool, num_classes=num_classes, seed=st.derive_seed(config.seed, "init"))
    model.frozen_prefixes(config.freeze_stages)  # an out-of-range --freeze-stages fails here, before any output
    if config.prior is not None:
        from dprandp.pretrain import apply_prior

        apply_prior(model, config.prior)
    return model


def _mirror_mean(model: torch.nn.Module, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Flip test-time augmentation: the mean of ``logits`` (the model on ``x``) and the logits of
    the mirror images. Post-processing of the released model, so it costs no privacy."""
    return (logits + model(x.flip(3))) / 2


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, *, flip_tta: bool = False) -> torch.Tensor:
    """Logits of ``model`` on a normalised NCHW batch, flip-averaged with ``flip_tta``."""
    logits = model(x)
    return _mirror_mean(model, x, logits) if flip_tta else logits


@torch.no_grad()
def image_logits(model: torch.nn.Module, images, batch_size: int, with_flip: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (N x C, float32) on uint8 NHWC ``images``, plain and (``with_flip``) with flip TTA,
    from one forward pass per orientation: the plain logits serve both."""
    was_training = model.training
    model.eval()
    plain, flip = [], []
    device = next(model.parameters()).device
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size]).to(device)
        logits = model(x)
        plain.append(logits.float().cpu())
        if with_flip:
            flip.append(_mirror_mean(model, x, logits).float().cpu())
    model.train(was_training)
    return torch.cat(plain).numpy(), (torch.cat(flip).numpy() if with_flip else None)


def _accuracy_pair(model: torch.nn.Module, images, labels, batch_size: int, with_flip: bool) -> tuple[float, float | None]:
    """Top-1 accuracy on uint8 NHWC ``images``, plain and (``with_flip``) with flip TTA."""
    plain, flip = image_logits(model, images, batch_size, with_flip)
    y = np.asarray(labels).reshape(-1)
    return float((plain.argmax(1) == y).mean()), (float((flip.argmax(1) == y).mean()) if with_flip else None)


def accuracies(model: torch.nn.Module, images, labels, *, batch_size: int = 1024) -> tuple[float, float]:
    """Top-1 accuracy of ``model`` on uint8 NHWC ``images``, plain and with flip TTA."""
    return _accuracy_pair(model, images, labels, batch_size, with_flip=True)


class _AccuracyMeter:
    """Per-sample cross-entropy that also counts correct predictions of the views it sees
    (the engine calls it on each physical chunk; inside ``vmap`` it only computes the loss)."""

    def __init__(self) -> None:
        self.correct, self.total = 0, 0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, targets, reduction="none")
        try:
            self.correct += int((logits.detach().argmax(1) == targets).sum())
            self.total += int(targets.numel())
        except RuntimeError:  # batched tensors inside torch.func.vmap
            pass
        return loss

    def take(self) -> float:
        acc = self.correct / self.total if self.total else float("nan")
        self.correct, self.total = 0, 0
        return acc


def _set_phase(model, config: TrainConfig, phase: str):
    """requires_grad for the phase and a fresh SGD optimizer over the trainable parameters."""
    flags = trainable_in_phase(model, config, phase)
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])
        if p.requires_grad:
            trainable.append(p)
    lr = config.lr_phase2 if phase == "II" else config.lr_phase3
    return torch.optim.SGD(trainable, lr=lr, momentum=config.momentum), lr


@dataclass(frozen=True)
class TrainResult:
    """Outcome of a run; ``summary`` is exactly what ``summary.json`` holds."""

    run_dir: Path
    summary: dict

    @property
    def test_accuracy(self) -> float:
        return self.summary["test_accuracy"]

    @property
    def epsilon(self) -> float:
        return self.summary["epsilon"]


def train(config: TrainConfig, *, out: str | Path, overwrite: bool = False, progress: bool | None = None,
          log=None, data: ImageData | None = None, search: dict | None = None) -> TrainResult:
    """Run Phases II + III from scratch into a new run directory ``out``.

    Everything that can be refused (data, prior, budget, delta) is checked before the directory
    is created, so a refused run writes nothing. ``search`` (from :func:`dprandp.tuning.runs.tune`)
    marks the run as one candidate of a private search: its model file, summary and report then
    state the search's epsilon, the guarantee it has if released.
    """
    device, ctx = _run_device(config)  # torchrun: nccl on GPUs, gloo on CPUs; rank 0 writes `out`,
    log = ctx.main_only(log or (lambda msg: None))  # the other ranks a private scratch directory
    out = rank_run_dir(out, ctx)
    t0 = time.time()
    config = config.with_absolute_paths()  # --resume from another directory must find the same files
    check_not_an_input(out, {"--data": config.data, "--prior": config.prior}, deletes_tree=True,
                       trees=("--data",) if config.dataset == "imagefolder" else ())
    check_run_dir(out, overwrite=overwrite)
    if data is None:
        data = load_dataset(config.dataset, config.data, val_fraction=config.val_fraction, val_seed=config.seed)
    model = build_model(config, data.num_classes).to(device)
    plan = make_plan(config, data.num_train)
    check_memory(config, data, device, log)
    # --overwrite takes the old run's lock before reading its budget and deleting it: a run that is
    # still training there is refused, not deleted under the process that writes its ledger.
    with run_dir_lock(out) if overwrite and Path(out).is_dir() else nullcontext():
        discarded = spent_budget(out) if overwrite else None
        if discarded is not None:
            eps = "unknown" if discarded["epsilon"] is None else f"{discarded['epsilon']:.4g}"
            log(f"warning: --overwrite deletes {out}, whose ledger holds {discarded['steps'] or 'an unknown number of'} "
                f"DP steps (epsilon {eps}) already spent on this data; this run's epsilon does not include them "
                "(recorded in config.json as discarded_run)")
        run_dir = prepare_run_dir(out, overwrite=overwrite)
    with run_dir_lock(run_dir):
        require(not any(run_dir.iterdir()), f"run directory {run_dir} was filled by another process meanwhile")
        return _start(config, run_dir, data, model, plan, discarded, ctx, t0=t0, progress=progress, log=log,
                      search=search)


def check_memory(config: TrainConfig, data: ImageData, device: torch.device, log) -> None:
    """Refuse a run whose physical chunk cannot fit in ``device``'s free memory (:mod:`dprandp.pipeline.memory`)."""
    _, h, w, c = data.x_train.shape
    check_chunk_fits(config, num_classes=data.num_classes, view_shape=(c, h, w), device=device,
                     world_size=_world_size(), log=log)


def training_fingerprint(data: ImageData) -> str:
    """SHA-256 of the training split the DP steps sample from (images and labels): a resume checks it,
    so that a run never continues on other data with the same number of images.

    An exact hash of the private data is a membership oracle (anyone could test a guessed dataset
    against it), so it lives only in ``checkpoint.pt``, which is private and deleted when the run
    completes; never in config.json, the summary or the model file."""
    import hashlib

    h = hashlib.sha256()
    for a in (data.x_train, data.y_train):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _start(config, run_dir, data, model, plan, discarded, ctx, *, t0, progress, log, search) -> TrainResult:
    cfg = config.to_dict()
    atomic_write_json(run_dir / "config.json", {
        "train": cfg, "derived": {"num_train": plan.num_train, "sample_rate": plan.sample_rate,
                                  "noise_multiplier": plan.noise_multiplier,
                                  "planned_epsilon": plan.planned_epsilon, "num_classes": data.num_classes,
                                  "phase3_steps": config.phase3_steps, "prior_sha256": prior_sha256(config.prior),
                                  "prior_provenance": prior_provenance(config.prior), "discarded_run": discarded},
        "code_version": code_version()})
    ledger = PrivacyLedger.create(run_dir, target_epsilon=config.target_epsilon, target_delta=config.target_delta,
                                  accountant=config.accountant, deterministic_noise=config.deterministic_noise)
    gens = distribute_generators(st.make_generators(config.seed, deterministic_noise=config.deterministic_noise), ctx)
    ema = EMA(model) if config.ema else None
    log(f"{data.describe()}; q = {plan.sample_rate:.5g}, sigma = {plan.noise_multiplier:.4f}, "
        f"{config.steps} steps (II: {config.phase2_steps}, III: {config.phase3_steps}), "
        f"planned epsilon = {plan.planned_epsilon:.4f} at delta = {config.target_delta:g}")
    fingerprint = training_fingerprint(data)
    st.save_checkpoint(run_dir, step=0, phase=config.phase_of(0), model=model, optimizer=None, ema=ema,
                       generators=gens, config=cfg, ledger_steps=0, deterministic_noise=config.deterministic_noise,
                       extra={"wall_time_s": 0.0, "train_sha256": fingerprint})
    return _loop(config, run_dir, data, model, ema, gens, ledger, plan, start=0, optimizer_state=None,
                 wall_before=0.0, t_start=t0, progress=progress, log=log, search=search, fingerprint=fingerprint)


def resume(run_dir: str | Path, *, progress: bool | None = None, log=None, data: ImageData | None = None,
           memory: dict | None = None) -> TrainResult:
    """Continue a killed run from its last checkpoint. Steps in the ledger beyond the checkpoint
    stay counted (their updates were lost, their privacy cost was not).

    ``memory`` changes settings of :data:`~dprandp.pipeline.config.MEMORY_ONLY` (e.g.
    ``{"physical_batch_size": 64}`` after running out of memory); config.json records the new values."""
    log = log or (lambda msg: None)
    memory = {k: v for k, v in (memory or {}).items() if v is not None}
    unknown = sorted(set(memory) - set(MEMORY_ONLY))
    require(not unknown, f"resume can change only {', '.join(MEMORY_ONLY)}, not {', '.join(unknown)}")
    t0 = time.time()
    run_dir = Path(run_dir)
    require(run_dir.is_dir(), f"run directory {run_dir} does not exist")
    require(not (run_dir / "summary.json").exists(), f"run {run_dir} is already complete (summary.json exists)")
    saved = read_json(run_dir / "config.json", "run config")
    try:
        config = TrainConfig.from_dict(saved["train"])
    except (KeyError, TypeError) as exc:
        raise InputError(f"run config {run_dir / 'config.json'} is not a dprandp training config ({exc})") from None
    changed = {k: v for k, v in memory.items() if getattr(config, k) != v}
    if changed:
        config = dataclasses.replace(config, **changed)  # __post_init__ checks the new values
    device, ctx = _run_device(config)  # torchrun: other ranks resume from a private copy of the run dir
    with run_dir_lock(run_dir) if ctx.is_main else nullcontext():  # rank 0 holds the real directory
        return _resume(run_dir, saved, config, device, ctx, progress=progress, log=ctx.main_only(log), data=data, t0=t0,
                       changed=changed)


def _resume(run_dir: Path, saved: dict, config: TrainConfig, device, ctx, *, progress, log, data, t0,
            changed: dict) -> TrainResult:
    if ctx.is_main:
        PrivacyLedger.open(run_dir)  # repairs a torn last record before the other ranks copy the ledger
    barrier()
    run_dir = rank_run_dir(run_dir, ctx, copy=True)
    ckpt = st.load_checkpoint(run_dir)
    # config.json is what the resume trains with: one edited since the checkpoint (other than the memory-only
    # settings a resume may change) would continue the run with settings its model and model.pt claim never had.
    then, now = ({k: v for k, v in c.items() if k not in MEMORY_ONLY} for c in (ckpt.get("config") or {}, saved["train"]))
    edited = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k)) if then else []
    require(not edited, f"config.json of {run_dir} differs from the settings its checkpoint was taken with ("
            + ", ".join(f"{k}: {now.get(k)!r} there, {then.get(k)!r} at the checkpoint" for k in edited[:3])
            + "): it was edited; restore it (only --physical-batch-size and --eval-batch-size may change on resume)")
    ledger = PrivacyLedger.open(run_dir)
    if data is None:
        data = load_dataset(config.dataset, config.data, val_fraction=config.val_fraction, val_seed=config.seed)
    derived = saved.get("derived", {})
    require(data.num_train == derived.get("num_train") and data.num_classes == derived.get("num_classes"),
            f"the dataset changed since {run_dir} started (N = {data.num_train}, was {derived.get('num_train')}); "
            "cannot resume")
    fingerprint, then = training_fingerprint(data), ckpt.get("train_sha256")  # absent in older checkpoints
    require(then is None or then == fingerprint,
            f"the training images of {run_dir} changed since it started ({config.data or config.dataset} now holds "
            "other images or labels, with the same count); cannot resume")
    check_memory(config, data, device, log)
    if changed and ctx.is_main:  # the next resume (or an automatic continuation) starts from the new values
        before = {k: saved["train"].get(k) for k in changed}
        atomic_write_json(run_dir / "config.json", {**saved, "train": config.to_dict()})
        log("resuming with " + ", ".join(f"{k} = {v} (was {before[k]})" for k, v in changed.items())
            + ": memory only, the same mechanism and guarantee")
    # The run's sigma and q are those it started with (and that its ledger records), not a new calibration.
    plan = Plan(num_train=data.num_train, sample_rate=config.batch_size / data.num_train,
                noise_multiplier=float(derived["noise_multiplier"]), planned_epsilon=float(derived["planned_epsilon"]))
    model = create_model(config.model, head_pool=config.head_pool, num_classes=data.num_classes)
    model.load_state_dict(ckpt["model"])
    model.to(device)
    ema = EMA(model) if config.ema else None
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    gens = st.make_generators(config.seed, deterministic_noise=config.deterministic_noise)
    for name, g_state in ckpt["generators"].items():
        gens[name].set_state(g_state)
    distribute_generators(gens, ctx)
    start = int(ckpt["step"])
    # A ledger shorter than the checkpoint (a partial copy, a restored backup) would under-count epsilon.
    require(ledger.steps >= max(start, int(ckpt.get("ledger_steps", 0))),
            f"the ledger of {run_dir} holds {ledger.steps} DP steps but the checkpoint was taken after "
            f"{max(start, int(ckpt.get('ledger_steps', 0)))}: the ledger was truncated; refusing to resume")
    lost = ledger.steps - start
    ledger.record_resume(from_step=start)
    MetricsLog(run_dir).truncate_after(start)
    log(f"resuming {run_dir} at step {start}/{config.steps}; ledger holds {ledger.steps} steps"
        + (f" ({lost} spent by the killed process but lost, still counted)" if lost > 0 else ""))
    opt_state = ckpt["optimizer"] if ckpt.get("phase") == config.phase_of(start) else None
    return _loop(config, run_dir, data, model, ema, gens, ledger, plan, start=start, optimizer_state=opt_state,
                 wall_before=float(ckpt.get("wall_time_s", 0.0)), t_start=t0, progress=progress, log=log,
                 fingerprint=fingerprint)


def _loop(config, run_dir, data, model, ema, gens, ledger, plan, *, start, optimizer_state, wall_before,
          t_start, progress, log, fingerprint: str, search: dict | None = None) -> TrainResult:
    from tqdm.auto import tqdm

    from dprandp.pipeline.finish import finish_run

    progress = sys.stderr.isatty() if progress is None else progress
    ctx = init_distributed()
    progress = progress and ctx.is_main
    broadcast_module(model)
    metrics = MetricsLog(run_dir)
    dp_config = DPConfig.for_dataset(num_samples=plan.num_train, batch_size=config.batch_size,
                                     noise_multiplier=plan.noise_multiplier, max_grad_norm=config.max_grad_norm,
                                     augmult=config.augmult, physical_batch_size=config.physical_batch_size)
    sampler = shard_sampler(num_samples=plan.num_train, sample_rate=plan.sample_rate, ctx=ctx, generator=gens["sampling"])
    device = next(model.parameters()).device
    x_train = torch.from_numpy(data.x_train).to(device)
    y_train = torch.from_numpy(data.y_train).to(device)
    meter = _AccuracyMeter()
    eval_model = create_model(config.model, head_pool=config.head_pool, num_classes=data.num_classes).to(device)

    def make_views(idx):
        idx = idx.to(device)
        views = random_crop_flip(to_float(x_train[idx]), augmult=config.augmult, generator=gens["augment"],
                                 flip=config.flip)
        return views, y_train[idx]

    probe_config = dataclasses.replace(dp_config, augmult=1)
    cache = None  # pooled features for --phase2-features cached (Phase II only)

    def make_cached(idx):
        idx = idx.to(device)
        return cache[idx], y_train[idx]

    # A fixed public input on which divergence is checked after every update (post-processing of the
    # DP output: no private data decides whether the run stops).
    probe = torch.randn((2, 3, *data.x_train.shape[1:3]), generator=torch.Generator().manual_seed(0)).to(device)
    ledger.set_plan(plan.phases(config))
    phase, optimizer, engine, lr, views_of = None, None, None, None, make_views
    stopped = None
    bar = tqdm(total=config.steps, initial=start, desc="DP-SGD", unit="step", disable=not progress,
               dynamic_ncols=True, leave=False)
    t = start
    for t in range(start, config.steps):
        if config.phase_of(t) != phase:
            phase = config.phase_of(t)
            optimizer, lr = _set_phase(model, config, phase)
            if optimizer_state is not None:
                optimizer.load_state_dict(optimizer_state)
                optimizer_state = None
            if phase == "II" and config.phase2_features == "cached":
                cache = pooled_features(model, x_train, batch_size=config.eval_batch_size)
                # vmap: the probe uses the norm's gamma and beta directly (no GroupNorm call to hook).
                engine = DPSGD(ProbeModel(model), optimizer, config=probe_config, noise_generator=gens["noise"],
                               loss_fn=meter, all_reduce=ctx.all_reduce, method="vmap")
                views_of = make_cached
            else:
                cache, views_of = None, make_views
                engine = DPSGD(model, optimizer, config=dp_config, noise_generator=gens["noise"], loss_fn=meter,
                               all_reduce=ctx.all_reduce, precision=config.precision)
        if not ledger.allows_next(sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier):
            eps_next = ledger.epsilon_after_next(sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier)
            stopped = (f"stopped after {t} of {config.steps} steps: one more step would spend epsilon = "
                       f"{eps_next:.4f} > target {config.target_epsilon:g} (the ledger counts "
                       f"{ledger.steps} steps, including steps lost in a crash)")
            log(stopped)
            break
        step_no = t + 1

        def before_update(phase=phase, step_no=step_no):
            ledger.record_step(phase=phase, step=step_no, sample_rate=plan.sample_rate,
                               noise_multiplier=plan.noise_multiplier, max_grad_norm=config.max_grad_norm)

        stats = engine.step_from_indices(sampler.sample(), views_of, before_update=before_update)
        if ema is not None:
            ema.update(model)
        loss = stats.loss
        # Divergence is read off the DP output (the updated model on a fixed public input), never off
        # the private batch's loss: stopping is then post-processing and costs no privacy.
        require(model_is_finite(model, probe), f"training diverged at step {step_no}: the model's parameters or "
                "outputs are no longer finite; lower the learning rate")
        rec = {"kind": "step", "step": step_no, "phase": phase, "loss": loss, "train_accuracy": meter.take(),
               "lr": lr, "epsilon": ledger.epsilon_upper_bound(), "batch_size": stats.batch_size,
               "grad_norm": stats.grad_norm, "clipped_fraction": stats.clipped_fraction,
               "dropped": stats.dropped, "seconds": stats.seconds}
        metrics.append(_clean(rec))
        bar.update(1)
        bar.set_postfix(phase=phase, loss=f"{loss:.3f}", eps=f"{rec['epsilon']:.3f}")
        if config.eval_every and step_no % config.eval_every == 0 and step_no < config.steps:
            metrics.append(_clean(_evaluate(model, ema, eval_model, data, config, step_no)))
        if step_no % config.checkpoint_every == 0 and step_no < config.steps:
            st.save_checkpoint(run_dir, step=step_no, phase=phase, model=model, optimizer=optimizer, ema=ema,
                               generators=gens, config=config.to_dict(), ledger_steps=ledger.steps,
                               deterministic_noise=config.deterministic_noise,
                               extra={"wall_time_s": wall_before + time.time() - t_start, "train_sha256": fingerprint})
    else:
        t = config.steps
    bar.close()
    steps_applied = t
    final = _evaluate(model, ema, eval_model, data, config, steps_applied, final=True)
    metrics.append(_clean(final))
    return finish_run(run_dir, config=config, data=data, plan=plan, ledger=ledger, reported=eval_model,
                      final=final, steps_applied=steps_applied, stopped=stopped,
                      wall_time_s=wall_before + time.time() - t_start, log=log, search=search)


def _evaluate(model, ema, eval_model, data: ImageData, config: TrainConfig, step: int, *, final: bool = False) -> dict:
    """Test (and validation) accuracy of the reported model: the EMA, or the model itself. The
    ``final`` evaluation also scores balanced accuracy and ROC-AUC (dprandp.pipeline.metrics),
    each plain and with flip test-time augmentation (``*_flip``; not with ``--no-flip``)."""
    from dprandp.pipeline.metrics import classification_metrics

    if ema is not None:
        ema.copy_to(eval_model)
    else:
        eval_model.load_state_dict(model.state_dict())
    bs = config.eval_batch_size
    rec = {"kind": "eval", "step": step}
    splits = [("test", data.x_test, data.y_test)] + ([("val", data.x_val, data.y_val)] if data.x_val is not None else [])
    for name, x, y in splits:
        if not final:
            rec[f"{name}_accuracy"], _ = _accuracy_pair(eval_model, x, y, bs, with_flip=False)
            continue
        plain, flip = image_logits(eval_model, x, bs, with_flip=config.flip)  # no mirror TTA without mirrored views
        for suffix, logits in (("", plain), ("_flip", flip)):
            if logits is None:
                continue
            for metric, value in classification_metrics(logits, y, data.num_classes).items():
                rec[f"{name}_{metric}{suffix}"] = value
    return rec


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def model_is_finite(model: torch.nn.Module, probe: torch.Tensor) -> bool:
    """Whether every parameter and the logits on ``probe`` (public inputs) are finite (one device sync)."""
    with torch.no_grad():
        flags = [torch.isfinite(p).all() for p in model.parameters()] + [torch.isfinite(model(probe)).all()]
    return bool(torch.stack(flags).all())


def _clean(rec: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}


def load_summary(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())
