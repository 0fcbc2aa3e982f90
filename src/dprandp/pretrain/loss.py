"""Phase I contrastive losses on L2-normalised embeddings.

Both losses take the embeddings of the two views of a batch, ``z1`` and ``z2`` of shape (B, d),
row ``i`` of each coming from the same image (a positive pair).

* :func:`align_uniform_loss` is what DP-RandP uses (Wang & Isola 2020, alpha = 2, t = 2, weight 1
  each): alignment pulls positive pairs together, uniformity spreads all embeddings over the sphere.
  Uniformity is computed within each view and averaged over the two views, as in the reference.
* :func:`info_nce_loss` is SimCLR's NT-Xent, offered as an alternative: each view must pick its
  partner among the other ``2B - 1`` embeddings.

Losses are computed in float32 even when the model runs under bf16 autocast: ``logsumexp`` over
``B^2`` pair terms loses too much in 8 mantissa bits.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def align_loss(z1: torch.Tensor, z2: torch.Tensor, *, alpha: float = 2.0) -> torch.Tensor:
    """mean_i ||z1_i - z2_i||^alpha."""
    return (z1 - z2).norm(dim=1).pow(alpha).mean()


def uniform_loss(z: torch.Tensor, *, t: float = 2.0) -> torch.Tensor:
    """log mean_{i<j} exp(-t ||z_i - z_j||^2), via logsumexp for stability."""
    n = z.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least two embeddings")
    sq = torch.pdist(z, p=2).pow(2)
    return torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())


def align_uniform_loss(
    z1: torch.Tensor, z2: torch.Tensor, *, alpha: float = 2.0, t: float = 2.0,
    align_weight: float = 1.0, uniform_weight: float = 1.0,
) -> torch.Tensor:
    """align + (unif(z1) + unif(z2)) / 2 with the paper's weights (1, 1)."""
    z1, z2 = z1.float(), z2.float()
    unif = (uniform_loss(z1, t=t) + uniform_loss(z2, t=t)) / 2
    return align_weight * align_loss(z1, z2, alpha=alpha) + uniform_weight * unif


def info_nce_loss(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR NT-Xent: cross-entropy of each of the 2B embeddings picking its partner view.

    Similarities are cosine (inputs are normalised here, so un-normalised inputs are fine too),
    divided by ``temperature``; an embedding is never compared with itself.
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    b = z1.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, target)


LOSSES = {"align-uniform": align_uniform_loss, "infonce": info_nce_loss}
