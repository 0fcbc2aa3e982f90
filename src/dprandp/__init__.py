"""dprandp: differentially private image classification with priors from random processes.

The public API, imported lazily so that ``import dprandp`` (and the accounting CLI) stay cheap:

* accounting: :class:`DPPhase`, :func:`compute_epsilon`, :func:`calibrate_noise`, :func:`epsilon_curve`
* models: :func:`create_model`, :func:`list_models`
* DP-SGD engine: :class:`DPConfig`, :class:`DPSGD`, :class:`PoissonSampler`, :class:`EMA`,
  :func:`clipped_grad_sum`
* privacy audit: :class:`AuditConfig`, :func:`run_audit`
* Phase I: :class:`PretrainConfig`, :func:`pretrain`, :func:`load_prior`, :func:`apply_prior`
* Phases II + III: :class:`TrainConfig`, :func:`train_preset`, :func:`train`, :func:`resume`,
  :func:`evaluate`, :func:`predict`, :func:`read_images`, :func:`load_dataset`
* errors: :class:`InputError`
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "DPPhase": "dprandp.accounting",
    "Calibration": "dprandp.accounting",
    "compute_epsilon": "dprandp.accounting",
    "calibrate_noise": "dprandp.accounting",
    "epsilon_curve": "dprandp.accounting",
    "create_model": "dprandp.models",
    "list_models": "dprandp.models",
    "DPConfig": "dprandp.privacy",
    "DPSGD": "dprandp.privacy",
    "EMA": "dprandp.privacy",
    "PoissonSampler": "dprandp.privacy",
    "clipped_grad_sum": "dprandp.privacy",
    "AuditConfig": "dprandp.audit.canaries",
    "run_audit": "dprandp.audit.canaries",
    "PretrainConfig": "dprandp.pretrain",
    "pretrain": "dprandp.pretrain",
    "load_prior": "dprandp.pretrain",
    "apply_prior": "dprandp.pretrain",
    "InputError": "dprandp.errors",
    "TrainConfig": "dprandp.pipeline",
    "train": "dprandp.pipeline",
    "resume": "dprandp.pipeline",
    "evaluate": "dprandp.pipeline",
    "predict": "dprandp.pipeline",
    "read_images": "dprandp.pipeline",
    "load_dataset": "dprandp.data",
}

__all__ = ["__version__", "train_preset", *_LAZY]


def __getattr__(name: str):
    if name == "train_preset":  # dprandp.pipeline.preset (``preset`` alone would be ambiguous with Phase I's)
        return importlib.import_module("dprandp.pipeline").preset
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dprandp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
