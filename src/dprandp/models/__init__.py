"""Model registry: ``create_model(name, ...)`` and ``list_models()``.

A registered model is a factory ``f(*, num_classes, **overrides) -> nn.Module``. Names are unique;
registering a name twice is refused. Every registered model is exercised by one parametrised test
(forward, backward, finite values).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dprandp.errors import InputError
from dprandp.models.wrn import ProjectionHead, WideResNet, WRNConfig

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_model(name: str, description: str = ""):
    """Decorator registering a model factory under ``name`` (duplicates refused)."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        _DESCRIPTIONS[name] = description
        return factory

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def describe_model(name: str) -> str:
    return _DESCRIPTIONS[name]


def create_model(name: str, *, num_classes: int = 10, seed: int | None = None, **overrides) -> nn.Module:
    """Build a registered model. ``seed`` makes the initialisation reproducible without touching
    the caller's global random state."""
    if name not in _REGISTRY:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if seed is None:
        return _REGISTRY[name](num_classes=num_classes, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _REGISTRY[name](num_classes=num_classes, **overrides)


def wrn_config_for(name: str, *, num_classes: int = 10) -> WRNConfig:
    """The :class:`WRNConfig` behind a registered ``wrn-D-K`` name."""
    model = create_model(name, num_classes=num_classes, seed=0)
    return model.config


def _wrn(depth: int, width: int, groups: int = 16):
    def factory(*, num_classes: int = 10, **overrides) -> WideResNet:
        cfg = dict(depth=depth, width=width, groups=groups, num_classes=num_classes)
        cfg.update(overrides)
        return WideResNet(WRNConfig(**cfg))

    return factory


register_model("wrn-16-4", "GroupNorm WRN-16-4 (2.7 M trunk parameters): the paper's model")(_wrn(16, 4))
register_model("wrn-16-2", "GroupNorm WRN-16-2 (0.7 M): a mid-sized model for small GPUs")(_wrn(16, 2))
register_model("wrn-16-1", "GroupNorm WRN-16-1 (0.18 M), 8 groups: sized for 2-core CPUs")(_wrn(16, 1, groups=8))
register_model("wrn-10-1", "GroupNorm WRN-10-1 (0.08 M), 8 groups: tiny, for tests and demos")(_wrn(10, 1, groups=8))

__all__ = [
    "ProjectionHead",
    "WRNConfig",
    "WideResNet",
    "create_model",
    "describe_model",
    "list_models",
    "register_model",
    "wrn_config_for",
]
