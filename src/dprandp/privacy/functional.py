"""Per-sample gradients for any module with ``torch.func``: ``vmap`` over samples of ``grad``.

The generic fallback for layers without a layer-wise rule. A sample's K views are one inner
batch of the per-sample function, whose loss is their mean: the gradient that comes out is
already averaged over the views, before clipping. Frozen parameters are passed as constants, so
no gradient is computed for them (and if nothing upstream is trainable, nothing is recorded).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def per_sample_grads(
    model: nn.Module,
    views: torch.Tensor,
    targets: torch.Tensor,
    *,
    augmult: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """Same contract as :func:`dprandp.privacy.layerwise.per_sample_grads` (nothing deferred)."""
    n = views.shape[0]
    b = n // augmult
    trainable = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    constants = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    constants.update(dict(model.named_buffers()))

    def sample_loss(params, x, y):
        out = functional_call(model, (params, constants), (x,))
        loss = loss_fn(out, y.unsqueeze(0).expand(x.shape[0], *y.shape)).mean()
        return loss, loss.detach()

    x = views.reshape(b, augmult, *views.shape[1:])
    per_grad = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")
    with torch.enable_grad():
        grads, losses = per_grad(trainable, x, targets)
    return dict(grads), losses, {}
