"""Vectorised random crop + flip against a slow per-image reference."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from dprandp.augment import random_crop_flip
from dprandp.errors import InputError


def test_every_view_is_a_crop_of_the_padded_image_possibly_flipped():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, 10, generator=gen)
    out = random_crop_flip(x, augmult=7, generator=torch.Generator().manual_seed(1), padding=2)
    assert out.shape == (5, 7, 3, 8, 10) and out.dtype == x.dtype
    seen_offsets, flips = set(), 0
    for i in range(5):
        padded = F.pad(x[i : i + 1], (2, 2, 2, 2), mode="reflect")[0]
        for k in range(7):
            matches = []
            for dy in range(5):
                for dx in range(5):
                    crop = padded[:, dy : dy + 8, dx : dx + 10]
                    if torch.equal(out[i, k], crop):
                        matches.append((dy, dx, False))
                    if torch.equal(out[i, k], crop.flip(-1)):
                        matches.append((dy, dx, True))
            assert len(matches) == 1, (i, k, matches)
            seen_offsets.add(matches[0][:2])
            flips += matches[0][2]
    assert len(seen_offsets) > 10 and 5 < flips < 30  # 35 views: offsets vary, about half flipped


def test_matches_loop_reference_given_the_same_draws():
    """Re-draw the same offsets/flips from an identically seeded generator and crop in a loop."""
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    out = random_crop_flip(x, augmult=3, generator=torch.Generator().manual_seed(4), padding=4 - 1)
    g = torch.Generator().manual_seed(4)
    offsets = torch.randint(0, 7, (4, 3, 2), generator=g)
    flips = torch.randint(0, 2, (4, 3), generator=g)
    padded = F.pad(x, (3, 3, 3, 3), mode="reflect")
    for i in range(4):
        for k in range(3):
            dy, dx = offsets[i, k].tolist()
            crop = padded[i, :, dy : dy + 6, dx : dx + 6]
            if flips[i, k]:
                crop = crop.flip(-1)
            assert torch.equal(out[i, k], crop)


def test_no_padding_no_flip_is_identity_and_reproducible():
    x = torch.randn(2, 1, 4, 4)
    out = random_crop_flip(x, augmult=2, generator=torch.Generator(), padding=0, flip=False)
    assert torch.equal(out, x[:, None].expand(2, 2, 1, 4, 4))
    y = torch.randn(2, 1, 8, 8)
    a = random_crop_flip(y, augmult=2, generator=torch.Generator().manual_seed(5))
    b = random_crop_flip(y, augmult=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "x, kw, match",
    [
        (torch.zeros(2, 3, 8), {}, "B, C, H, W"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), {}, "floating"),
        (torch.zeros(2, 3, 8, 8), {"augmult": 0}, "augmult"),
        (torch.zeros(2, 3, 4, 4), {"padding": 4}, "padding"),
    ],
)
def test_bad_input(x, kw, match):
    args = {"augmult": 2, "generator": torch.Generator()} | kw
    with pytest.raises(InputError, match=match):
        random_crop_flip(x, **args)
