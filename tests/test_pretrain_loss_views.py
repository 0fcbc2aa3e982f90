"""Phase I losses against explicit double loops, and the batched views against their definition."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from bench.pretrain_views import grid_sample_crop  # F.affine_grid + F.grid_sample + avg_pool2d
from dprandp.pretrain.loss import align_uniform_loss, info_nce_loss
from dprandp.pretrain.views import (
    MEAN,
    STD,
    ViewConfig,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    crop_boxes,
    resized_crop,
    two_views,
)


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _uniformity_loop(z, t=2.0):
    terms = [math.exp(-t * float(((z[i] - z[j]) ** 2).sum())) for i in range(len(z)) for j in range(i + 1, len(z))]
    return math.log(sum(terms) / len(terms))


def test_align_uniform_matches_double_loop():
    z1, z2 = _unit(7, 5, 0), _unit(7, 5, 1)
    align = sum(float(((z1[i] - z2[i]) ** 2).sum()) for i in range(7)) / 7
    expected = align + (_uniformity_loop(z1) + _uniformity_loop(z2)) / 2
    assert float(align_uniform_loss(z1, z2)) == pytest.approx(expected, rel=1e-6)


def test_align_uniform_extremes():
    z = _unit(6, 4, 2)
    # identical views: alignment is 0, only uniformity remains
    assert float(align_uniform_loss(z, z)) == pytest.approx(_uniformity_loop(z), rel=1e-6)
    # all embeddings equal: uniformity is log(1) = 0 and alignment 0
    same = z[:1].expand(6, 4)
    assert float(align_uniform_loss(same, same)) == pytest.approx(0.0, abs=1e-9)


def test_info_nce_matches_double_loop():
    z1, z2 = _unit(5, 3, 3), _unit(5, 3, 4)
    z, b, tau = torch.cat([z1, z2]), 5, 0.2
    total = 0.0
    for i in range(2 * b):
        partner = (i + b) % (2 * b)
        others = [math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * b) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[partner]) / tau) / sum(others))
    assert float(info_nce_loss(z1, z2, temperature=tau)) == pytest.approx(total / (2 * b), rel=1e-6)


@pytest.mark.parametrize("shift", [-0.4, -0.1, 0.0, 0.25, 0.4])
def test_hue_matches_torchvision(shift):
    x = torch.rand(4, 3, 9, 9, generator=torch.Generator().manual_seed(5))
    x[0, :, 0] = 0.5  # grey pixels, and pixels with two equal largest channels
    x[1, 1, 0] = x[1, 0, 0]
    x[2, 2, 0] = x[2, 1, 0]
    ours = adjust_hue(x, torch.full((4,), shift))
    ref = torch.stack([TF.adjust_hue(xi, shift) for xi in x])
    assert torch.allclose(ours, ref, atol=1e-5)


def test_saturation_and_contrast_match_torchvision():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    f = torch.tensor([0.6, 1.0, 1.4])
    sat = torch.stack([TF.adjust_saturation(x[i], float(f[i])) for i in range(3)])
    con = torch.stack([TF.adjust_contrast(x[i], float(f[i])) for i in range(3)])
    assert torch.allclose(adjust_saturation(x, f), sat, atol=1e-6)
    assert torch.allclose(adjust_contrast(x, f), con, atol=1e-6)


def test_crop_boxes_fit_and_cover_the_scale_range():
    g = torch.Generator().manual_seed(0)
    boxes = crop_boxes(4000, 64, 48, ViewConfig(), g)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64 + 1e-4).all() and (left + w <= 48 + 1e-4).all()
    frac = h * w / (64 * 48)
    assert frac.min() >= 0.08 - 1e-4 and frac.max() <= 1 + 1e-4
    assert frac.min() < 0.1 and frac.max() > 0.9  # the whole range is used


def test_resized_crop_of_whole_image_is_resize_and_flip():
    # A crop box covering the whole image is a plain resize; flipping reverses the columns.
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    box = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)
    same = resized_crop(x, box, torch.tensor([False, True]), 8, supersample=1)
    assert torch.allclose(same[0], x[0], atol=1e-4)
    assert torch.allclose(same[1], x[1].flip(-1), atol=1e-4)
    # a box on the top-left quadrant at its own resolution is exactly that quadrant
    quad = resized_crop(x, torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 2), torch.tensor([False, False]), 4, supersample=1)
    assert torch.allclose(quad, x[:, :, :4, :4], atol=1e-4)


@pytest.mark.parametrize("supersample", [1, 2, 3])
@pytest.mark.parametrize(("height", "width"), [(64, 64), (40, 24)])
def test_resized_crop_is_grid_sample_on_the_boxes_affine_grid(supersample, height, width):
    g = torch.Generator().manual_seed(supersample)
    x = torch.rand(64, 3, height, width, generator=g, dtype=torch.float64)
    boxes = crop_boxes(64, height, width, ViewConfig(), g).double()
    boxes[0] = torch.tensor([0.0, 0.0, height, width])  # the whole image: samples clamped at the border
    boxes[1] = torch.tensor([height - 3.0, width - 2.5, 3.0, 2.5])  # a tiny box in the corner
    flip = torch.rand(64, generator=g) < 0.5
    ours = resized_crop(x, boxes, flip, 12, supersample)
    assert ours.shape == (64, 3, 12, 12)
    torch.testing.assert_close(ours, grid_sample_crop(x, boxes, flip, 12, supersample), rtol=0, atol=1e-10)


def test_views_differ_keep_shape_and_range():
    images = np.random.default_rng(0).integers(0, 256, (16, 40, 40, 3), dtype=np.uint8)
    v1, v2 = two_views(images, torch.Generator().manual_seed(1))
    assert v1.shape == v2.shape == (16, 3, 32, 32) and v1.dtype == torch.float32
    assert torch.isfinite(v1).all() and torch.isfinite(v2).all()
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    for v in (v1, v2):
        per_channel = v.transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= lo - 1e-4).all() and (per_channel.max(1).values <= hi + 1e-4).all()
    assert (v1 - v2).abs().flatten(1).amax(1).min() > 0.05  # every image's two views differ
    # same generator seed -> same views; another seed -> other views
    w1, _ = two_views(images, torch.Generator().manual_seed(1))
    u1, _ = two_views(images, torch.Generator().manual_seed(2))
    assert torch.equal(v1, w1) and not torch.allclose(v1, u1)


def test_grayscale_rate_is_about_one_fifth():
    images = np.random.default_rng(1).integers(0, 256, (1000, 16, 16, 3), dtype=np.uint8)
    cfg = ViewConfig(size=8, brightness=0, contrast=0, saturation=0, hue=0)
    v, _ = two_views(images, torch.Generator().manual_seed(3), cfg)
    rgb = v * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    gray = ((rgb[:, 0] - rgb[:, 1]).abs().amax((1, 2)) < 1e-5) & ((rgb[:, 1] - rgb[:, 2]).abs().amax((1, 2)) < 1e-5)
    assert 0.15 < gray.float().mean() < 0.25
