"""DP-SGD step throughput and memory: non-private vs this engine vs Opacus, side by side.

One subprocess per (model, K) builds every method on the same model initialisation, images,
threads and inputs, then times their steps *interleaved* round by round (the machine is shared;
interleaving keeps the ratios honest when the load drifts) and reports the best and median step.
Peak memory: each method runs two steps in a process forked before any warm-up, and reports its
max RSS growth. Methods:

* ``nonprivate``: forward + backward of the mean loss over the same images + SGD step;
* ``engine``: one :class:`dprandp.privacy.DPSGD` step (layer-wise per-sample gradients, K views
  averaged before clipping, noise, SGD step);
* ``engine-vmap``: the same step with the ``torch.func`` (vmap over grad) engine;
* ``opacus``: Opacus ``GradSampleModule`` hooks computing per-view gradients, averaged over the K
  views per sample, then clipped, summed, noised and applied (the reference code's recipe);
* ``*-phase2``: the trunk frozen (only final norm + head trainable), as in Phase II.
* ``engine-freeze1``/``engine-freeze2`` (ask with ``--methods``): Phase III with the trunk's first
  one or two stages frozen (``--freeze-stages``); ``engine speed-up vs this`` compares them with
  the full fine-tuning step.
* ``engine-bf16``/``nonprivate-bf16`` (ask with ``--methods``): the same steps with the forward and
  backward passes under bf16 autocast (``--precision bf16``; the engine still clips in float32).

Usage: ``python bench/dpsgd.py [--threads 1] [--images 64] [--rounds 3]`` (about 10 min on 2 cores).
``img/s`` counts images (views) through the network; ``samples/s`` counts private samples.
Memory per sample: (max RSS of the forked process - RSS at the fork) / samples per step.
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


def _make_step(method: str, spec: dict):
    """Build a fresh model and the step function of ``method``; returns (step, samples)."""
    import torch
    from torch.nn import functional as F

    from dprandp.models import create_model
    from dprandp.privacy import DPSGD, DPConfig

    k, images = spec["augmult"], spec["images"]
    samples = max(1, images // k)
    model = create_model(spec["model"], num_classes=10, seed=0, head_pool=spec.get("head_pool", 1))
    bf16 = method.endswith("-bf16")
    if method.endswith("phase2"):
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(model.PRIOR_LACKS))
    if "-freeze" in method:
        frozen = model.frozen_prefixes(int(method.rsplit("freeze", 1)[1]))
        for n, p in model.named_parameters():
            p.requires_grad_(not n.startswith(frozen))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, k, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (samples,), generator=gen)
    flat, yy = x.reshape(-1, 3, 32, 32), y.repeat_interleave(k)
    cfg = DPConfig(sample_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=samples, augmult=k,
                   physical_batch_size=samples)

    if method.startswith("nonprivate"):

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(flat)
            F.cross_entropy(logits.float(), yy).backward()
            opt.step()

    elif method.startswith("engine"):
        dp = DPSGD(model, opt, config=cfg, noise_generator=torch.Generator().manual_seed(1),
                   method="vmap" if method == "engine-vmap" else "layerwise", multi_view=True,
                   precision="bf16" if bf16 else "fp32")

        def step():
            dp.step(x, y)

    elif method.startswith("opacus"):
        from opacus import GradSampleModule

        gsm = GradSampleModule(model, loss_reduction="sum")
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
    return step, samples


def _peak_mb_per_sample(method: str, spec: dict) -> float:
    """Two steps of ``method`` in a forked process: its max RSS growth per sample (MB)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: build, run, report, leave without running any atexit handler
        try:
            os.close(read)
            base = _rss_mb()
            step, samples = _make_step(method, spec)
            step()
            step()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            os.write(write, json.dumps((peak - base) / samples).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text) if text else float("nan")


def run_child(spec: dict) -> list[dict]:
    import random

    import torch

    torch.set_num_threads(spec["threads"])
    methods = spec["methods"]
    memory = {m: _peak_mb_per_sample(m, spec) for m in methods}
    steps = {}
    for m in methods:
        steps[m], samples = _make_step(m, spec)
        for _ in range(spec["warmup"]):
            steps[m]()
    times = {m: [] for m in methods}
    order = list(methods)
    rng = random.Random(0)
    for _ in range(spec["rounds"]):
        rng.shuffle(order)
        for m in order:
            t0 = time.perf_counter()
            steps[m]()
            times[m].append(time.perf_counter() - t0)
    out = []
    k = spec["augmult"]
    for m in methods:
        samples = max(1, spec["images"] // k)
        best, med = min(times[m]), statistics.median(times[m])
        out.append({"model": spec["model"], "augmult": k, "method": m, "samples": samples, "seconds": best,
                    "median_seconds": med, "img_per_s": samples * k / best, "samples_per_s": samples / best,
                    "mem_mb_per_sample": memory[m], "times": times[m]})
    return out


def run_all(args) -> list[dict]:
    results = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT / "src"))
    for model in args.models:
        for k in args.augmults:
            rounds = args.rounds if model != "wrn-16-1" else args.rounds * 2
            spec = dict(model=model, augmult=k, images=args.images, methods=args.methods, threads=args.threads,
                        warmup=args.warmup, rounds=rounds, head_pool=args.head_pool)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, env=env)
            if proc.returncode != 0:
                print(f"{model} K={k}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                continue
            for res in json.loads(proc.stdout.strip().splitlines()[-1]):
                results.append(res)
                print(f"{model:9s} K={k:<2d} {res['method']:18s} {res['img_per_s']:7.1f} img/s "
                      f"{res['samples_per_s']:7.2f} samples/s  median {res['median_seconds']:.2f}s  "
                      f"{res['mem_mb_per_sample']:7.1f} MB/sample", flush=True)
            print(f"  ({time.perf_counter() - t0:.0f}s wall)", flush=True)
    return results


def table(results: list[dict]) -> str:
    by = {(r["model"], r["augmult"], r["method"]): r for r in results}
    lines = [
        "| model | K | method | img/s | samples/s | median step (s) | time / non-private | engine speed-up vs this | MB / sample |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (model, k, method), r in by.items():
        phase2 = method.endswith("phase2")
        base = by.get((model, k, "nonprivate-phase2" if phase2 else "nonprivate"))
        eng = by.get((model, k, "engine-phase2" if phase2 else "engine"))
        ratio = f"{r['seconds'] / base['seconds']:.2f}x" if base else "-"
        variant = "-freeze" in method or method.endswith("-bf16")
        speed = f"{r['seconds'] / eng['seconds']:.2f}x" if eng and (not method.startswith("engine") or variant) else "-"
        lines.append(f"| {model} | {k} | {method} | {r['img_per_s']:.1f} | {r['samples_per_s']:.2f} | {r['median_seconds']:.2f} | {ratio} | {speed} | "
                     f"{r['mem_mb_per_sample']:.1f} |")
    return "\n".join(lines)


def _without_option(argv: list[str], flag: str) -> list[str]:
    """``argv`` less ``flag VALUE`` (the section records the measuring command, not a re-render)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=64, help="images (views) per physical step; samples = images / K")
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per method (interleaved); wrn-16-1: 2x")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--models", default="wrn-16-1,wrn-16-4")
    ap.add_argument("--augmults", default="1,16")
    ap.add_argument("--head-pool", type=int, default=1, help="the head reads a P x P grid of pooled features")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--section", default="dpsgd",
                    help="BENCHMARKS.md section (e.g. dpsgd_freeze for a --methods subset)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    ap.add_argument("--json", help="also save raw results here")
    ap.add_argument("--notes", help="markdown file appended to the section (analysis of the numbers)")
    ap.add_argument("--from-json", help="render the section from results saved by --json instead of running")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    args.models = args.models.split(",")
    args.augmults = [int(v) for v in args.augmults.split(",")]
    args.methods = args.methods.split(",")
    results = json.loads(Path(args.from_json).read_text()) if args.from_json else run_all(args)
    md = table(results)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        import torch

        from bench._report import write_section

        torch.set_num_threads(args.threads)  # so the section's machine stamp shows the threads used

        title = ("## DP-SGD step: non-private vs dprandp engine vs Opacus" if args.section == "dpsgd"
                 else f"## DP-SGD step ({args.section}): {', '.join(args.methods)}")
        notes = (
            title + "\n\n"
            f"{args.images} images per step (K = 1: {args.images} samples; K = 16: {args.images // 16} samples x 16 views), "
            f"{args.threads} thread(s), "
            + (f"the head reading a {args.head_pool} x {args.head_pool} grid of pooled features, " if args.head_pool > 1 else "")
            + f"best of {args.rounds} interleaved timed steps per method after {args.warmup} warm-up "
            "(wrn-16-1: 2x the rounds), one process per model and K. `time / non-private` compares with the non-private step "
            "of the same "
            "trainable set; `engine speed-up vs this` = this method's step time / the engine's. Memory: peak RSS growth "
            "over two steps in a forked process, per private sample.\n\n" + md
        )
        write_section(args.section, notes + ("\n\n" + Path(args.notes).read_text() if args.notes else ""),
                      command="python bench/dpsgd.py " + " ".join(_without_option(sys.argv[1:], "--from-json")))


if __name__ == "__main__":
    main()
