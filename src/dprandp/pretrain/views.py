"""Phase I augmentations, applied to whole batches at once (no per-image Python loop).

Each image gets two independent views, each built like torchvision's pipeline
``RandomResizedCrop(32, scale=(0.08, 1)) -> RandomHorizontalFlip -> ColorJitter(0.4, 0.4, 0.4, 0.4)
-> RandomGrayscale(0.2) -> Normalize(mean, std)`` (SPEC.md, Phase I), but vectorised:

* crop + resize + flip are one ``F.affine_grid`` / ``F.grid_sample`` call: each image's crop box is
  an affine map of the output grid (a negative x-scale flips it). The grid is sampled at twice the
  output size and average-pooled, a cheap anti-alias for crops larger than the output;
* colour jitter draws a random order of the four operations per image (as torchvision does per
  call) and applies them in four rounds, each round updating only the images whose k-th operation it
  is (boolean indexing, not a loop over images); hue is rotated in HSV space;
* every random number comes from the ``torch.Generator`` passed in, drawn on the CPU, so the views
  are reproducible and identical whichever device runs the arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

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


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int, supersample: int = 2) -> torch.Tensor:
    """Crop ``boxes`` (top, left, h, w) out of ``x`` (B, C, H, W), resize to ``size``, flip where asked."""
    b, _, height, width = x.shape
    top, left, h, w = boxes.to(x.device, torch.float32).unbind(1)
    # With align_corners=False, normalised -1..1 spans pixel edges: box [left, left + w] maps to
    # centre (2 left + w) / W - 1 and half-width w / W.
    sx = (w / width) * torch.where(flip.to(x.device), -1.0, 1.0)
    sy = h / height
    cx = (2 * left + w) / width - 1
    cy = (2 * top + h) / height - 1
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)
    s = size * supersample
    grid = F.affine_grid(theta.to(x.dtype), [b, x.shape[1], s, s], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(out, supersample) if supersample > 1 else out


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


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV with every channel in [0, 1]."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = torch.where(maxc == r, torch.remainder((g - b) / safe, 6.0),
                    torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: channel n in (R=5, G=3, B=1) is v - v s clamp(min(k, 4 - k), 0, 1),
    k = (n + 6 h) mod 6."""
    h, s, v = hsv.unbind(1)
    n = torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    m = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v.unsqueeze(1) - v.unsqueeze(1) * s.unsqueeze(1) * m


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per image)."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1).to(x.dtype), 1.0)
    return hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], dim=1))


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
    for position in range(4):
        for op_index, op in enumerate(_JITTER_OPS):
            rows = (order[:, position] == op_index).nonzero().squeeze(1)
            if rows.numel():
                x = x.index_copy(0, rows, op(x.index_select(0, rows), factors.index_select(0, rows)[:, op_index]))
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
