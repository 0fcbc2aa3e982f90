"""Exponential moving average of the weights: the reported model of a DP run.

Averaging the iterates is post-processing of the DP-SGD outputs, so it costs no privacy. The
decay warms up as min(0.9999, (1 + t) / (10 + t)), t = number of updates so far, so early (poor)
iterates are forgotten quickly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from dprandp.errors import require


def default_decay(t: int) -> float:
    """min(0.9999, (1 + t) / (10 + t)) (De et al. 2022; DP-RandP)."""
    return min(0.9999, (1.0 + t) / (10.0 + t))


class EMA:
    """Shadow copy of a model's state (parameters and floating buffers averaged, others copied)."""

    def __init__(self, model: nn.Module, *, decay_fn: Callable[[int], float] = default_decay) -> None:
        self.decay_fn = decay_fn
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold the model's current weights in; returns the decay used."""
        decay = float(self.decay_fn(self.updates))
        require(0.0 <= decay <= 1.0, f"EMA decay must be in [0, 1], got {decay}")
        state = model.state_dict()
        require(state.keys() == self.shadow.keys(), "EMA.update got a model with different state keys")
        for k, v in state.items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.mul_(decay).add_(v.detach().to(s.dtype), alpha=1.0 - decay)
            else:
                s.copy_(v)
        self.updates += 1
        return decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (overwrites its weights)."""
        model.load_state_dict(self.shadow)

    def averaged_model(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` carrying the averaged weights (``model`` itself is unchanged)."""
        clone = copy.deepcopy(model)
        self.copy_to(clone)
        return clone

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        require(state["shadow"].keys() == self.shadow.keys(), "EMA state has different keys than the model")
        self.updates = int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
