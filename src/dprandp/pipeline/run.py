"""All three phases in one call: a prior (pretrained, or taken from a cache), then Phases II + III.

``run_all(RunConfig(...), out=...)`` is what ``dprandp run`` calls. Phase I touches no private
data, so its prior is cached by its configuration (``$DPRANDP_CACHE`` or ``~/.cache/dprandp``)
and reused by later runs: the second ``dprandp run`` skips straight to the DP phases.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from dprandp.errors import check_not_an_input, require
from dprandp.pipeline.config import TrainConfig
from dprandp.pipeline.rundir import check_run_dir
from dprandp.pipeline.trainer import TrainResult, train

#: Phase I for the demo: WRN-10-1 on a few thousand StyleGAN-Oriented images, a minute or two on
#: 2 cores. Far from the paper's prior, but the same method end to end. 6,144 images x 4 epochs
#: instead of 1,536 x 2: +8 points on the digits validation split (BENCHMARKS.md, demo_preset).
DEMO_PRETRAIN = dict(model="wrn-10-1", hidden=256, head_groups=8, batch_size=128, epochs=4,
                     num_images=6144, image_size=32, process="stylegan-oriented", seed=0)


#: ``TrainConfig.prior`` of a run whose prior Phase I makes (``run_all`` fills in the path). Not
#: ``None``: a config built with ``prior=None`` is DP-SGD from scratch, without Phase II.
PHASE_I_PRIOR = "<phase I>"


def pretrain_config_for(train_preset: str, *, model: str, pretrain_preset: str | None = None,
                        epochs: int | None = None, num_images: int | None = None,
                        seed: int | None = None):
    """Phase I settings of ``dprandp run --preset TRAIN_PRESET``: the Phase I preset of the same name
    (``pretrain_preset`` overrides it), pretraining the architecture that Phases II + III will train."""
    from dprandp import pretrain as p1

    name = pretrain_preset or train_preset
    base = p1.PretrainConfig(**DEMO_PRETRAIN) if name == "demo" else p1.preset(name)
    changes = {"model": model, "epochs": epochs, "num_images": num_images, "seed": seed}
    return replace(base, **{k: v for k, v in changes.items() if v is not None})


def cache_dir() -> Path:
    return Path(os.environ.get("DPRANDP_CACHE", Path.home() / ".cache" / "dprandp"))


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Phases I-III. ``pretrain`` is ignored when ``train.prior`` is set (an existing prior)."""

    train: TrainConfig
    pretrain: object | None = None  # dprandp.pretrain.PretrainConfig
    cache: bool = True


def demo_config(**train_overrides) -> RunConfig:
    """The no-argument ``dprandp run``: tiny Phase I, then II + III on digits."""
    from dprandp.pipeline.config import preset
    from dprandp.pretrain import PretrainConfig

    return RunConfig(train=preset("demo", prior=PHASE_I_PRIOR, **train_overrides),
                     pretrain=PretrainConfig(**DEMO_PRETRAIN))


def prior_cache_path(pretrain_config) -> Path:
    key = hashlib.sha256(json.dumps(pretrain_config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "priors" / f"{pretrain_config.model}-{pretrain_config.process}-{key}.pt"


def ensure_prior(pretrain_config, *, cache: bool = True, progress: bool = False, log=None) -> Path:
    """A prior for ``pretrain_config``: from the cache if present, else Phase I (then cached)."""
    from dprandp.pretrain import pretrain, process_source
    from dprandp.pretrain.checkpoint import state_path

    log = log or (lambda msg: None)
    path = prior_cache_path(pretrain_config)
    c = pretrain_config
    # The prior file is rewritten after every epoch, so an interrupted Phase I leaves a partial one
    # beside its training state: resume that, never use it as if it were complete.
    resume = cache and path.exists() and state_path(path).exists()
    if cache and path.exists() and not resume:
        done = _epochs_done(path)
        if done is not None and done >= c.epochs:
            log(f"Phase I: using the cached prior {path}")
            return path
        log(f"Phase I: the cached prior {path} is incomplete ({done} of {c.epochs} epochs) and cannot be resumed; "
            "Phase I runs again")
    if resume:
        log(f"Phase I: resuming the interrupted cached prior {path}")
    else:
        log(f"Phase I: pretraining {c.model} on {c.num_images} {c.process} images ({c.image_size} px, "
            f"{c.epochs} epochs); no private data involved")
    source = process_source(c.process, c.num_images, size=c.image_size, seed=c.seed, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    pretrain(c, source, out=path, resume=resume, overwrite=not resume, progress=progress,
             log=lambda m: log(f"Phase I: {m}"))
    return path


def _epochs_done(path: Path) -> int | None:
    """The epochs a stored prior was trained for (None when the file is unreadable)."""
    from dprandp.pretrain.checkpoint import load_prior

    try:
        _, meta = load_prior(path)
        return int(meta["provenance"]["epochs_done"])
    except Exception:  # a damaged cache entry is trained again, not trusted
        return None


def run_all(config: RunConfig, *, out, overwrite: bool = False, progress: bool | None = None,
            log=None) -> TrainResult:
    """Phase I (or the given / cached prior), then Phases II + III into run directory ``out``."""
    tc = config.train
    require(not (tc.prior is None and config.pretrain is not None),
            "the train config has prior=None (DP-SGD from scratch, so no Phase II steps) but a Phase I config is "
            "given; build it with preset(..., prior=PHASE_I_PRIOR) to train on the Phase I prior")
    if tc.prior is None or tc.prior == PHASE_I_PRIOR:
        require(config.pretrain is not None or tc.prior is None, "no prior and no Phase I configuration")
        if config.pretrain is not None:
            require(config.pretrain.model == tc.model,
                    f"Phase I model {config.pretrain.model} differs from the classifier {tc.model}")
            # Check everything about the DP phases before spending minutes on Phase I.
            from dprandp.data import load_dataset
            from dprandp.pipeline.trainer import _world_size, check_memory, make_plan, resolve_device

            # a bad --device, like a bad --out, is refused before Phase I
            device = resolve_device(tc.device, world_size=_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))
            check_not_an_input(out, {"--data": tc.data}, deletes_tree=True,
                               trees=("--data",) if tc.dataset == "imagefolder" else ())
            check_run_dir(out, overwrite=overwrite)
            data = load_dataset(tc.dataset, tc.data, val_fraction=tc.val_fraction, val_seed=tc.seed)
            make_plan(tc, data.num_train)
            check_memory(tc, data, device, log)  # a chunk that cannot fit, before Phase I's minutes
            prior = ensure_prior(config.pretrain, cache=config.cache, progress=bool(progress), log=log)
            tc = replace(tc, prior=str(prior))
            return train(tc, out=out, overwrite=overwrite, progress=progress, log=log, data=data)
    return train(tc, out=out, overwrite=overwrite, progress=progress, log=log)
