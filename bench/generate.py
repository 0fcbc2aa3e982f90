"""Random-process generation speed, and the StyleGAN fast path against the full-width reference.

    python bench/generate.py [--store-images 1000] [--no-write]

1. Images per second of every process at 32, 64 and 128 px: one process, torch with one thread
   (how ``dprandp generate`` runs each worker); wall-clock and CPU time per image.
2. StyleGAN-Oriented fast exact path vs the full-width (512-channel, float64) reference on the
   same images, CPU time per image and ratio, at 32 and 64 px.
3. ``dprandp generate``'s store writer at 64 px with 2 workers (spawn start-up included), and the
   time for the 105,000-image Phase I store extrapolated from it.

Timings are for a few hundred images at most and extrapolated; the machine is shared, so the load
average is recorded with the numbers and CPU time is reported next to wall-clock time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import write_section  # noqa: E402
from dprandp.processes import get_process, list_processes  # noqa: E402
from dprandp.processes.store import GenerateRequest, generate  # noqa: E402

PHASE1_IMAGES = 105_000
COUNTS = {  # images timed per size (32, 64, 128 px): enough for a stable rate, a few seconds each
    "stylegan-oriented": (256, 192, 64), "stylegan-highfreq": (128, 96, 32), "stylegan-random": (8, 6, 3),
    "dead-leaves-squares": (48, 32, 8), "dead-leaves-oriented": (48, 32, 8), "dead-leaves-shapes": (48, 32, 8),
    "spectrum": (48, 24, 8),
}


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def throughput_table() -> tuple[str, dict]:
    rows = ["| process | 32 px img/s | 64 px img/s | 128 px img/s | CPU ms/img at 32 / 64 / 128 |",
            "| --- | --- | --- | --- | --- |"]
    cpu64 = {}
    for name in list_processes():
        p = get_process(name)
        p.render([0], seed=0, size=32)  # warm-up
        rates, cpus = [], []
        for size, n in zip((32, 64, 128), COUNTS.get(name, (32, 16, 8))):
            _, wall, cpu = timed(lambda: p.render(np.arange(1000, 1000 + n), seed=0, size=size))
            rates.append(n / wall)
            cpus.append(1e3 * cpu / n)
            if size == 64:
                cpu64[name] = cpus[-1]
        rows.append(f"| {name} | " + " | ".join(f"{r:.1f}" for r in rates) + " | "
                    + " / ".join(f"{c:.1f}" for c in cpus) + " |")
        print(rows[-1], flush=True)
    return "\n".join(rows), cpu64


def fast_vs_reference() -> str:
    p = get_process("stylegan-oriented")
    rows = ["| size | reference (512 ch, float64) CPU s/img | fast path CPU ms/img | ratio | max rel. error |",
            "| --- | --- | --- | --- | --- |"]
    for size, n_ref, n_fast in ((32, 2, 128), (64, 1, 128)):
        ref, _, cpu_ref = timed(lambda: p.network_output(range(n_ref), seed=0, size=size, reference=True))
        fast, _, cpu_fast = timed(lambda: p.network_output(range(n_fast), seed=0, size=size))
        err = max(np.linalg.norm(f - r) / np.linalg.norm(r) for f, r in zip(fast[:n_ref], ref))
        per_ref, per_fast = cpu_ref / n_ref, cpu_fast / n_fast
        rows.append(f"| {size} | {per_ref:.2f} (n={n_ref}) | {1e3 * per_fast:.2f} (n={n_fast}) | "
                    f"{per_ref / per_fast:.0f}x | {err:.1e} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def store_run(n: int, workers: int) -> tuple[str, float]:
    with tempfile.TemporaryDirectory() as d:
        req = GenerateRequest(process="stylegan-oriented", num=n, size=64, seed=0, out=Path(d) / "s.npy",
                              workers=workers)
        summary = generate(req, progress=False)
    rate, steady = summary["images_per_s"], summary["steady_images_per_s"]
    line = (f"`dprandp generate --num {n} --size 64 --workers {workers}`: {summary['seconds']:.1f} s in all "
            f"({rate:.0f} img/s), first chunk after {summary['first_chunk_s']:.1f} s (start-up), then "
            f"**{steady:.0f} img/s** -> 105,000 images in ~{PHASE1_IMAGES / steady / 60:.1f} min; "
            f"CPU {summary['cpu_ms_per_image']:.1f} ms/img over all processes -> "
            f"~{PHASE1_IMAGES * summary['cpu_ms_per_image'] / 1e3 / 2 / 60:.1f} min on 2 free cores")
    print(line, flush=True)
    return line, steady


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store-images", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start = load()
    table, cpu64 = throughput_table()
    versus = fast_vs_reference()
    store1, _ = store_run(args.store_images // 2, 1)
    store2, rate2 = store_run(args.store_images, 2)
    load_end = load()
    cpu_projection = PHASE1_IMAGES * cpu64["stylegan-oriented"] / 1e3 / 2 / 60
    md = f"""## Random-process generation (`bench/generate.py`)

Per process, one worker process, torch with 1 thread (as each `dprandp generate` worker runs):

{table}

StyleGAN-Oriented, fast exact path vs full-width reference on the same images (CPU time, 1 thread):

{versus}

Store writer (`dprandp generate`, 64 px):

- {store1}
- {store2}
- From CPU time alone ({cpu64['stylegan-oriented']:.1f} ms/img at 64 px), 105,000 images on 2 free cores take
  ~{cpu_projection:.1f} min. Target: <= 10 min (>= 175 img/s).

Timed on a few hundred images and extrapolated. The machine is shared with other jobs: load average
(1/5/15 min) {load_start} at the start, {load_end} at the end, so wall-clock rates are pessimistic and
CPU times are the steadier numbers.
"""
    if not args.no_write:
        write_section("generate", md)
    print(md)


if __name__ == "__main__":
    main()
