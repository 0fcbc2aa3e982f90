"""DP-SGD engine: Poisson sampling, per-sample clipping with augmentation multiplicity, noise, EMA.

Modules, one concept each: ``config`` (DPConfig), ``sampling`` (PoissonSampler), ``validate``
(refusing cross-sample layers), ``layerwise`` / ``functional`` (per-sample gradient engines),
``clipping`` (clipped_grad_sum), ``trainer`` (DPSGD step), ``ema`` (weight averaging).
"""

from dprandp.privacy.clipping import ClippedSum, clip_and_sum, clip_factors, clipped_grad_sum, cross_entropy_per_sample
from dprandp.privacy.config import DPConfig
from dprandp.privacy.ema import EMA, default_decay
from dprandp.privacy.sampling import PoissonSampler
from dprandp.privacy.trainer import DPSGD, StepStats
from dprandp.privacy.validate import cross_sample_layers, validate_model

__all__ = [
    "DPSGD",
    "EMA",
    "ClippedSum",
    "DPConfig",
    "PoissonSampler",
    "StepStats",
    "clip_and_sum",
    "clip_factors",
    "clipped_grad_sum",
    "cross_entropy_per_sample",
    "cross_sample_layers",
    "default_decay",
    "validate_model",
]
