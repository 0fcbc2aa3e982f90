"""Refuse, before anything is written or pretrained, a run whose physical chunk cannot fit in memory.

See :mod:`dprandp.privacy.memory` for the bound. The chunk a rank holds is at most
``--physical-batch-size`` samples and, in most steps, at least the expected batch ``B / W`` (``W``
ranks): a Poisson batch reaches its mean in about half the steps. The bound is measured on a fresh
copy of the classifier with the trainable parameters of each phase that runs on images (Phase II on
cached features runs on a few numbers per image, not on views).
"""

from __future__ import annotations

import math
import os

import torch

from dprandp.errors import require
from dprandp.models import create_model
from dprandp.pipeline.config import TrainConfig
from dprandp.privacy.clipping import resolve_method
from dprandp.privacy.memory import PEAK_FACTOR, available_bytes, chunk_bytes_lower_bound, saved_bytes_per_view


def trainable_in_phase(model: torch.nn.Module, config: TrainConfig, phase: str) -> dict[str, bool]:
    """``requires_grad`` of each parameter in ``phase``: Phase II trains what the prior lacks (final
    norm and head), Phase III everything except the first ``--freeze-stages`` stages."""
    lacks = type(model).PRIOR_LACKS
    frozen = model.frozen_prefixes(config.freeze_stages)  # () when nothing is frozen
    return {name: name.startswith(lacks) if phase == "II" else not name.startswith(frozen)
            for name, _ in model.named_parameters()}


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n < 1e11 else f"{n / 1e9:,.0f} GB"


def check_chunk_fits(config: TrainConfig, *, num_classes: int, view_shape: tuple[int, int, int],
                     device: torch.device, world_size: int = 1, log=None) -> None:
    """Raise :class:`~dprandp.errors.InputError` when one physical chunk needs more memory than
    ``device`` has free; log a warning when it may not fit (the bound times the clipping route's
    measured peak factor, :data:`~dprandp.privacy.memory.PEAK_FACTOR`)."""
    available = available_bytes(device)
    phases = [phase for phase, steps, on_views in (
        ("II", config.phase2_steps, config.phase2_features != "cached"), ("III", config.phase3_steps, True))
        if steps > 0 and on_views]
    if available is None or not phases:
        return
    model = create_model(config.model, head_pool=config.head_pool, num_classes=num_classes, seed=0)
    factor = PEAK_FACTOR[resolve_method(model, "auto")]  # the route the Phase III engine takes
    per_view = 0
    for phase in phases:
        flags = trainable_in_phase(model, config, phase)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        per_view = max(per_view, saved_bytes_per_view(model, view_shape, precision=config.precision))
    chunk = min(config.physical_batch_size, math.ceil(config.batch_size / world_size))
    # Ranks that share this host's memory (torchrun's LOCAL_WORLD_SIZE); a GPU is one rank's own.
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    k = config.augmult
    per_sample = chunk_bytes_lower_bound(per_view, view_shape, physical_batch_size=1, augmult=k)
    need = chunk * per_sample * sharing
    where = "this machine" if device.type == "cpu" else str(device)
    fits = int(available // (factor * per_sample * sharing))
    lower = (f"lower --physical-batch-size to {fits} or less (memory only: the same privacy guarantee "
             "and the same training in distribution)" if fits >= 1 else
             f"even one sample's {k} views do not fit: lower --augmult")
    what = (f"a physical chunk of {chunk} samples x {k} views needs at least {_gb(need)}"
            + (f" on each of {sharing} ranks together" if sharing > 1 else "")
            + f" ({per_view / 1e6:.3g} MB kept per view for the backward pass)")
    require(need <= available, f"{what}, but {where} has {_gb(available)} free: {lower}")
    if need * factor > available and log is not None:
        log(f"warning: {what} and up to {factor:g}x that; {where} has {_gb(available)} "
            f"free, so it may run out of memory: {lower}")
