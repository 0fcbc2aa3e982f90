"""DP-SGD step throughput and memory: non-private vs this engine vs Opacus, side by side.

Every (model, K, method) configuration runs in its own subprocess (so peak RSS is its own), all
with the same model, images per step, threads and inputs. Methods:

* ``nonprivate``: forward + backward of the mean loss over the same images + SGD step;
* ``engine``: one :class:`dprandp.privacy.DPSGD` step (layer-wise per-sample gradients, K views
  averaged before clipping, noise, SGD step);
* ``engine-vmap``: the same step with the ``torch.func`` (vmap over grad) engine;
* ``opacus``: Opacus ``GradSampleModule`` hooks computing per-view gradients, averaged over the K
  views per sample, then clipped, summed, noised and applied (the reference code's recipe);
* ``*-phase2``: the trunk frozen (only final norm + head trainable), as in Phase II.

Usage: ``python bench/dpsgd.py [--threads 1] [--images 64] [--steps 3]`` (about 10 min on 2 cores).
``img/s`` counts images (views) through the network; ``samples/s`` counts private samples.
Peak memory: (max RSS during the steps - RSS before) / samples per physical batch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("nonprivate", "engine", "engine-vmap", "opacus", "nonprivate-phase2", "engine-phase2", "opacus-phase2")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_child(spec: dict) -> dict:
    import torch
    from torch.nn import functional as F

    from dprandp.models import create_model
    from dprandp.privacy import DPSGD, DPConfig

    torch.set_num_threads(spec["threads"])
    model_name, k, images, method = spec["model"], spec["augmult"], spec["images"], spec["method"]
    samples = max(1, images // k)
    model = create_model(model_name, num_classes=10, seed=0)
    if method.endswith("phase2"):
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(model.PRIOR_LACKS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, k, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (samples,), generator=gen)
    cfg = DPConfig(sample_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=samples, augmult=k,
                   physical_batch_size=samples)

    if method.startswith("nonprivate"):
        flat, yy = x.reshape(-1, 3, 32, 32), y.repeat_interleave(k)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(flat), yy).backward()
            opt.step()

    elif method.startswith("engine"):
        dp = DPSGD(model, opt, config=cfg, noise_generator=torch.Generator().manual_seed(1),
                   method="vmap" if method == "engine-vmap" else "layerwise", multi_view=True)

        def step():
            dp.step(x, y)

    elif method.startswith("opacus"):
        from opacus import GradSampleModule

        gsm = GradSampleModule(model, loss_reduction="sum")
        flat, yy = x.reshape(-1, 3, 32, 32), y.repeat_interleave(k)
        noise_gen = torch.Generator().manual_seed(1)

        def step():
            for p in params:
                p.grad_sample = None
            loss = F.cross_entropy(gsm(flat), yy, reduction="sum") / k
            loss.backward()
            gs = [p.grad_sample.reshape(samples, k, *p.shape).sum(1) for p in params]  # mean-of-views grads
            norms = torch.stack([g.reshape(samples, -1).norm(dim=1) for g in gs], 1).norm(dim=1)
            factors = (cfg.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for p, g in zip(params, gs):
                total = torch.einsum("i,i...->...", factors, g)
                total += cfg.noise_std * torch.randn(total.shape, generator=noise_gen)
                p.grad = total / cfg.batch_size
            opt.step()
    else:
        raise SystemExit(f"unknown method {method}")

    for _ in range(spec["warmup"]):
        step()
    base = _rss_mb()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = statistics.median(times)
    return {**spec, "samples": samples, "seconds": t, "img_per_s": samples * k / t, "samples_per_s": samples / t,
            "mem_mb_per_sample": max(0.0, peak - base) / samples, "peak_rss_mb": peak, "times": times}


def run_all(args) -> list[dict]:
    results = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT / "src"))
    for model in args.models:
        for k in args.augmults:
            for method in args.methods:
                steps = args.steps if model != "wrn-16-1" else args.steps * 2
                spec = dict(model=model, augmult=k, images=args.images, method=method, threads=args.threads,
                            warmup=args.warmup, steps=steps)
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True, env=env)
                if proc.returncode != 0:
                    print(f"{model} K={k} {method}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(res)
                print(f"{model:9s} K={k:<2d} {method:18s} {res['img_per_s']:7.1f} img/s {res['samples_per_s']:7.2f} samples/s "
                      f"{res['mem_mb_per_sample']:7.1f} MB/sample  ({time.perf_counter() - t0:.0f}s wall)", flush=True)
    return results


def table(results: list[dict]) -> str:
    by = {(r["model"], r["augmult"], r["method"]): r for r in results}
    lines = [
        "| model | K | method | img/s | samples/s | time / non-private | engine speed-up vs this | MB / sample |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (model, k, method), r in by.items():
        phase2 = method.endswith("phase2")
        base = by.get((model, k, "nonprivate-phase2" if phase2 else "nonprivate"))
        eng = by.get((model, k, "engine-phase2" if phase2 else "engine"))
        ratio = f"{r['seconds'] / base['seconds']:.2f}x" if base else "-"
        speed = f"{r['seconds'] / eng['seconds']:.2f}x" if eng and not method.startswith("engine") else "-"
        lines.append(f"| {model} | {k} | {method} | {r['img_per_s']:.1f} | {r['samples_per_s']:.2f} | {ratio} | {speed} | "
                     f"{r['mem_mb_per_sample']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=64, help="images (views) per physical step; samples = images / K")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--models", default="wrn-16-1,wrn-16-4")
    ap.add_argument("--augmults", default="1,16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    ap.add_argument("--json", help="also save raw results here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    args.models = args.models.split(",")
    args.augmults = [int(v) for v in args.augmults.split(",")]
    args.methods = args.methods.split(",")
    results = run_all(args)
    md = table(results)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from bench._report import write_section

        notes = (
            "## DP-SGD step: non-private vs dprandp engine vs Opacus\n\n"
            f"{args.images} images per step (K = 1: {args.images} samples; K = 16: {args.images // 16} samples x 16 views), "
            f"{args.threads} thread(s), median of {args.steps} timed steps after {args.warmup} warm-up (wrn-16-1: 2x the steps), "
            "each configuration in its own process. `time / non-private` compares with the non-private step of the same "
            "trainable set; `engine speed-up vs this` = this method's step time / the engine's. Memory: peak RSS growth "
            "during the steps per private sample.\n\n" + md
        )
        write_section("dpsgd", notes + "\n\n" + getattr(args, "extra", ""),
                      command="python bench/dpsgd.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
