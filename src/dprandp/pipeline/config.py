"""Configuration of Phases II + III (:class:`TrainConfig`) and its presets.

One frozen, keyword-only object holds every hyperparameter of a private training run; the CLI
only fills it from flags (a preset first, then each flag given), and ``config.json`` in the run
directory is exactly ``config.to_dict()``, so a run can be repeated or resumed from it.

Presets
-------
``paper``  SPEC.md's CIFAR-10, epsilon = 1 setting: WRN-16-4, expected batch B = 4096, K = 16
           views, 875 steps of which 96 in Phase II, SGD lr 15 (II) / 0.4 (III), no momentum,
           C = 1, EMA of the weights. Phases II + III about 1.5 hours on one H200 (BENCHMARKS.md, gpu_s19); its
           physical batch of 256 samples (4096 views) peaked at 32 GiB there: lower
           --physical-batch-size on smaller GPUs, raise it to 512 (62 GiB, 27 % faster) on larger.
``cpu``    the recipe sized for a 2-core machine and tuned on a validation split: WRN-16-1 with
           a 4 x 4-pooled head, B = 1000, K = 2, 300 steps (60 in Phase II on cached features),
           SGD lr 8 (II) / 2 (III), and lr_III = 4 when the target epsilon is 4 or more.
           Every value can be overridden by a flag (an explicit --lr-phase3 wins at any epsilon).
``demo``   tiny: WRN-10-1 on ``digits``, 1.5 minutes alone on 2 cores; what ``dprandp run`` uses by default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from dprandp.errors import InputError, require

#: SPEC.md: 96 of 875 steps in Phase II.
PAPER_PHASE2_SHARE = 96 / 875


#: Largest ``head_pool``: every model sees 32 x 32 images (data.base.RESOLUTION), so its final
#: features form an 8 x 8 grid; a finer pool would only repeat them (and blow up the head).
MAX_HEAD_POOL = 8

#: ``precision`` values: the DP steps' forward/backward arithmetic (clipping is float32 either way).
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines one DP training run (Phases II + III).

    ``steps`` DP-SGD steps in total: the first ``phase2_steps`` train only the parameters the
    prior lacks (final norm + head, trunk frozen), the rest train every parameter. One noise
    multiplier serves all steps: calibrated for ``target_epsilon`` over all of them unless
    ``noise_multiplier`` is given (then the run refuses to start if that noise would overshoot).
    ``prior=None`` trains from scratch: no Phase II, all steps train every parameter.
    """

    # data
    dataset: str = "digits"
    data: str | None = None
    val_fraction: float = 0.0
    # model and prior
    model: str = "wrn-16-4"
    head_pool: int = 1  # the linear head reads the final features average-pooled to this grid (1 = global)
    prior: str | None = None
    # privacy
    target_epsilon: float = 1.0
    target_delta: float = 1e-5
    noise_multiplier: float | None = None
    accountant: str = "pld"
    max_grad_norm: float = 1.0
    # DP-SGD schedule
    batch_size: int = 4096
    augmult: int = 16
    steps: int = 875
    phase2_steps: int = 96
    lr_phase2: float = 15.0
    lr_phase3: float = 0.4
    # Phase III keeps the trunk's first k stages frozen (0 = the paper: fine-tune everything). A
    # frozen stage costs no backward pass and adds no noise dimensions.
    freeze_stages: int = 0
    momentum: float = 0.0
    ema: bool = True
    # Training views are mirrored left-right with probability 1/2. False for images whose mirror
    # image is another class or another anatomy (digits and text; X-rays with laterality).
    flip: bool = True
    # Phase II inputs: "augmented" (K random crops per sample through the frozen trunk, as the
    # paper) or "cached" (the frozen trunk's pooled normalised features of each un-augmented image,
    # computed once; Phase II then costs a few small matrix products per step). Same mechanism and
    # accounting either way (dprandp.pipeline.probe).
    phase2_features: str = "augmented"
    # Arithmetic of the DP steps' forward and backward passes: "fp32", or "bf16" autocast (fast on
    # CUDA and on CPUs with native bf16). Per-sample gradients, norms, clipping, sums and noise stay
    # float32 and are computed from the same values, so the guarantee is the same either way.
    precision: str = "fp32"
    # engineering
    device: str = "auto"  # "auto" (CUDA when available, single process), "cpu", "cuda" or "cuda:N"
    physical_batch_size: int = 128
    seed: int = 0
    deterministic_noise: bool = False
    checkpoint_every: int = 25
    eval_every: int = 0
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        def pos_int(name, minimum=1):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
                    f"{name.replace('_', '-')} must be an integer >= {minimum}, got {v!r}")

        def pos_real(name, allow_zero=False):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            require(ok and (v >= 0 if allow_zero else v > 0),
                    f"{name.replace('_', '-')} must be a finite number {'>=' if allow_zero else '>'} 0, got {v!r}")

        for name in ("batch_size", "augmult", "steps", "physical_batch_size", "eval_batch_size", "checkpoint_every"):
            pos_int(name)
        pos_int("phase2_steps", 0)
        pos_int("head_pool")
        require(self.head_pool <= MAX_HEAD_POOL, f"head-pool must be at most {MAX_HEAD_POOL} (the final features of a "
                                                 f"32 x 32 image are {MAX_HEAD_POOL} x {MAX_HEAD_POOL}), got {self.head_pool}")
        pos_int("freeze_stages", 0)
        pos_int("eval_every", 0)
        for name in ("target_epsilon", "max_grad_norm", "lr_phase2", "lr_phase3"):
            pos_real(name)
        for name in ("max_grad_norm", "lr_phase2", "lr_phase3"):  # float32 parameters: beyond this, inf
            require(getattr(self, name) <= 1e30, f"{name.replace('_', '-')} must be at most 1e30, got {getattr(self, name)!r}")
        pos_int("seed", 0)
        require(self.seed < 2**63, f"seed must be below 2**63, got {self.seed}")
        pos_real("momentum", allow_zero=True)
        require(self.momentum < 1, f"momentum must be < 1, got {self.momentum}")
        require(0 < self.target_delta < 1, f"delta must be in (0, 1), got {self.target_delta}")
        require(0 <= self.val_fraction < 1, f"val-fraction must be in [0, 1), got {self.val_fraction}")
        require(self.phase2_steps <= self.steps,
                f"phase2-steps ({self.phase2_steps}) exceeds the total steps ({self.steps})")
        require(self.prior is not None or self.phase2_steps == 0,
                "without a prior there is no Phase II (linear probing of random features); "
                "set phase2_steps=0 or give a prior")
        if self.noise_multiplier is not None:
            pos_real("noise_multiplier")
        require(self.accountant in ("pld", "rdp"), f"unknown accountant {self.accountant!r}")
        require(self.precision in PRECISIONS, f"precision must be {' or '.join(PRECISIONS)}, got {self.precision!r}")
        require(self.phase2_features in ("augmented", "cached"),
                f"phase2-features must be augmented or cached, got {self.phase2_features!r}")
        require(is_device_name(self.device), f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def phase3_steps(self) -> int:
        return self.steps - self.phase2_steps

    def phase_of(self, step: int) -> str:
        """'II' or 'III' for 0-based global step ``step``."""
        return "II" if step < self.phase2_steps else "III"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        require(not unknown, f"unknown training config key(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return replace(self, **changes)

    def with_absolute_paths(self) -> "TrainConfig":
        """The data and prior paths made absolute, where they name existing files: a run records
        these, so that a resume from another directory reads the same files (or refuses)."""
        from pathlib import Path

        changes = {k: str(Path(v).expanduser().resolve()) for k in ("data", "prior")
                   if isinstance(v := getattr(self, k), str) and v and Path(v).expanduser().exists()}
        return self.replace(**changes) if changes else self


#: Settings that change only memory and speed, never the mechanism or its guarantee: how many samples'
#: per-sample gradients are held at once (the sum over chunks is the same sum) and the batch of
#: evaluation and feature passes. ``--resume`` (and an automatic continuation) may change them, so a
#: run that ran out of memory continues with a smaller chunk instead of being lost. The random crops
#: are drawn chunk by chunk, so another chunk size draws other (equally distributed) crops: the same
#: training in distribution, not bit for bit.
MEMORY_ONLY = ("physical_batch_size", "eval_batch_size")


def is_device_name(name: str) -> bool:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N a GPU index): what ``--device`` accepts."""
    return name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())


PRESETS: dict[str, dict] = {
    "paper": dict(dataset="cifar10", model="wrn-16-4", batch_size=4096, augmult=16, steps=875, phase2_steps=96,
                  lr_phase2=15.0, lr_phase3=0.4, momentum=0.0, max_grad_norm=1.0, ema=True,
                  target_epsilon=1.0, target_delta=1e-5, physical_batch_size=256,
                  checkpoint_every=25, eval_every=125),
    # The paper's recipe sized for 2 CPU cores on CIFAR-10 and tuned on a validation split (10 % of
    # train; BENCHMARKS.md, utility_tuning): WRN-16-1 whose head reads a 4 x 4 grid of pooled
    # features (+10 points for the DP linear probe and +7 for DP-RandP on validation against the
    # global pool at epsilon = 1), B = 1000, K = 2, 300 steps of which 20 % in Phase II on cached features; SGD
    # without momentum, lr 8 (II) / 2 (III). lr_III on validation with the 24-epoch prior: 55.4 % at 4,
    # 57.7 % at 2, 56.5 % at 1 (8 was worse still). 300 steps, not 100: the budget is bound by compute
    # (T = 100 -> 300 gave +6 points at the same epsilon). K = 2 augmented views per sample in Phase III
    # (augmult): 61.8 against 60.9 % on validation with K = 1; it makes Phase III about 2x slower, so
    # the whole run (Phase I included) took about 60 min alone on 2 cores instead of 44 with the 15k-image
    # Phase I, 69 min with the 24k images of sessions 15-16, and 92 min with today's 36k images
    # (BENCHMARKS.md, run_cpu_cifar10_laptop_n24k and _n36k).
    # lr_III = 4 from epsilon = 4 up: less noise per step makes a larger step pay off; on validation
    # (K = 2) 66.4 against 64.7 % with lr 2 at epsilon = 4, 67.4 against 65.0 % at epsilon = 8.
    "cpu": dict(dataset="cifar10", model="wrn-16-1", head_pool=4, batch_size=1000, augmult=2, steps=300,
                phase2_steps=60, lr_phase2=8.0, lr_phase3=2.0, lr_phase3_by_epsilon=((4.0, 4.0),),
                momentum=0.0, max_grad_norm=1.0, ema=True,
                phase2_features="cached", physical_batch_size=250, checkpoint_every=20, eval_every=50,
                eval_batch_size=500),
    # Tiny: digits (1,348 train images), a few minutes on 2 cores (what `dprandp run` uses). The
    # 4 x 4-pooled head, as in `cpu`: +25 points on the digits validation split; and, as for any
    # digits run (NOT_MIRRORED), no mirrored views: +7 to +12 more (BENCHMARKS.md, demo_preset).
    "demo": dict(dataset="digits", model="wrn-10-1", head_pool=4, batch_size=256, augmult=1, steps=60,
                 phase2_steps=30, lr_phase2=2.0, lr_phase3=2.0, momentum=0.0, max_grad_norm=1.0,
                 ema=True, target_epsilon=4.0, physical_batch_size=128, checkpoint_every=20,
                 eval_every=10),
}


#: Datasets whose mirror images are other classes (a mirrored 2, 3, 7 or 9 is no digit): their training
#: views are not mirrored unless ``flip=True`` (``--flip``) says so. Any other dataset mirrors half its
#: views unless ``flip=False`` (``--no-flip``: text, X-rays with laterality).
NOT_MIRRORED = ("digits",)


def preset(name: str, **overrides) -> TrainConfig:
    """A preset with ``overrides`` (``None`` values are ignored, so CLI flags pass straight in).

    ``phase2_share`` (fraction of ``steps`` spent in Phase II) is accepted as an override and
    turned into ``phase2_steps``; a new ``steps`` alone keeps the preset's share (paper 96/875,
    cpu 60/300); without a prior, Phase II is dropped (all steps train every
    parameter, as DP-SGD from scratch does). A dataset in :data:`NOT_MIRRORED` gets ``flip=False``
    unless ``flip`` is given.
    """
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    lr_by_epsilon = values.pop("lr_phase3_by_epsilon", ())
    given = {k: v for k, v in overrides.items() if v is not None}
    share = given.pop("phase2_share", None)
    phase3 = given.pop("phase3_steps", None)
    values.update(given)
    if "flip" not in given and values.get("dataset") in NOT_MIRRORED:
        values["flip"] = False
    steps = values.get("steps", TrainConfig.steps)
    if share is not None:
        require("phase2_steps" not in given, "give --phase2-steps or --phase2-share, not both")
        require(0 <= share <= 1, f"phase2-share must be in [0, 1], got {share}")
        values["phase2_steps"] = int(round(share * steps))
    elif "steps" in given and "phase2_steps" not in given:  # a new step count keeps the preset's split
        base = PRESETS[name]
        values["phase2_steps"] = int(round(base["phase2_steps"] / base["steps"] * steps))
    if phase3 is not None:
        require(isinstance(phase3, int) and phase3 >= 0, f"phase3-steps must be an integer >= 0, got {phase3}")
    if values.get("prior") is None:
        # From scratch: every step trains every parameter ("Phase III" style), no linear probing.
        require(not given.get("phase2_steps") and not share,
                "without a prior there is no Phase II (linear probing): drop --phase2-steps / --phase2-share "
                "or give --prior")
        if phase3 is not None:
            require("steps" not in given or given["steps"] == phase3,
                    "--steps and --phase3-steps disagree (without a prior every step is a Phase III step)")
            values["steps"] = phase3
        values["phase2_steps"] = 0
    elif phase3 is not None:
        require(share is None, "give --phase2-share or --phase3-steps, not both (--steps with --phase3-steps "
                               "fixes the split)")
        if "steps" in given and "phase2_steps" in given:
            require(given["steps"] == given["phase2_steps"] + phase3,
                    "--steps, --phase2-steps and --phase3-steps disagree")
        elif "steps" in given:  # the Phase II steps are what is left of the total
            require(given["steps"] >= phase3, f"--phase3-steps {phase3} exceeds --steps {given['steps']}")
            values["phase2_steps"] = given["steps"] - phase3
        values["steps"] = values["phase2_steps"] + phase3
    require(values.get("steps", 1) >= 1, "a run needs at least one DP step (--steps / --phase3-steps)")
    if "lr_phase3" not in given:
        values["lr_phase3"] = lr_phase3_for(values.get("target_epsilon", TrainConfig.target_epsilon),
                                            values.get("lr_phase3", TrainConfig.lr_phase3), lr_by_epsilon)
    return TrainConfig(**values)


def lr_phase3_for(target_epsilon: float, base: float, by_epsilon) -> float:
    """The Phase III lr a preset uses at ``target_epsilon``: ``base``, or the lr of the largest
    threshold in ``by_epsilon`` ((epsilon_min, lr) pairs) that ``target_epsilon`` reaches. A larger
    budget means less noise per step, so a larger step pays off (chosen on validation)."""
    lr = base
    for epsilon_min, value in sorted(by_epsilon):
        if target_epsilon >= epsilon_min:
            lr = value
    return lr
