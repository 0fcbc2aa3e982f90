"""Augmentations of the DP phases, vectorised over the batch and the K views.

``random_crop_flip`` draws, for every sample and view, a crop offset in the reflect-padded image
and a horizontal flip, then reads all crops with one ``gather`` from index arithmetic: no Python
loop over images. Randomness comes only from the ``generator`` argument, so the augmentation
stream is reproducible and independent of the DP noise and the sampler.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from dprandp.errors import require


def random_crop_flip(
    x: torch.Tensor, *, augmult: int, generator: torch.Generator, padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """(B, C, H, W) float -> (B, K, C, H, W): K random crops of the reflect-padded image, each
    flipped left-right with probability 1/2 (``flip=False`` disables flipping)."""
    require(isinstance(x, torch.Tensor) and x.dim() == 4, f"expected images (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    require(x.is_floating_point(), f"expected floating-point images, got {x.dtype}")
    require(isinstance(augmult, int) and augmult >= 1, f"augmult must be an integer >= 1, got {augmult!r}")
    b, c, h, w = x.shape
    require(isinstance(padding, int) and 0 <= padding < min(h, w), f"padding must be in [0, {min(h, w)}), got {padding!r}")
    k = augmult
    gdev = generator.device
    offsets = torch.randint(0, 2 * padding + 1, (b, k, 2), generator=generator, device=gdev).to(x.device)
    flips = torch.randint(0, 2, (b, k), generator=generator, device=gdev).to(x.device).bool()
    if not flip:
        flips.zero_()
    padded = F.pad(x, (padding,) * 4, mode="reflect") if padding else x
    hp, wp = h + 2 * padding, w + 2 * padding
    rows = offsets[..., 0, None] + torch.arange(h, device=x.device)  # (B, K, H)
    cols_fwd = torch.arange(w, device=x.device)
    cols = offsets[..., 1, None] + torch.where(flips[..., None], cols_fwd.flip(0), cols_fwd)  # (B, K, W)
    flat_idx = (rows[..., :, None] * wp + cols[..., None, :]).reshape(b, k, 1, h * w).expand(b, k, c, h * w)
    src = padded.reshape(b, 1, c, hp * wp).expand(b, k, c, hp * wp)
    return src.gather(3, flat_idx).reshape(b, k, c, h, w)
