"""StyleGAN-Oriented's shared noise map: ours (drawn at the output size) against the original's (512 px).

The original draws the 1/f^alpha map at 512 px, scales it to unit std there and area-downsamples it
to every layer; ``stylegan-oriented`` draws it at the output size (64 px) and scales it there, and
``stylegan-oriented-n512`` does what the original does. This measures, side by side in one run:

1. the std of the map as each layer sees it (64 / 16 / 4 px; before the layer's strength U(0, 0.3)),
   at alpha = 0.5, 1, 1.5 and over alpha ~ U(0.5, 1.5), over ``--seeds`` maps per cell;
2. the render cost per 64-px image of both processes (interleaved repetitions; the ratio is the number).

Whether the weaker noise makes a better prior is measured by the DP arm on validation (BENCHMARKS.md,
``utility_tuning``); this section states what the two processes are.

    python bench/noise_map.py [--seeds 20] [--images 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import write_section  # noqa: E402
from dprandp.processes import get_process  # noqa: E402
from dprandp.processes.noise import area_pyramid, pink_noise  # noqa: E402

LAYERS = (64, 16, 4)


def layer_std(draw_size: int, alpha: float | None, seeds: int) -> dict[int, float]:
    """Mean over ``seeds`` maps of the std at each layer resolution, for a map drawn at ``draw_size``."""
    out = {r: [] for r in LAYERS}
    for s in range(seeds):
        levels = area_pyramid(pink_noise(np.random.default_rng(s), draw_size, alpha=alpha))
        for r in LAYERS:
            out[r].append(float(levels[r].std()))
    return {r: statistics.mean(v) for r, v in out.items()}


def render_ms(names: tuple[str, ...], images: int, repeats: int) -> dict[str, list[float]]:
    """ms per image of each process, repetitions interleaved so that both see the same machine."""
    procs = {n: get_process(n) for n in names}
    for p in procs.values():
        p.render([0], seed=0, size=64)  # warm-up
    times = {n: [] for n in names}
    for rep in range(repeats):
        for n, p in procs.items():
            t0 = time.perf_counter()
            p.render(np.arange(rep * images, (rep + 1) * images), seed=0, size=64)
            times[n].append(1e3 * (time.perf_counter() - t0) / images)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    lines = ["## Phase I noise map: ours (64 px) against the original's (512 px) (bench/noise_map.py)", "",
             f"Std of the shared 1/f^α noise map as each StyleGAN layer sees it (before the layer's strength "
             f"U(0, 0.3)), mean over {a.seeds} maps per cell:", "",
             "| α | layer | `stylegan-oriented` (drawn at 64 px) | `stylegan-oriented-n512` (drawn at 512 px, the original) | ratio ours / original |",
             "| --- | --- | --- | --- | --- |"]
    for alpha, label in ((0.5, "0.5"), (1.0, "1"), (1.5, "1.5"), (None, "U(0.5, 1.5)")):
        ours, orig = layer_std(64, alpha, a.seeds), layer_std(512, alpha, a.seeds)
        for r in LAYERS:
            lines.append(f"| {label} | {r} px | {ours[r]:.2f} | {orig[r]:.2f} | {ours[r] / orig[r]:.2f}x |")
    times = render_ms(("stylegan-oriented", "stylegan-oriented-n512"), a.images, a.repeats)
    med = {n: statistics.median(v) for n, v in times.items()}
    lines += ["", f"Render cost per 64-px image, one process, {a.images} images x {a.repeats} interleaved repetitions "
              "(median):", "", "| process | ms per image | runs | ratio to `stylegan-oriented` |", "| --- | --- | --- | --- |"]
    for n, v in times.items():
        lines.append(f"| `{n}` | {med[n]:.1f} | {', '.join(f'{x:.1f}' for x in v)} | "
                     f"{med[n] / med['stylegan-oriented']:.2f}x |")
    lines += ["", "Whether the weaker noise makes a better prior is measured by the DP arm on validation: "
              "section `utility_tuning`, session 25.", "", f"Bench wall time: {(time.perf_counter() - t0) / 60:.1f} min."]
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section("noise_map", text)


if __name__ == "__main__":
    main()
