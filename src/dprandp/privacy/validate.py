"""Refuse models whose layers mix samples: their "per-sample" gradients would not be per sample.

BatchNorm (and InstanceNorm with running statistics) computes statistics across the batch, so one
sample's output, and hence its gradient, depends on the others; clipping no longer bounds a single
sample's influence. Trainable parameters must be float32 or float64: with bf16 or fp16 parameters
the per-sample norms round at 2^-8, so a clipped contribution could exceed C by more than the clip
factor's margin (measured: 0.65 %). The check runs before any computation.
"""

from __future__ import annotations

import torch
from torch import nn

from dprandp.errors import InputError

_CROSS_SAMPLE = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def cross_sample_layers(model: nn.Module) -> list[str]:
    """Names (with types) of the modules in ``model`` that mix samples of a batch."""
    found = []
    for name, module in model.named_modules():
        bad = isinstance(module, _CROSS_SAMPLE)
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            bad = True
        if bad:
            found.append(f"{name or '<model>'} ({type(module).__name__})")
    return found


def validate_model(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Check ``model`` is usable for DP-SGD; return its trainable ``(name, parameter)`` pairs."""
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    bad = cross_sample_layers(model)
    if bad:
        raise InputError(
            "layers that mix samples break per-sample privacy (use GroupNorm instead): " + ", ".join(bad)
        )
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise InputError("the model has no trainable parameters (all have requires_grad=False)")
    low = [f"{n} ({str(p.dtype).removeprefix('torch.')})" for n, p in trainable
           if p.dtype not in (torch.float32, torch.float64)]
    if low:
        raise InputError("trainable parameters must be float32 or float64, not " + ", ".join(low[:3])
                         + ": for speed keep float32 parameters and use precision='bf16' (autocast)")
    return trainable
