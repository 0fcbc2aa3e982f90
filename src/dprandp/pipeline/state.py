"""Random generators and resumable checkpoints of a DP training run.

Four independent ``torch.Generator`` streams, each with one job, so that changing one (say, the
augmentation) never shifts another (the noise):

* ``init``: the model initialisation (from ``--seed``);
* ``augment``: random crops and flips of the K views (from ``--seed``);
* ``sampling``: Poisson sampling of each logical batch;
* ``noise``: the Gaussian DP noise.

The last two *are* the privacy mechanism. By default they are seeded from the operating
system's entropy (``secrets``): an attacker who knew the noise could subtract it, and one who
knew which samples formed each batch would void the amplification by subsampling the accountant
relies on. ``--deterministic-noise`` derives them from ``--seed`` instead, for research
reproducibility only; the ledger and the summary record which mode was used. For the same reason
a checkpoint stores the states of these two generators only in deterministic mode: a resumed
secure run draws fresh entropy, so a copy of a checkpoint never reveals future noise.
"""

from __future__ import annotations

import secrets
import zlib
from pathlib import Path

import numpy as np
import torch

from dprandp.errors import InputError
from dprandp.pipeline.rundir import atomic_torch_save

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "dprandp-train-checkpoint/1"
PRIVATE_STREAMS = ("sampling", "noise")
STREAMS = ("augment", "sampling", "noise")


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for ``stream`` derived from the run seed (independent across streams)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(stream.encode())])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def make_generators(seed: int, *, deterministic_noise: bool) -> dict[str, torch.Generator]:
    """The run's generators (see module docstring). Sampling and noise come from OS entropy
    unless ``deterministic_noise``."""
    gens = {}
    for stream in STREAMS:
        if stream in PRIVATE_STREAMS and not deterministic_noise:
            s = secrets.randbits(63)
        else:
            s = derive_seed(seed, stream)
        gens[stream] = torch.Generator().manual_seed(s)
    return gens


def save_checkpoint(run_dir: Path, *, step: int, phase: str, model, optimizer, ema, generators,
                    config: dict, ledger_steps: int, deterministic_noise: bool, extra: dict) -> None:
    """Atomically write ``checkpoint.pt`` (everything needed to continue after ``step`` steps)."""
    gen_states = {k: g.get_state() for k, g in generators.items()
                  if deterministic_noise or k not in PRIVATE_STREAMS}
    atomic_torch_save(run_dir / CHECKPOINT_NAME, {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "phase": phase,
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "generators": gen_states,
        "config": config,
        "ledger_steps": int(ledger_steps),
        **extra,
    })


def load_checkpoint(run_dir: Path) -> dict:
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise InputError(f"no checkpoint to resume from in {run_dir} ({CHECKPOINT_NAME} is missing)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"checkpoint {path} is unreadable ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a dprandp training checkpoint")
    return obj
