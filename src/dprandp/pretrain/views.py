"""Phase I augmentations, applied to whole batches at once (no per-image Python loop).

Each image gets two independent views, each built like torchvision's pipeline
``RandomResizedCrop(32, scale=(0.08, 1)) -> RandomHorizontalFlip -> ColorJitter(0.4, 0.4, 0.4, 0.4)
-> RandomGrayscale(0.2) -> Normalize(mean, std)`` (SPEC.md, Phase I), but vectorised:

* crop + resize + flip are two batched matmuls per batch: bilinear sampling of an axis-aligned box
  at twice the output size, average-pooled (a cheap anti-alias for crops larger than the output),
  is one small weight matrix per axis and image (a flip reverses the column matrix);
* colour jitter draws a random order of the four operations per image (as torchvision does per
  call) and applies them in four rounds, each round updating only the images whose k-th operation it
  is (boolean indexing, not a loop over images); hue is rotated in HSV space (in closed form, without building HSV images);
* every random number comes from the ``torch.Generator`` passed in, drawn on the CPU, so the views
  are reproducible and identical whichever device runs the arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Normalisation of SPEC.md (Phase I views).
MEAN = (0.4409, 0.4279, 0.3868)
STD = (0.2683, 0.2610, 0.2687)
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True, kw_only=True)
class ViewConfig:
    """Parameters of one augmentation pipeline (defaults: SPEC.md)."""

    size: int = 32
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.4
    grayscale_p: float = 0.2
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    supersample: int = 2


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def crop_boxes(n: int, height: int, width: int, cfg: ViewConfig, g: torch.Generator, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes (top, left, h, w) in pixels, shape (n, 4), continuous.

    As torchvision: up to ``attempts`` draws of (area fraction, log-uniform aspect ratio); the first
    box that fits is kept, else the whole image (torchvision's fallback for in-range aspect ratios).
    """
    area = height * width
    frac = cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * torch.rand(n, attempts, generator=g)
    lr = (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * torch.rand(n, attempts, generator=g))
    w = torch.sqrt(frac * area * aspect)
    h = torch.sqrt(frac * area / aspect)
    ok = (w <= width) & (h <= height)
    first = torch.argmax(ok.int(), dim=1)  # index of the first fitting attempt (0 if none)
    rows = torch.arange(n)
    w, h, any_ok = w[rows, first], h[rows, first], ok.any(dim=1)
    w = torch.where(any_ok, w, torch.full_like(w, float(width)))
    h = torch.where(any_ok, h, torch.full_like(h, float(height)))
    top = torch.rand(n, generator=g) * (height - h)
    left = torch.rand(n, generator=g) * (width - w)
    return torch.stack([top, left, h, w], dim=1)


def _axis_weights(start: torch.Tensor, length: torch.Tensor, size: int, supersample: int, flip: torch.Tensor | None,
                  pixels: int) -> torch.Tensor:
    """(n, size, pixels) weights that resample [start, start + length] of an axis of ``pixels`` pixels to
    ``size`` outputs: linear interpolation at ``size * supersample`` points (each at the centre of its
    output cell, reversed where ``flip``), clamped to the border pixels, then averaged in groups of
    ``supersample``. This is one axis of ``F.grid_sample(bilinear, border, align_corners=False)`` on
    the crop box's affine grid, followed by ``avg_pool2d(supersample)``."""
    n, s = start.shape[0], size * supersample
    centres = (torch.arange(s, device=start.device, dtype=start.dtype) + 0.5) / s  # 0..1 across the crop
    if flip is not None:
        centres = torch.where(flip.view(-1, 1), 1 - centres, centres)
    pos = (start.view(-1, 1) + length.view(-1, 1) * centres - 0.5).clamp(0, pixels - 1)  # pixel-centre coordinates
    lo = pos.floor().clamp(max=pixels - 2) if pixels > 1 else pos.floor()
    frac = pos - lo
    weights = torch.zeros(n, s, pixels, device=start.device, dtype=start.dtype)
    lo = lo.long().unsqueeze(2)
    weights.scatter_add_(2, lo, (1 - frac).unsqueeze(2))
    if pixels > 1:
        weights.scatter_add_(2, lo + 1, frac.unsqueeze(2))
    return weights.view(n, size, supersample, pixels).mean(2)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int, supersample: int = 2) -> torch.Tensor:
    """Crop ``boxes`` (top, left, h, w) out of ``x`` (B, C, H, W), resize to ``size``, flip where asked.

    Bilinear sampling of an axis-aligned box is separable, so each image is resampled by two small
    matrices, ``rows @ x @ cols^T`` (two batched matmuls), instead of ``grid_sample`` at
    ``supersample``-times the output size followed by average pooling: the same numbers, about
    1.5x faster on a 2-core CPU (``bench/pretrain_views.py``).
    """
    b, c, height, width = x.shape
    top, left, h, w = boxes.to(x.device, torch.promote_types(x.dtype, torch.float32)).unbind(1)
    rows = _axis_weights(top, h, size, supersample, None, height).to(x.dtype)  # (B, size, H)
    cols = _axis_weights(left, w, size, supersample, flip.to(x.device), width).to(x.dtype)  # (B, size, W)
    # two plain bmm calls (a broadcast 4-d matmul is about 2x slower on the CPU)
    narrow = torch.bmm(x.reshape(b, c * height, width), cols.transpose(1, 2))  # (B, C H, size)
    narrow = narrow.view(b, c, height, size).transpose(1, 2).reshape(b, height, c * size)
    return torch.bmm(rows, narrow).view(b, size, c, size).transpose(1, 2).contiguous()


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1).to(x.dtype)
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per image), as a round trip through HSV.

    HSV keeps v = max and s v = max - min, so the round trip reduces to: hue h (in sixths of a turn)
    from the largest channel, then channel c in (R, G, B) = v - (max - min) clamp(min(k, 4 - k), 0, 1)
    with k = (n_c + h + 6 shift) mod 6, n = (5, 3, 1). A grey pixel (max = min) stays as it is.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(dim=1)
    delta = maxc - x.amin(dim=1)
    sixths = torch.where(maxc == r, g - b, torch.where(maxc == g, b - r + 2 * delta, r - g + 4 * delta))
    sixths = sixths / torch.where(delta > 0, delta, torch.ones_like(delta))
    sixths = torch.remainder(sixths + 6.0 * shift.view(-1, 1, 1).to(x.dtype), 6.0)  # on one channel, not three
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = n + sixths.unsqueeze(1)
    k = torch.where(k >= 6.0, k - 6.0, k)  # (n + h) mod 6, as h is already in [0, 6)
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: torch.Tensor, cfg: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """ColorJitter(b, c, s, h) with a random order of the four operations per image."""
    n = x.shape[0]
    factors = torch.stack([
        _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, g),
        _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, g),
        _uniform(n, 1 - cfg.saturation, 1 + cfg.saturation, g),
        _uniform(n, -cfg.hue, cfg.hue, g),
    ], dim=1)
    order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)  # a uniform random permutation per image
    order, factors = order.to(x.device), factors.to(x.device)
    x = x.clone()  # updated in place below, one copy instead of one per round and operation
    for position in range(4):
        for op_index, op in enumerate(_JITTER_OPS):
            rows = (order[:, position] == op_index).nonzero().squeeze(1)
            if rows.numel():
                x.index_copy_(0, rows, op(x.index_select(0, rows), factors.index_select(0, rows)[:, op_index]))
    return x


def random_view(x: torch.Tensor, cfg: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """One augmented, normalised view of a float batch ``x`` (B, 3, H, W) in [0, 1]."""
    n, _, height, width = x.shape
    boxes = crop_boxes(n, height, width, cfg, g)
    flip = torch.rand(n, generator=g) < cfg.flip_p
    v = resized_crop(x, boxes, flip, cfg.size, cfg.supersample).clamp(0, 1)
    v = color_jitter(v, cfg, g)
    gray = (torch.rand(n, generator=g) < cfg.grayscale_p).to(x.device).view(-1, 1, 1, 1)
    v = torch.where(gray, grayscale(v).expand_as(v), v)
    mean = torch.tensor(cfg.mean, device=x.device, dtype=v.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device, dtype=v.dtype).view(1, 3, 1, 1)
    return (v - mean) / std


def to_float_batch(images, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) array or tensor -> float32 (B, 3, H, W) in [0, 1] on ``device``
    (moved as uint8, a quarter of the bytes)."""
    t = torch.as_tensor(images).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def two_views(images, g: torch.Generator, cfg: ViewConfig | None = None, device: torch.device | str = "cpu"):
    """Two independent views of a uint8 (B, H, W, 3) batch: a pair of (B, 3, size, size) tensors."""
    cfg = cfg or ViewConfig()
    x = to_float_batch(images, device)
    return random_view(x, cfg, g), random_view(x, cfg, g)
