"""The ghost norm's cost: float32 Gram matrices (before session 26) against float64 with a rigorous bound.

The ghost route (``dprandp.privacy.layerwise``) computes a conv layer's per-sample gradient norms
from Gram matrices without materialising the per-sample gradients; it serves WRN-16-4's last stage
(256 channels on an 8 x 8 map) when its Gram matrices are smaller than the per-sample gradients:
K <= 2 views (the `paper` preset's K = 16 materialises the per-sample gradients instead). Session 26 moved its Gram sum to float64
and added a worst-case rounding bound, because in float32 the sum cancelled for a crafted record
(norm 0, record unclipped). This times, side by side in one process (interleaved repetitions):

1. the norm alone, old (float32 Gram) and new (:func:`ghost_sq_norm_upper`), on that layer's shapes
   (B samples x K views x 64 positions; fan-in 2304, 256 output channels);
2. one whole ``clip_and_sum`` of a WRN-16-4 chunk with the new norm against the same chunk with the
   old norm patched back in.

    python bench/ghost_norm.py [--samples 16] [--repeats 3] [--threads 2] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import write_section  # noqa: E402
from dprandp.models import create_model  # noqa: E402
from dprandp.privacy import clip_and_sum, layerwise  # noqa: E402

NEW = layerwise.ghost_sq_norm_upper


def old_norm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The float32 Gram formula as it was before session 26 (no bound)."""
    return (torch.bmm(x.transpose(1, 2), x) * torch.bmm(g.transpose(1, 2), g)).sum(dim=(1, 2))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    lines = ["## Ghost norm: float32 Gram (before) against float64 with a rigorous bound (bench/ghost_norm.py)", "",
             f"CPU, {a.threads} threads, median of {a.repeats} interleaved repetitions. The norm alone on WRN-16-4's "
             f"last-stage shapes ({a.samples} samples x K views x 64 positions, fan-in 2304, 256 channels):", "",
             "| K | float32 Gram (before) | float64 + bound (now) | ratio |", "| --- | --- | --- | --- |"]
    for k in (1, 2):  # the only K the ghost route takes on WRN-16-4's 8 x 8 map (layerwise._use_ghost)
        x = torch.randn(a.samples, 2304, 64 * k, generator=gen)
        g = torch.randn(a.samples, 256, 64 * k, generator=gen)
        NEW(x[:1], g[:1]), old_norm(x[:1], g[:1])  # warm-up
        old_t, new_t = [], []
        for _ in range(a.repeats):
            old_t += timed(lambda: old_norm(x, g), 1)
            new_t += timed(lambda: NEW(x, g), 1)
        o, n = statistics.median(old_t), statistics.median(new_t)
        lines.append(f"| {k} | {1e3 * o:.0f} ms | {1e3 * n:.0f} ms | {n / o:.2f}x |")
    model = create_model("wrn-16-4", num_classes=10, seed=0)
    k = 2
    xs = torch.randn(a.samples, k, 3, 32, 32, generator=gen)
    ys = torch.randint(0, 10, (a.samples,), generator=gen)
    clip_and_sum(model, xs[:2], ys[:2], max_grad_norm=1.0)  # the once-per-model self-check, and a warm-up

    def step():
        clip_and_sum(model, xs, ys, max_grad_norm=1.0)

    used = []
    layerwise.ghost_sq_norm_upper = lambda x, g: used.append(x.shape) or NEW(x, g)
    step()
    assert used, "the chunk took no ghost layer: nothing to compare"
    old_t, new_t = [], []
    for _ in range(a.repeats):
        layerwise.ghost_sq_norm_upper = old_norm
        try:
            old_t += timed(step, 1)
        finally:
            layerwise.ghost_sq_norm_upper = NEW
        new_t += timed(step, 1)
    o, n = statistics.median(old_t), statistics.median(new_t)
    lines += ["", f"One whole `clip_and_sum` of a WRN-16-4 chunk ({a.samples} samples x K = {k} views, 32 px, "
              f"layer-wise route; {len(used)} layers take the ghost norm): {o:.2f} s with the float32 Gram, {n:.2f} s now ({n / o:.2f}x).", "",
              "On a GPU float64 runs at the float32 rate on A100/H100-class cards (the DP step runs with TF32 off) "
              "but at 1/32-1/64 on consumer cards: not measured here."]
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section("ghost_norm", text)


if __name__ == "__main__":
    main()
