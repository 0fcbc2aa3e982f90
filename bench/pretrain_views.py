"""Phase I views: the separable crop and closed-form hue against the implementation they replaced.

Until session 17 each view was cropped with ``F.affine_grid`` + ``F.grid_sample`` at twice the output
size and average-pooled, and its hue rotated by building HSV images and converting back. Both are
kept here, as the reference (the tests check that the new code gives the same numbers). Measured,
interleaved round by round so that both see the same machine load:

1. each operation alone on a Phase I batch (128 images of 64 px -> 32 px views);
2. ``two_views`` with the new and with the old operations;
3. the whole Phase I step of the ``cpu`` preset (views + forward + loss + backward + SGD), both ways.

    python bench/pretrain_views.py [--threads 2] [--rounds 15]

Writes the ``pretrain_views`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import write_section
from dprandp.pretrain import (
    ContrastiveModel,
    preset,
    views,
)
from dprandp.pretrain.precision import resolve_precision
from dprandp.pretrain.trainer import train_step


def grid_sample_crop(x, boxes, flip, size, supersample=2):
    """The old crop, and the definition the tests check the new one against: the box's affine grid,
    sampled at ``supersample`` times the size, average-pooled."""
    b, _, height, width = x.shape
    top, left, h, w = boxes.to(x.device, x.dtype).unbind(1)
    sx = (w / width) * torch.where(flip.to(x.device), -1.0, 1.0)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, (2 * left + w) / width - 1], 1),
                         torch.stack([zero, h / height, (2 * top + h) / height - 1], 1)], 1)
    s = size * supersample
    grid = F.affine_grid(theta.to(x.dtype), [b, x.shape[1], s, s], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(out, supersample) if supersample > 1 else out


def hsv_round_trip_hue(x, shift):
    """The old hue: RGB -> HSV images, rotate h, HSV -> RGB."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = torch.where(maxc == r, torch.remainder((g - b) / safe, 6.0),
                    torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    h = torch.remainder(h + shift.view(-1, 1, 1).to(x.dtype), 1.0)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    m = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return maxc.unsqueeze(1) - maxc.unsqueeze(1) * s.unsqueeze(1) * m


def old_views():
    """``dprandp.pretrain.views`` as it was: the old crop and hue patched in."""
    ops = (views.adjust_brightness, views.adjust_contrast, views.adjust_saturation, hsv_round_trip_hue)
    return mock.patch.multiple(views, resized_crop=grid_sample_crop, _JITTER_OPS=ops)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = preset("cpu")
    images = np.random.default_rng(0).integers(0, 256, (cfg.batch_size, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    x = views.to_float_batch(images)
    g = torch.Generator().manual_seed(0)
    vc = views.ViewConfig(size=cfg.crop_size)
    boxes = views.crop_boxes(len(x), x.shape[2], x.shape[3], vc, g)
    flip = torch.rand(len(x), generator=g) < 0.5
    crops = views.resized_crop(x, boxes, flip, vc.size).clamp(0, 1)
    shift = torch.empty(len(x)).uniform_(-0.4, 0.4, generator=g)
    model = ContrastiveModel(cfg)
    bf16 = resolve_precision("auto", torch.device("cpu")) == "bf16"
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=cfg.momentum)  # timing only

    def step():
        train_step(model, opt, torch.cat(views.two_views(images, g, vc)), cfg, bf16=bf16)

    def with_old(fn):
        def run():
            with old_views():
                fn()
        return run

    cases = {
        "crop": (lambda: views.resized_crop(x, boxes, flip, vc.size), lambda: grid_sample_crop(x, boxes, flip, vc.size)),
        "hue": (lambda: views.adjust_hue(crops, shift), lambda: hsv_round_trip_hue(crops, shift)),
        "two_views": (lambda: views.two_views(images, g, vc), with_old(lambda: views.two_views(images, g, vc))),
        "Phase I step": (step, with_old(step)),
    }
    times = {name: ([], []) for name in cases}
    for name, (new, old) in cases.items():  # warm-up
        new(), old()
    for _ in range(a.rounds):
        for name, (new, old) in cases.items():
            times[name][0].append(timed(new))
            times[name][1].append(timed(old))
    med = {name: (1e3 * statistics.median(n), 1e3 * statistics.median(o)) for name, (n, o) in times.items()}
    what = {"crop": "resize-crop + flip of one view (2x supersampled bilinear)",
            "hue": "hue rotation of one view", "two_views": "both views of the batch (crop, jitter, grayscale, normalise)",
            "Phase I step": f"the whole step (views + {cfg.model} forward/backward, {'bf16' if bf16 else 'fp32'}, SGD)"}
    rows = [f"| {name} | {what[name]} | {o:.1f} | {n:.1f} | **{o / n:.2f}x** |" for name, (n, o) in med.items()]
    step_new, step_old = med["Phase I step"]
    minutes = {n: cfg.epochs * (n // cfg.batch_size) * (step_old - step_new) / 6e4 for n in (24_000, 36_000)}
    md = ("## Phase I views: separable crop and closed-form hue against the old operations (bench/pretrain_views.py)\n\n"
          f"`cpu` preset batch: {cfg.batch_size} images of {cfg.image_size} px -> two {vc.size} px views; "
          f"{a.threads} threads; medians of {a.rounds} interleaved rounds (ms).\n\n"
          "| what | measures | old (grid_sample, HSV round trip) | new (two matmuls, closed form) | speed-up |\n"
          "| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n\n"
          f"At this step time, {cfg.epochs} epochs save {minutes[24_000]:.1f} min of Phase I on 24k images and "
          f"{minutes[36_000]:.1f} min on 36k. The new operations give the same numbers as the old ones "
          "(float64 tests: the crop to 1e-10 against `F.grid_sample`, the hue to 1e-5 against torchvision).")
    print(md)
    if not a.no_write:
        write_section("pretrain_views", md)


if __name__ == "__main__":
    main()
