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


#: The layer-wise self-check's results: model -> {trainable parameter names: level passed}. A model is
#: checked again when its trainable set changes (parameters unfrozen for a later phase are held to
#: autograd too). Weak keys: having been checked does not keep a model alive.
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ALONE, _PAIR = 1, 2  # checks that need one sample (state, autograd) passed; the pair comparison passed too


def _check_samples_independent(model: nn.Module, trainable, inputs, targets, *, loss_fn, multi_view) -> None:
    """Refuse a model whose forward pass mixes the samples of a batch or changes its state.

    The layer-wise engine computes a whole chunk's per-sample gradients in one pass. That is exact
    only if each sample's output depends on that sample alone, which :func:`validate_model` checks
    for known layers (BatchNorm) but cannot see in code such as ``x - x.mean(0)`` in a custom
    ``forward``: sample 0's gradient norm computed beside sample 1 must equal its norm computed
    alone. Both passes run in the model's own mode (a layer may mix samples only when training),
    with dropout off and the same random seed, so randomness cannot tell them apart; float32. A
    parameter or buffer the forward pass changes (running statistics of a custom layer, a frozen
    parameter holding a sample) would carry private data into the model without noise, so it is
    refused too, and restored.

    The same pass also checks the rules against autograd: sample 0's clipped gradient must equal
    the clipped gradient autograd computes for its loss alone. The rules see a parameter only
    through the forward hook of the module that owns it, so a weight shared by two modules, or a
    parameter also read directly in a custom ``forward`` (``weight_norm``), would silently lose part
    of its gradient (clipping still bounds what is summed, but the model would learn from a wrong one).

    Once per model and trainable set, and only once it has passed; costs two or three tiny passes. A
    chunk of one sample runs the state and autograd checks (chunks of one must not skip them), and the
    pair comparison still runs at the first chunk of two or more.
    """
    key = tuple(n for n, _ in trainable)
    level = _PAIR if inputs.shape[0] >= 2 else _ALONE
    if _CHECKED.get(model, {}).get(key, 0) >= level:
        return
    _run_independence_check(model, inputs[:level], targets[:level], loss_fn=loss_fn, multi_view=multi_view)
    _CHECKED.setdefault(model, {})[key] = level


def _run_independence_check(model: nn.Module, inputs, targets, *, loss_fn, multi_view) -> None:
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
    saved = _snapshot_state(model)
    outs = []
    try:
        for m in dropouts:
            m.eval()
        kw = dict(max_grad_norm=1.0, loss_fn=loss_fn, multi_view=multi_view, method="layerwise", precision="fp32",
                  check=False)
        for batch in (slice(0, 2), slice(0, 1)) if inputs.shape[0] >= 2 else (slice(0, 1),):
            with _same_random_draws(inputs.device):
                outs.append(_clip_and_sum(model, inputs[batch], targets[batch], **kw))
        with _same_random_draws(inputs.device):
            reference = _autograd_gradient(model, inputs[:1], targets[:1], loss_fn=loss_fn, multi_view=multi_view)
    finally:
        for m in dropouts:
            m.train()
        _refuse_state_changes(model, _restore_state(model, saved))  # even if a pass failed: the state leaks
    alone = outs[-1]
    if len(outs) == 2:
        pair, single = outs[0].per_sample_norms[0], alone.per_sample_norms[0]
        if not torch.isclose(pair, single, rtol=1e-3, atol=1e-6):
            raise InputError(
                "the model's forward pass mixes the samples of a batch: sample 0's gradient norm is "
                f"{float(pair):.6g} beside sample 1 and {float(single):.6g} alone, so clipping would not bound one "
                "sample's influence; remove the cross-sample operation (e.g. statistics over the batch dimension)")
    ref_norm = torch.sqrt(sum(g.double().square().sum() for g in reference.values()))
    factor = float(clip_factors(ref_norm, 1.0))
    error = torch.sqrt(sum((alone.grad_sum[n].double() - factor * g.double()).square().sum()
                           for n, g in reference.items()))
    if not error <= 1e-3 * factor * ref_norm + 1e-6:
        raise InputError(
            "the layer-wise per-sample gradients of this model differ from autograd's (a parameter shared "
            "by two modules, or read outside its module's forward, loses part of its gradient): use method='vmap'")


def _refuse_state_changes(model: nn.Module, changed: list[str]) -> None:
    """One line naming the parameters or buffers a forward pass wrote (already restored)."""
    if not changed:
        return
    params = {n for n, _ in model.named_parameters()}
    what = " and ".join(w for w, hit in (("parameters", any(n in params for n in changed)),
                                          ("buffers", any(n not in params for n in changed))) if hit)
    raise InputError(
        f"the model's forward pass updates its {what} (" + ", ".join(changed[:3]) + "): they would carry "
        "private data into the model without noise; keep the forward pass from writing them (e.g. remove "
        "running statistics)")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter (trainable or frozen) and buffer by name: all a model carries from step to step."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@dataclass
class _Snapshot:
    """A model's state before a pass: each tensor with a copy of its value, and the buffer slots
    registered as None (``register_buffer("b", None)``), which hold no tensor to copy."""

    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    empty_slots: set[str]


def _snapshot_state(model: nn.Module) -> _Snapshot:
    """The state :func:`_restore_state` puts back."""
    return _Snapshot({n: (t, t.detach().clone()) for n, t in _state(model).items()},
                     {f"{prefix}.{leaf}" if prefix else leaf for prefix, m in model.named_modules()
                      for leaf, b in m._buffers.items() if b is None})


def _restore_state(model: nn.Module, saved: _Snapshot) -> list[str]:
    """Undo what a forward pass did to the model's state; return the names it changed.

    A tensor written in place gets its value back; one the forward pass replaced (``self.b = ...``)
    is put back in its module, and one it added is removed (an empty slot it filled is emptied), so
    the model is as it was before."""
    now = _state(model)
    changed = []
    with torch.no_grad():
        for n, (t, value) in saved.tensors.items():
            if now.get(n) is t and _same_values(t, value):
                continue
            changed.append(n)
            if t.shape == value.shape:
                t.copy_(value)
            else:
                t.data = value
            if now.get(n) is not t:
                _set_state(model, n, t)
    for n in [n for n in now if n not in saved.tensors]:
        changed.append(n)
        _set_state(model, n, None, keep_slot=n in saved.empty_slots)
    return changed


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal, NaNs in the same places counting as equal (a NaN in a buffer is not a change)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))


def _set_state(model: nn.Module, name: str, tensor: torch.Tensor | None, *, keep_slot: bool = False) -> None:
    """Put ``tensor`` back as the parameter or buffer ``name`` (None: remove it, or with ``keep_slot``
    leave it registered as an empty buffer)."""
    path, _, leaf = name.rpartition(".")
    owner = model.get_submodule(path)
    table = owner._parameters if isinstance(tensor, nn.Parameter) or leaf in owner._parameters else owner._buffers
    for other in (owner._parameters, owner._buffers):
        if other is not table:
            other.pop(leaf, None)
    if tensor is None:
        table.pop(leaf, None)
        if keep_slot:
            owner._buffers[leaf] = None
    else:
        table[leaf] = tensor


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


def _clip_and_sum(model, inputs, targets, *, max_grad_norm, loss_fn, multi_view, method, precision,
                  check: bool = True) -> ClippedSum:
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
    if method == "layerwise" and check and b >= 1:  # check=False: the self-check's own passes
        _check_samples_independent(model, trainable, inputs, targets, loss_fn=loss_fn, multi_view=multi_view)
    if b == 0:
        zeros = {n: torch.zeros_like(p) for n, p in trainable}
        empty = torch.zeros(0, dtype=trainable[0][1].dtype, device=inputs.device)
        return ClippedSum(zeros, empty, empty, method)
    loss_fn = loss_fn or cross_entropy_per_sample
    if method == "layerwise":
        # Every chunk, not only the self-check's one or two samples: a forward pass that wrote state only for
        # larger chunks, or only after a few calls, passed the check (found in review). One copy of the state
        # per chunk (11 MB for WRN-16-4), restored and refused if the pass changed it.
        saved = _snapshot_state(model) if check else None
        try:
            grads, losses, deferred = layerwise.per_sample_grads(model, views, targets, augmult=k, loss_fn=loss_fn,
                                                                 autocast=autocast)
        finally:
            if saved is not None:
                _refuse_state_changes(model, _restore_state(model, saved))
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
