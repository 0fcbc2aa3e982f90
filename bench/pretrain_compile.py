"""Phase I step with ``torch.compile`` against eager, side by side, on this machine.

The real Phase I step of a preset (two views, forward under the precision ``auto`` picks, the
contrastive loss, backward, SGD) timed eagerly and through ``torch.compile`` (inductor), rounds
interleaved so that both see the same machine load. The views are made once up front, so the ratio
is the model's alone; the views' own cost is reported beside it. Compilation time is reported
separately (it is paid once per run).

    python bench/pretrain_compile.py [--preset cpu] [--threads 1] [--rounds 5]

Writes the ``pretrain_compile`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# A fresh inductor cache, so that the set-up column is a cold compilation, as a user's first run pays.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import write_section  # noqa: E402
from dprandp.pretrain import ContrastiveModel, preset, two_views  # noqa: E402
from dprandp.pretrain.precision import resolve_precision  # noqa: E402
from dprandp.pretrain.trainer import train_step  # noqa: E402


def make_step(cfg, compiled: bool, bf16: bool):
    torch.manual_seed(0)
    model = ContrastiveModel(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr * 1e-3, momentum=cfg.momentum)  # tiny lr: timing only
    forward = torch.compile(model) if compiled else model

    def step(x: torch.Tensor) -> float:
        t = time.perf_counter()
        train_step(model, opt, x, cfg, bf16=bf16, forward=forward)
        return time.perf_counter() - t

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0, load = time.perf_counter(), os.getloadavg()[0]
    cfg = preset(a.preset)
    precision = resolve_precision("auto", torch.device("cpu"))
    bf16 = precision == "bf16"
    images = np.random.default_rng(0).integers(0, 256, (cfg.batch_size, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    batches = [torch.cat(two_views(images, gen)) for _ in range(a.rounds + 2)]
    views_s = (time.perf_counter() - t) / len(batches)
    steps, setup = {}, {}
    for name in ("eager", "compiled"):
        t = time.perf_counter()
        steps[name] = make_step(cfg, name == "compiled", bf16)
        steps[name](batches[0])  # warm-up: oneDNN primitives; for "compiled", the graph compilation
        steps[name](batches[1])
        setup[name] = time.perf_counter() - t
        print(name, f"set-up and two steps: {setup[name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(a.rounds):
        for name in times:
            times[name].append(steps[name](batches[2 + r]))
    med = {n: statistics.median(ts) for n, ts in times.items()}
    ratio = med["eager"] / med["compiled"]
    lines = [
        f"## Phase I with `torch.compile` against eager (bench/pretrain_compile.py)\n",
        f"The `{a.preset}` preset's Phase I step ({cfg.model}, head {cfg.hidden}, batch {cfg.batch_size}, two views each, "
        f"{precision} autocast as `--precision auto` picks here), {a.threads} thread(s), torch {torch.__version__}; "
        f"{a.rounds} interleaved rounds after two warm-up steps each; median seconds per step. The compiled set-up "
        f"is a cold compilation (an empty inductor cache). Load average before the run: {load:.1f}.", "",
        "| mode | s / step | images / s | set-up + 2 warm-up steps |", "| --- | --- | --- | --- |",
    ]
    for n in ("eager", "compiled"):
        lines.append(f"| {n} | {med[n]:.3f} | {cfg.batch_size / med[n]:.0f} | {setup[n]:.1f} s |")
    verdict = ("faster" if ratio > 1.05 else "slower" if ratio < 0.95 else "no faster")
    lines += ["", f"Compiled / eager speed: **{ratio:.2f}x** ({verdict}). Making the two views of a batch: "
              f"{views_s:.3f} s ({100 * views_s / (views_s + med['eager']):.0f} % of an eager step with its views).",
              "", f"Bench wall time: {(time.perf_counter() - t0) / 60:.1f} min."]
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section("pretrain_compile", text)


if __name__ == "__main__":
    main()
