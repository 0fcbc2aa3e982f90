"""Phase II on cached trunk outputs: linear probing without running the frozen trunk each step.

In Phase II only the final norm and the head train; the trunk is frozen, so its output on an
un-augmented image never changes. :func:`trunk_outputs` computes it once for the whole training
set, and :class:`ProbeModel` (the classifier's own final norm and head, parameters shared) maps a
cached output to logits. DP-SGD then runs on ``ProbeModel`` exactly as on the full model: the same
Poisson sampling, per-sample clipping, one noise draw per step and the same accounting; only the
inputs differ (one un-augmented view per sample instead of K random crops).
"""

from __future__ import annotations

import torch
from torch import nn

from dprandp.data import to_float


class ProbeModel(nn.Module):
    """``head(final_norm(t))`` of a :class:`~dprandp.models.WideResNet`, on trunk outputs ``t``.

    Holds the classifier's modules themselves, so training it trains the classifier, and its
    parameter names are the classifier's (``final_norm.*``, ``head.*``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.final_norm = model.final_norm
        self.head = model.head

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(t))


@torch.no_grad()
def trunk_outputs(model: nn.Module, images: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """The trunk's output (N, C, H/4, W/4) on uint8 NHWC ``images`` (no augmentation), on their device."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    parts = [model.trunk(to_float(images[i:i + batch_size]).to(dtype)) for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(parts)
