"""Per-sample clipping with augmentation multiplicity: the core primitive of DP-SGD.

``clipped_grad_sum`` returns sum_i clip_C(g_i), where g_i is the gradient of sample i's loss
averaged over its K views, and clip_C(g) = g * min(1, C / (||g|| + 1e-6)). The 1e-6 leaves
gradients with norm below C untouched; a clipped gradient's norm is C up to the rounding of its
norm (about 1e-7 relative in float32, where the ghost-norm route computes the norm and the sum by
different contractions). A gradient that is not finite (a sample on which the model overflowed)
is clipped to zero, so one sample can never make the sum non-finite. Everything is checked
before any computation, so a bad call costs nothing.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dprandp.errors import InputError, require
from dprandp.privacy import functional, layerwise
from dprandp.privacy.validate import validate_model

METHODS = ("auto", "layerwise", "vmap")
_EPS = 1e-6


def cross_entropy_per_sample(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Default loss: cross-entropy per example (no reduction)."""
    return F.cross_entropy(logits, targets, reduction="none")


@dataclass
class ClippedSum:
    """Result of one chunk: the clipped sum and what the trainer reports about it."""

    grad_sum: dict[str, torch.Tensor]
    per_sample_norms: torch.Tensor  # before clipping, (B,); not finite for a sample that contributed zero
    per_sample_losses: torch.Tensor  # mean over views, (B,)
    method: str


def resolve_method(model: nn.Module, method: str) -> str:
    """``auto`` -> ``layerwise`` when every trainable layer has a rule, else ``vmap``."""
    require(method in METHODS, f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "vmap":
        return method
    missing = layerwise.unsupported_modules(model)
    if method == "layerwise" and missing:
        raise InputError("no layer-wise per-sample rule for: " + ", ".join(missing) + " (use method='vmap')")
    return "vmap" if missing else "layerwise"


def split_views(inputs: torch.Tensor, targets: torch.Tensor, multi_view: bool | None) -> tuple[torch.Tensor, int]:
    """Check shapes; return the views flattened sample-major to (B*K, ...) and K."""
    require(isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor), "inputs and targets must be tensors")
    require(inputs.dim() >= 1 and targets.dim() >= 1, "inputs and targets need a batch dimension")
    require(
        inputs.shape[0] == targets.shape[0],
        f"inputs have batch dimension {inputs.shape[0]} but targets have {targets.shape[0]}",
    )
    if multi_view is None:
        multi_view = inputs.dim() == 5  # (B, K, C, H, W): K views of an image
    if not multi_view:
        return inputs, 1
    require(inputs.dim() >= 3, f"multi-view inputs need shape (B, K, ...), got {tuple(inputs.shape)}")
    k = inputs.shape[1]
    require(k >= 1, "multi-view inputs need at least one view per sample")
    return inputs.reshape(inputs.shape[0] * k, *inputs.shape[2:]), k


#: Arithmetic of the forward and backward passes of a DP step (the per-sample contractions,
#: norms, clipping and noise always run in the parameters' dtype).
PRECISIONS = ("fp32", "bf16")


def low_precision_dtype(precision: str, method: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (None for fp32); bf16 needs the layer-wise method."""
    require(precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    require(method == "layerwise", "precision bf16 needs the layer-wise per-sample method "
            "(the model has layers only the vmap method handles)")
    return torch.bfloat16


#: Relative margin of the clip factor against rounding: the norm and the re-weighted sum are computed
#: along different float paths, so a clipped sample's contribution can exceed C by a few ulps. Measured
#: in review (session 25) on WRN at C = 0.1: up to 1.0000003 C in fp32 and 1.0000023 C with bf16
#: autocast; the margins below are 3-4x those, so the sum of one sample's clipped gradient is <= C.
#: float64 parameters (the reference tests) round ~1e-16 and take no margin.
ROUNDING_MARGIN = {"fp64": 0.0, "fp32": 1e-6, "bf16": 1e-5}


def clip_factors(norms: torch.Tensor, max_grad_norm: float, margin: float = 0.0) -> torch.Tensor:
    """min(1, C / ((norm + 1e-6) (1 + margin))) per sample."""
    return (max_grad_norm / ((norms + _EPS) * (1.0 + margin))).clamp(max=1.0)


_CHECKED_INDEPENDENT: weakref.WeakSet = weakref.WeakSet()


def _check_samples_independent(model: nn.Module, inputs, targets, *, loss_fn, multi_view) -> None:
    """Refuse a model whose forward pass mixes the samples of a batch or updates its buffers.

    The layer-wise engine computes a whole chunk's per-sample gradients in one pass. That is exact
    only if each sample's output depends on that sample alone, which :func:`validate_model` checks
    for known layers (BatchNorm) but cannot see in code such as ``x - x.mean(0)`` in a custom
    ``forward``. Once per model: sample 0's gradient norm computed beside sample 1 must equal its
    norm computed alone. Both passes run in the model's own mode (a layer may mix samples only
    when training), with dropout off and the same random seed, so randomness cannot tell them
    apart; float32. A buffer the forward pass changes (running statistics of a custom layer) would
    carry private data into the model without noise, so it is refused too, and restored. Costs
    two tiny passes. The model counts as checked only once the check has passed.

    The same pass also checks the rules against autograd: sample 0's clipped gradient must equal
    the clipped gradient autograd computes for its loss alone. The rules see a parameter only
    through the forward hook of the module that owns it, so a weight shared by two modules, or a
    parameter also read directly in a custom ``forward``, would silently lose part of its gradient
    (clipping still bounds what is summed, but the model would learn from a wrong gradient).
    """
    _CHECKED_INDEPENDENT.add(model)  # also keeps the two passes below from re-entering the check
    try:
        _run_independence_check(model, inputs, targets, loss_fn=loss_fn, multi_view=multi_view)
    except BaseException:
        _CHECKED_INDEPENDENT.discard(model)
        raise


def _run_independence_check(model: nn.Module, inputs, targets, *, loss_fn, multi_view) -> None:
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    outs = []
    try:
        for m in dropouts:
            m.eval()
        kw = dict(max_grad_norm=1.0, loss_fn=loss_fn, multi_view=multi_view, method="layerwise", precision="fp32")
        for batch in (slice(0, 2), slice(0, 1)):
            with _same_random_draws(inputs.device):
                outs.append(_clip_and_sum(model, inputs[batch], targets[batch], **kw))
        with _same_random_draws(inputs.device):
            reference = _autograd_gradient(model, inputs[:1], targets[:1], loss_fn=loss_fn, multi_view=multi_view)
    finally:
        for m in dropouts:
            m.train()
        changed = [n for n, b in model.named_buffers() if n in buffers and not torch.equal(b, buffers[n])]
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
    if changed:
        raise InputError(
            "the model's forward pass updates its buffers (" + ", ".join(changed[:3]) + "): they would carry "
            "private data into the model without noise; remove the running statistics")
    pair, alone = (out.per_sample_norms[0] for out in outs)
    if not torch.isclose(pair, alone, rtol=1e-3, atol=1e-6):
        raise InputError(
            "the model's forward pass mixes the samples of a batch: sample 0's gradient norm is "
            f"{float(pair):.6g} beside sample 1 and {float(alone):.6g} alone, so clipping would not bound one "
            "sample's influence; remove the cross-sample operation (e.g. statistics over the batch dimension)")
    ref_norm = torch.sqrt(sum(g.double().square().sum() for g in reference.values()))
    factor = float(clip_factors(ref_norm, 1.0))
    error = torch.sqrt(sum((outs[1].grad_sum[n].double() - factor * g.double()).square().sum()
                           for n, g in reference.items()))
    if not error <= 1e-3 * factor * ref_norm + 1e-6:
        raise InputError(
            "the layer-wise per-sample gradients of this model differ from autograd's (a parameter shared "
            "by two modules, or read outside its module's forward, loses part of its gradient): use method='vmap'")


def _autograd_gradient(model: nn.Module, inputs, targets, *, loss_fn, multi_view) -> dict[str, torch.Tensor]:
    """Gradient of one sample's loss (the mean over its views) by plain autograd: the reference the
    layer-wise rules are held to."""
    views, k = split_views(inputs, targets, multi_view)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        losses = (loss_fn or cross_entropy_per_sample)(model(views), targets.repeat_interleave(k, dim=0))
        grads = torch.autograd.grad(losses.sum() / k, [p for _, p in trainable], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(trainable, grads, strict=True)}


@contextmanager
def _same_random_draws(device: torch.device) -> Iterator[None]:
    """Seed the generators a forward pass on ``device`` draws from, and restore them after."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(0)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(0)
        yield


@contextmanager
def tf32_off() -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN inside the block, the caller's settings restored after.

    With TF32 (cuDNN's default for convolutions) the ghost-norm path computes a layer's norm with
    one contraction and its clipped sum with another; the two round differently, so the summed
    vector can exceed the bound C the norm promised (1.7 % off a float64 reference on an H200,
    BENCHMARKS.md ``gpu``). Full float32 costs no measurable speed on the DP step. The flags are
    process-wide; on a CPU they change nothing.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def clip_and_sum(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    max_grad_norm: float,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    multi_view: bool | None = None,
    method: str = "auto",
    precision: str = "fp32",
) -> ClippedSum:
    """:func:`clipped_grad_sum` with per-sample losses and the method used (for the trainer).

    Runs in full float32 whatever the caller's TF32 settings (:func:`tf32_off`)."""
    with tf32_off():
        return _clip_and_sum(model, inputs, targets, max_grad_norm=max_grad_norm, loss_fn=loss_fn,
                             multi_view=multi_view, method=method, precision=precision)


def _clip_and_sum(model, inputs, targets, *, max_grad_norm, loss_fn, multi_view, method, precision) -> ClippedSum:
    require(
        isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool)
        and math.isfinite(max_grad_norm) and max_grad_norm > 0,
        f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}",
    )
    trainable = validate_model(model)
    views, k = split_views(inputs, targets, multi_view)
    method = resolve_method(model, method)
    autocast = low_precision_dtype(precision, method)
    b = inputs.shape[0]
    if method == "layerwise" and b >= 2 and model not in _CHECKED_INDEPENDENT:
        _check_samples_independent(model, inputs, targets, loss_fn=loss_fn, multi_view=multi_view)
    if b == 0:
        zeros = {n: torch.zeros_like(p) for n, p in trainable}
        empty = torch.zeros(0, dtype=trainable[0][1].dtype, device=inputs.device)
        return ClippedSum(zeros, empty, empty, method)
    loss_fn = loss_fn or cross_entropy_per_sample
    if method == "layerwise":
        grads, losses, deferred = layerwise.per_sample_grads(model, views, targets, augmult=k, loss_fn=loss_fn,
                                                             autocast=autocast)
    else:
        grads, losses, deferred = functional.per_sample_grads(model, views, targets, augmult=k, loss_fn=loss_fn)
    sq = torch.zeros(b, dtype=torch.float64 if trainable[0][1].dtype == torch.float64 else torch.float32,
                     device=inputs.device)
    for n, _ in trainable:
        if n in deferred:
            sq = sq + deferred[n].sq_norms.to(sq.dtype)
        else:
            sq = sq + torch.linalg.vector_norm(grads[n].reshape(b, -1), dim=1).square().to(sq.dtype)
    norms = sq.clamp(min=0).sqrt()  # a Gram-matrix norm can round a hair below zero
    # A sample whose gradient is not finite (inf or NaN anywhere) contributes exactly zero: a factor
    # of 0 alone would give 0 * inf = NaN and let that one sample turn the whole sum into NaN.
    finite = torch.isfinite(norms)
    margin = ROUNDING_MARGIN["bf16" if autocast is not None else "fp64" if sq.dtype == torch.float64 else "fp32"]
    factors = torch.where(finite, clip_factors(norms, float(max_grad_norm), margin), torch.zeros_like(norms))
    keep = None if bool(finite.all()) else finite
    grad_sum = {}
    for n, p in trainable:
        if n in deferred:
            grad_sum[n] = deferred.pop(n).finish(factors, keep).to(p.dtype)
        else:
            g = grads.pop(n)
            if keep is not None:
                g = torch.where(keep.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros((), dtype=g.dtype, device=g.device))
            grad_sum[n] = torch.tensordot(factors.to(g.dtype), g, dims=1).to(p.dtype)
    return ClippedSum(grad_sum, norms.detach(), losses.detach(), method)


def clipped_grad_sum(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    max_grad_norm: float,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    multi_view: bool | None = None,
    method: str = "auto",
    precision: str = "fp32",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sum over samples of clipped per-sample gradients, and the per-sample norms before clipping.

    ``inputs``: (B, ...) one view per sample, or (B, K, ...) K augmented views whose gradients are
    averaged *before* clipping (augmentation multiplicity). By default 5-D inputs are read as
    (B, K, C, H, W); pass ``multi_view`` to say so explicitly for other ranks.
    ``loss_fn(outputs, targets) -> (n,)`` per-example losses (default: cross-entropy); targets are
    repeated for each view. The layer-wise method calls it once on all B*K outputs; the vmap
    method calls it inside ``vmap`` (one sample's K views at a time), so it must be side-effect free.
    ``method``: ``"layerwise"`` (fast rules for Conv/Linear/GroupNorm/LayerNorm), ``"vmap"``
    (``torch.func``, any layer) or ``"auto"`` (layer-wise when it covers every trainable layer).
    ``precision``: ``"fp32"``, or ``"bf16"`` to run the forward and backward passes under bf16
    autocast (layer-wise only). Per-sample gradients, norms and the clipped sum stay in the
    parameters' dtype and are computed from the same values; the clip factor keeps a relative margin
    (:data:`ROUNDING_MARGIN`) above their rounding, so one sample's clipped contribution is at most C.

    Returns ``(grad_sum, per_sample_norms)``: ``grad_sum`` maps every trainable parameter's name
    to a tensor of its shape; frozen parameters (requires_grad False) are absent and cost nothing.
    The model's ``.grad`` fields are not touched. Raises :class:`InputError` before any work for
    cross-sample layers (BatchNorm), mismatched batch dimensions or ``max_grad_norm <= 0``.
    """
    out = clip_and_sum(
        model, inputs, targets, max_grad_norm=max_grad_norm, loss_fn=loss_fn, multi_view=multi_view, method=method,
        precision=precision,
    )
    return out.grad_sum, out.per_sample_norms
