"""Phase II on cached features: linear probing without running the frozen trunk each step.

In Phase II only the final GroupNorm's affine parameters (gamma, beta) and the linear head train;
the trunk is frozen. The classifier computes

    logits = W mean_hw(gamma * n(x) + beta) + b = W (gamma * f + beta) + b,   f = mean_hw(n(x)),

where ``n(x)`` is the parameter-free group normalisation of ``relu(trunk(x))``: gamma and beta are
per channel, so they commute with the spatial mean. ``f`` (N x C, e.g. 256 numbers per image for
WRN-16-4) therefore holds everything Phase II needs. The same holds cell by cell for a head that
pools to a p x p grid (``head_pool = p``): then ``f`` is N x C p^2, and gamma and beta apply to
the p^2 cells of each channel. :func:`pooled_features` computes ``f`` once for the
training set (un-augmented images) and :class:`ProbeModel` applies the classifier's own gamma, beta
and head to it. DP-SGD then runs on ``ProbeModel`` exactly as on the full model: the same Poisson
sampling, per-sample clipping, one noise draw per step and the same accounting; only the inputs
differ (one un-augmented view per sample instead of K random crops).
"""

from __future__ import annotations

import torch
from torch import nn

from dprandp.data import to_float


class ProbeModel(nn.Module):
    """The classifier's final norm affine and head, on pooled normalised features (N, C).

    Holds the classifier's modules themselves, so training it trains the classifier, and its
    parameter names are the classifier's (``final_norm.norm.weight``, ``head.fc.weight``, ...).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.final_norm = model.final_norm
        self.head = model.head

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        norm = self.final_norm.norm
        cells = f.reshape(f.shape[0], norm.num_channels, -1)  # (N, C, pool^2), the head's flatten order
        return self.head.fc((cells * norm.weight[:, None] + norm.bias[:, None]).flatten(1))


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """``f`` of the module docstring (N, C pool^2) for uint8 NHWC ``images`` (no augmentation), on their device."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    parts = [model.head.pooled(model.final_norm.normalise(model.trunk(to_float(images[i:i + batch_size]).to(dtype))))
             for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(parts)
