"""Per-sample gradients layer by layer from one ordinary forward and backward pass.

For the layers that hold the parameters (Conv, Linear, GroupNorm, LayerNorm) the gradient of a
sample's loss with respect to the weights is a contraction of two things an ordinary backward pass
already has: the layer's input activations and the gradient at its output. Forward hooks record
the inputs and wrap each output in an identity "tap"; the backward pass is run towards a scalar
that every tap depends on, so autograd computes output and input gradients but never a batch
weight gradient, and each tap contracts its output gradient per sample as soon as it arrives and
lets it go (output gradients of all layers never coexist). Augmentation multiplicity is free here:
a sample's K views simply join the contraction as more positions, which *is* the gradient of the
mean-over-views loss, i.e. the views are averaged before any clipping.

Convolutions use the grouped-convolution identity: stacking the B samples along channels and
convolving with ``groups = B`` turns one weight-gradient call into B per-sample ones, with the K
views as the batch dimension it sums over. Wide convolutions on small maps use im2col + a batched
matmul, or, when the per-sample gradients would be larger than the Gram matrices of positions,
"ghost" norms (Goodfellow 2015; Li et al. 2022; Bu et al. 2022): the squared norm of sample i's
gradient is sum_{t,t'} (g_t . g_t')(a_t . a_t'), and the clipped sum is one ordinary weight gradient
of the output gradients scaled by the clip factors, so the B per-sample tensors never exist.
All paths are exact (tests compare each against a loop of batch-size-1 backward passes).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dprandp.errors import InputError

#: Leaf module types with a per-sample rule here.
SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.GroupNorm, nn.LayerNorm)


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(p for _, p in _own_trainable(module)).dtype


def _own_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def unsupported_modules(model: nn.Module) -> list[str]:
    """Modules holding trainable parameters that have no per-sample rule here, and parameters
    shared by two modules (each module's rule sees only its own use of a shared weight)."""
    out = []
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        own = _own_trainable(module)
        for pname, param in own:
            full = f"{name}.{pname}" if name else pname
            if id(param) in owner:
                out.append(f"{full} (the parameter {owner[id(param)]}, shared)")
            owner.setdefault(id(param), full)
        if not own:
            continue
        if not isinstance(module, SUPPORTED):
            out.append(f"{name} ({type(module).__name__})")
        elif isinstance(module, nn.modules.conv._ConvNd) and isinstance(module.padding, str) and module.padding != "valid":
            out.append(f"{name} (padding={module.padding!r})")
    return out


@dataclass
class _Call:
    module: nn.Module
    prefix: str
    inputs: torch.Tensor | None
    versions: tuple[int]


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient to ``consume``."""

    @staticmethod
    def forward(ctx, output, anchor, index, consume):
        ctx.index, ctx.consume = index, consume
        ctx.anchor_meta = (anchor.dtype, anchor.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ctx.consume(ctx.index, grad)
        dtype, device = ctx.anchor_meta
        return grad, torch.zeros((), dtype=dtype, device=device), None, None


@dataclass
class Deferred:
    """A parameter whose per-sample gradients are never materialised ("ghost" norm).

    ``sq_norms`` holds each sample's squared gradient norm; ``finish(factors, keep)`` returns
    sum_i factors[i] * grad_i, computed as one ordinary weight gradient of the re-weighted
    output gradients, once the clip factors are known. ``keep`` (bool per sample, or None for
    all) drops samples entirely, so that a non-finite one cannot leak NaN through 0 * inf.
    """

    sq_norms: torch.Tensor
    finish: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


#: Ghost norms for convs whose per-sample gradients are big and whose maps are small: when
#: positions * (fan_in + out_channels) < fan_in * out_channels (Gram matrices cheaper than the
#: B per-sample gradients) and positions <= this bound (Gram size per sample = positions^2).
_GHOST_MAX_POSITIONS = 256


def _use_ghost(positions: int, fan_in: int, fan_out: int) -> bool:
    return positions <= _GHOST_MAX_POSITIONS and positions * (fan_in + fan_out) < fan_in * fan_out


#: Samples whose Gram matrices are formed at once in float64 (memory: 2 x this x (K T)^2 doubles).
_GHOST_BLOCK = 16


def ghost_sq_norm_upper(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A rigorous upper bound on ||sum_t g_t x_t^T||_F^2 per sample (x's and g's values exactly);
    x (B, d, n), g (B, p, n).

    The Gram formula sum_{t,t'} (x_t . x_t')(g_t . g_t') cancels: for a record whose positions nearly
    cancel (x_2 = -x_1 + small), float32 rounding of terms of size |x|^2 |g|^2 left a norm of 0 for a
    gradient of norm 1, so the record passed unclipped (found in review: up to 19x C). So the sum runs
    in float64, and the worst-case rounding error of any summation order, (gamma_d + gamma_p +
    gamma_{n^2} + u) S^2 with S = sum_t ||x_t|| ||g_t||, is added (doubled to cover the norms' own
    rounding): about 1e-10 of S^2, invisible unless the terms cancel, and then it keeps the clip
    factor honest. What is left is the ordinary float32 rounding of the clipped sum itself
    (``finish``), as on every route: relative ~1e-7 for ordinary samples, ~1e-4 for the review's
    adversarial record, whose terms are 3e4 times its gradient."""
    b, d, n = x.shape
    gamma = 2.0 * (d + g.shape[1] + n * n + 4) * 2.0 ** -53
    out = []
    for i in range(0, b, _GHOST_BLOCK):
        xb, gb = x[i:i + _GHOST_BLOCK].double(), g[i:i + _GHOST_BLOCK].double()
        sq = (torch.bmm(xb.transpose(1, 2), xb) * torch.bmm(gb.transpose(1, 2), gb)).sum(dim=(1, 2))
        s = (torch.linalg.vector_norm(xb, dim=1) * torch.linalg.vector_norm(gb, dim=1)).sum(dim=1)
        out.append(sq.clamp(min=0) + gamma * s.square())
    return torch.cat(out)


def _conv2d_weight_ghost(module, a: torch.Tensor, g: torch.Tensor, b: int, padding: list[int]) -> Deferred:
    """||sum_t g_t a_t^T||^2 per sample, over views and positions, from Gram matrices
    (:func:`ghost_sq_norm_upper`: float64 and a rigorous rounding bound).

    The inputs are taken in the weight's dtype even under autocast: the norm and the clipped sum
    (``finish``) are two different contractions of the same values."""
    a, g = a.to(module.weight.dtype), g.to(module.weight.dtype)
    cols = _im2col(a, module, padding)  # (N, d, T)
    d, t = cols.shape[1], cols.shape[2]
    x = cols.reshape(b, -1, d, t).transpose(1, 2).reshape(b, d, -1)  # (B, d, K*T)
    gg = g.reshape(b, -1, g.shape[1], t).transpose(1, 2).reshape(b, g.shape[1], -1)  # (B, p, K*T)
    sq = ghost_sq_norm_upper(x, gg)
    del cols, x, gg
    k = a.shape[0] // b
    w = module.weight

    def finish(factors: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        scale = factors.to(g.dtype).repeat_interleave(k).reshape(-1, *([1] * (g.dim() - 1)))
        gs, inputs = g * scale, a
        if keep is not None:
            rows = keep.repeat_interleave(k).reshape(-1, *([1] * (g.dim() - 1)))
            zero = torch.zeros((), dtype=g.dtype, device=g.device)
            gs, inputs = torch.where(rows, gs, zero), torch.where(rows, a, zero)
        _, gw, _ = torch.ops.aten.convolution_backward(
            gs, inputs, w.detach(), None, list(module.stride), padding, list(module.dilation), False,
            [0] * (a.dim() - 2), module.groups, [False, True, False],
        )
        return gw

    return Deferred(sq, finish)


#: im2col + batched matmul beats the grouped convolution on CPUs for wide layers on small maps
#: (e.g. WRN-16-4's last stage: 256 channels at 8x8, 4x faster); the grouped call wins elsewhere.
_UNFOLD_MIN_FAN_IN = 1024
_UNFOLD_MAX_POSITIONS = 256
#: In bf16 on CPUs (``--precision bf16``) the grouped call is slow on small maps: im2col + bmm wins
#: there at any width (WRN-16-1's 64-channel 8x8 convs: 37 ms against 117 ms for 250 samples).
_UNFOLD_MAX_POSITIONS_BF16_CPU = 64


def _im2col(a: torch.Tensor, module: nn.Conv2d, padding: list[int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C*kh*kw, Ho*Wo) as one strided copy (faster than F.unfold on CPUs)."""
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    a = F.pad(a, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else a.contiguous()
    n, c, h, w = a.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = a.stride()
    windows = a.as_strided((n, c, kh, kw, ho, wo), (s0, s1, dh * s2, dw * s3, sh * s2, sw * s3))
    return windows.reshape(n, c * kh * kw, ho * wo)


def _conv_weight_grouped(module, a: torch.Tensor, g: torch.Tensor, b: int, padding: list[int]) -> torch.Tensor:
    """Per-sample conv weight gradients with one ``groups = B * groups`` weight-gradient call."""
    w = module.weight
    k = a.shape[0] // b
    # (B*K, C, ...) -> (K, B*C, ...): samples become channel groups, views the summed batch.
    ai = a.reshape(b, k, *a.shape[1:]).transpose(0, 1).reshape(k, b * a.shape[1], *a.shape[2:])
    gi = g.reshape(b, k, *g.shape[1:]).transpose(0, 1).reshape(k, b * g.shape[1], *g.shape[2:])
    # Only the weight's shape matters for a weight gradient: no need to copy B replicas of it. Its
    # dtype must be the inputs' (bf16 under autocast): cuDNN refuses a float32 weight beside bf16
    # inputs, where the CPU kernel let it pass.
    shape_only = a.new_empty((b * w.shape[0], *w.shape[1:]))
    _, gw, _ = torch.ops.aten.convolution_backward(
        gi, ai, shape_only, None, list(module.stride), padding, list(module.dilation), False,
        [0] * (a.dim() - 2), b * module.groups, [False, True, False],
    )
    return gw.reshape(b, *w.shape)


def _conv2d_weight_unfold(module, a: torch.Tensor, g: torch.Tensor, b: int, padding: list[int]) -> torch.Tensor:
    """Per-sample conv2d weight gradients as im2col + one batched matmul (small feature maps)."""
    w = module.weight
    cols = _im2col(a, module, padding)  # (N, d, T)
    d, t = cols.shape[1], cols.shape[2]
    cols = cols.reshape(b, -1, d, t).transpose(1, 2).reshape(b, d, -1)  # (B, d, K*T)
    gg = g.reshape(b, -1, g.shape[1], t).transpose(1, 2).reshape(b, g.shape[1], -1)  # (B, p, K*T)
    return torch.bmm(gg, cols.transpose(1, 2)).reshape(b, *w.shape)


def _conv(module: nn.modules.conv._ConvNd, a: torch.Tensor, g: torch.Tensor, b: int, ghost_ok: bool = False) -> dict:
    if module.padding_mode != "zeros":
        a = F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = [0] * (a.dim() - 2)
    else:
        padding = [0] * (a.dim() - 2) if module.padding == "valid" else list(module.padding)
    n = a.shape[0]
    k = n // b
    w = module.weight
    grads = {}
    if w.requires_grad:
        positions, fan_in, fan_out = k * g.shape[2:].numel(), w[0].numel(), w.shape[0]
        flat2d = a.dim() == 4 and module.groups == 1
        if ghost_ok and flat2d and _use_ghost(positions, fan_in, fan_out):
            grads["weight"] = _conv2d_weight_ghost(module, a, g, b, padding)
        elif flat2d and ((positions <= _UNFOLD_MAX_POSITIONS and fan_in >= _UNFOLD_MIN_FAN_IN)
                         or (a.dtype == torch.bfloat16 and a.device.type == "cpu"
                             and positions <= _UNFOLD_MAX_POSITIONS_BF16_CPU)):
            grads["weight"] = _conv2d_weight_unfold(module, a, g, b, padding)
        else:
            grads["weight"] = _conv_weight_grouped(module, a, g, b, padding)
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = g.reshape(b, k, g.shape[1], -1).sum(dim=(1, 3))
    return grads


def _linear(module: nn.Linear, a: torch.Tensor, g: torch.Tensor, b: int, ghost_ok: bool = False) -> dict:
    a = a.reshape(b, -1, a.shape[-1])
    g = g.reshape(b, -1, g.shape[-1])
    grads = {}
    if module.weight.requires_grad:
        grads["weight"] = torch.bmm(g.transpose(1, 2), a)
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = g.sum(dim=1)
    return grads


def _groupnorm(module: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor, b: int, ghost_ok: bool = False) -> dict:
    grads = {}
    c = a.shape[1]
    if module.weight is not None and module.weight.requires_grad:
        xhat = F.group_norm(a, module.num_groups, None, None, module.eps)
        grads["weight"] = (g * xhat).reshape(b, -1, c, xhat[0, 0].numel()).sum(dim=(1, 3))
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = g.reshape(b, -1, c, g[0, 0].numel()).sum(dim=(1, 3))
    return grads


def _layernorm(module: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor, b: int, ghost_ok: bool = False) -> dict:
    grads = {}
    shape = tuple(module.normalized_shape)
    if module.weight is not None and module.weight.requires_grad:
        xhat = F.layer_norm(a, shape, None, None, module.eps)
        grads["weight"] = (g * xhat).reshape(b, -1, *shape).sum(dim=1)
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = g.reshape(b, -1, *shape).sum(dim=1)
    return grads


def _rule(module: nn.Module) -> Callable[..., dict[str, torch.Tensor]]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return _conv
    if isinstance(module, nn.Linear):
        return _linear
    if isinstance(module, nn.GroupNorm):
        return _groupnorm
    return _layernorm


def per_sample_grads(
    model: nn.Module,
    views: torch.Tensor,
    targets: torch.Tensor,
    *,
    augmult: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Deferred]]:
    """Per-sample gradients of the mean-over-views loss, from one forward/backward pass.

    ``views``: (B*K, ...), sample-major (the K views of sample i are rows iK .. iK+K-1).
    Returns ``({name: (B, *param.shape)}, per_sample_loss (B,), {name: Deferred})``: parameters in
    the last dict (ghost norms) have no per-sample tensor, only squared norms and a deferred sum.

    ``autocast`` (e.g. ``torch.bfloat16``): the forward and backward passes run under autocast, and
    the loss in float32. A materialised per-sample gradient is contracted in the dtype its layer ran
    in and upcast to the parameter's dtype once; the norm and the clipped sum then both read that one
    tensor. Ghost norms are contracted in the parameter's dtype, where the Gram-matrix norm and the
    re-weighted weight gradient agree to rounding. Either way clipping bounds the vector that is summed
    (the clip factor's margin, ``clipping.ROUNDING_MARGIN``, covers that rounding), as in float32;
    only the gradient's accuracy depends on the low-precision passes.
    """
    n = views.shape[0]
    b = n // augmult
    calls: list[_Call] = []
    handles = []
    grads: dict[str, torch.Tensor] = {}
    deferred: dict[str, Deferred] = {}
    uses: dict[int, int] = {}
    # Every tap also depends on this scalar: asking autograd for its gradient runs the backward
    # through all taps, but through no parameter's weight gradient (those edges are not needed).
    anchor = torch.zeros((), dtype=views.dtype if views.is_floating_point() else torch.float32,
                         device=views.device, requires_grad=True)

    def consume(index: int, g: torch.Tensor) -> None:
        """Called by the backward pass with layer ``index``'s output gradient: contract it now,
        then drop the recorded input, so output gradients never pile up."""
        c = calls[index]
        if c.inputs._version != c.versions[0]:
            raise InputError(
                f"an in-place operation modified the input of layer {c.prefix.rstrip('.')}; "
                "per-sample gradients need out-of-place ops (or method='vmap')"
            )
        # A ghost norm is one call's norm: only exact when the layer ran once in this forward.
        ghost_ok = uses[id(c.module)] == 1
        dtype = _param_dtype(c.module)
        # Under autocast, contract in the dtype the layer's output gradient has (norm layers: the
        # parameters'); without autocast every dtype already agrees and .to() is a no-op.
        work = dtype if isinstance(c.module, (nn.GroupNorm, nn.LayerNorm)) else g.dtype
        a, g = c.inputs.to(work), g.to(work)
        for pname, grad in _rule(c.module)(c.module, a, g, b, ghost_ok).items():
            key = c.prefix + pname
            if isinstance(grad, Deferred):
                deferred[key] = grad
            else:  # upcast once: the norm and the clipped sum both read this very tensor
                grad = grad.to(dtype)
                grads[key] = grads[key] + grad if key in grads else grad
        c.inputs = None

    def make_hook(prefix: str):
        def hook(module, args, output):
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return None
            a = args[0]
            if output.shape[0] != n or a.shape[0] != n:
                raise InputError(
                    f"layer {prefix.rstrip('.')} changed the batch dimension ({n} -> {output.shape[0]}); "
                    "per-sample rules need the batch first: use method='vmap'"
                )
            calls.append(_Call(module, prefix, a.detach(), (a._version,)))
            uses[id(module)] = uses.get(id(module), 0) + 1
            return _Tap.apply(output, anchor, len(calls) - 1, consume)

        return hook

    for name, module in model.named_modules():
        if _own_trainable(module):
            handles.append(module.register_forward_hook(make_hook(name + "." if name else "")))
    try:
        low = torch.autocast(views.device.type, dtype=autocast) if autocast is not None else nullcontext()
        with torch.enable_grad(), low:
            out = model(views)
    except RuntimeError as err:
        if "modified inplace" in str(err):
            raise InputError(
                "an in-place operation modified the output of a trainable layer; per-sample gradients "
                "need out-of-place ops (or method='vmap')"
            ) from err
        raise
    finally:
        for h in handles:
            h.remove()
    if autocast is not None:
        out = out.float()
    losses = loss_fn(out, targets.repeat_interleave(augmult, dim=0))
    if losses.shape != (n,):
        raise InputError(f"loss_fn must return one loss per view, shape ({n},); got {tuple(losses.shape)}")
    sample_losses = losses.detach().reshape(b, augmult).mean(dim=1)
    if not calls:
        raise InputError("no trainable layer took part in the forward pass")
    # Sum over samples of the per-sample mean over views: each view's gradient carries 1/K.
    total = losses.sum() / augmult
    # A trainable parameter of a module that was never called has no rule to see it: it must be
    # unused, not read directly (e.g. ``norm.weight`` in a custom forward), or its gradient would be
    # silently taken as zero. Autograd says which it is, at the cost of its batch gradient only.
    called = {id(c.module) for c in calls}
    uncalled = [(prefix + n, p) for prefix, module in ((name + "." if name else "", m) for name, m in
                model.named_modules()) if id(module) not in called for n, p in _own_trainable(module)]
    found = torch.autograd.grad(total, [anchor, *(p for _, p in uncalled)], allow_unused=True)[1:]
    read = [name for (name, _), g in zip(uncalled, found, strict=True) if g is not None]
    if read:
        raise InputError("parameter(s) " + ", ".join(read[:3]) + " are read outside their module's forward, "
                         "which the layer-wise rules cannot see: use method='vmap'")
    for name, p in model.named_parameters():
        if p.requires_grad and name not in grads and name not in deferred:  # trainable but unused
            grads[name] = torch.zeros((b, *p.shape), dtype=p.dtype, device=p.device)
    return grads, sample_losses, deferred
