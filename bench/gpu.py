"""GPU checks, timings and a GPU-trained prior, in one time-boxed run for a lent GPU.

Sections (each writes into ``OUT/gpu.json`` as soon as it ends, so a run cut short keeps what it
measured):

1. ``tests``: ``pytest tests/test_cuda.py`` (CUDA against CPU references, NCCL under torchrun);
2. ``pretrain_throughput``: Phase I images/s of the real ``pretrain()`` loop (two views on the GPU,
   bf16 autocast, channels_last) for the paper model (WRN-16-4, 4096-wide head) at batch 256, 512
   and 1024, and the paper run's time extrapolated (105k images x 200 epochs);
3. ``dp_steps``: paper-preset DP-SGD steps (WRN-16-4, Poisson B = 4096 of N = 50,000, K = 16 and 4, C = 1,
   sigma = 9.3) of Phase II (trunk frozen) and Phase III (all parameters), in float32 and with
   ``--precision bf16``, against a non-private step on the same views at the same precision, and the
   96 + 779 step run extrapolated per K and precision;
4. ``priors``: StyleGAN-Oriented images rendered by CPU worker processes while 1-3 run, then
   a time-boxed Phase I run of the paper model (WRN-16-4); the prior is written to ``OUT`` for the
   CPU experiments (``bench/prior_quality.py``, ``bench/utility.py``).

Usage (the lent GPU): ``python bench/gpu.py --out $OUT --deadline-s 555``; ``--sections tests dp_steps``
re-checks a fix in a short lease (the bf16 Phase III of 2026-11-30 is the next such check). ``--smoke`` shrinks every
size so the whole script can be checked on a CPU in a minute. ``--write`` turns ``OUT/gpu.json``
into a BENCHMARKS.md section (``--section``, ``--title``; run on this machine after the files come
back), with the whole pipeline's GPU-hours per Phase I batch, K and precision.

CIFAR-10 on the lent GPU (for DP accuracy there, e.g. ``bench/utility.py --model wrn-16-4``): the
working tree that travels is capped at 64 MiB and ``cifar10.npz`` is 185 MB, so it goes in three
calls made back to back (a machine stays warm 30 s). Here: ``echo /.gpudata/ >> .git/info/exclude;
split -b 60M -d ../shared/data/cifar10.npz .gpudata/cifar10.npz.part``. Call i carries only
``.gpudata/cifar10.npz.part0i`` (move the other parts aside here) and runs ``mkdir -p ../shared/data
&& cat .gpudata/*.part0i >> ../shared/data/cifar10.npz``; the last call checks that the file's
SHA-256 starts 4ea56fee before it runs anything.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

T0 = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------ rendering (CPU workers)
def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _render(args):
    start, stop, size = args
    from dprandp.processes import get_process

    return start, get_process("stylegan-oriented").render(np.arange(start, stop), seed=0, size=size)


class Renderer:
    """Renders images start..num in chunks with a spawn pool (safe beside CUDA) in the background."""

    def __init__(self, num: int, size: int, workers: int) -> None:
        self.array = np.empty((num, size, size, 3), dtype=np.uint8)
        self.done = 0
        ctx = mp.get_context("spawn")
        self.pool = ctx.Pool(workers, initializer=_init_worker)
        chunk = 500
        jobs = [(s, min(num, s + chunk), size) for s in range(0, num, chunk)]
        self.results = self.pool.imap_unordered(_render, jobs)
        self.t0, self.remaining = time.monotonic(), len(jobs)

    def finish(self, timeout_s: float) -> int:
        """Collect chunks until all are in or ``timeout_s`` passes; returns the contiguous prefix done."""
        filled = np.zeros(len(self.array), dtype=bool)
        end = time.monotonic() + timeout_s
        while self.remaining and time.monotonic() < end:
            try:
                start, imgs = self.results.next(timeout=max(0.1, end - time.monotonic()))
            except mp.TimeoutError:
                break
            self.array[start:start + len(imgs)] = imgs
            filled[start:start + len(imgs)] = True
            self.remaining -= 1
        self.pool.terminate()
        self.seconds = time.monotonic() - self.t0
        prefix = int(np.argmin(filled)) if not filled.all() else len(filled)
        return prefix


# ------------------------------------------------------------------ sections
def section_tests(res, args):
    if args.smoke:
        return {"skipped": "smoke"}
    t = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "tests/test_device.py"]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=args.tests_timeout_s, check=False)
    tail = (out.stdout + out.stderr)[-4000:]
    print(tail, flush=True)
    last = [ln for ln in out.stdout.splitlines() if ln.strip()][-1:] or [""]
    return {"returncode": out.returncode, "summary": last[0], "seconds": time.monotonic() - t, "tail": tail[-1500:]}


def _pretrain_rate(model, hidden, batch, steps_per_epoch, epochs, device, tmp):
    from dprandp.pretrain import ArrayStore, PretrainConfig, pretrain

    n = batch * steps_per_epoch
    imgs = np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    cfg = PretrainConfig(model=model, hidden=hidden, head_groups=16 if hidden % 16 == 0 else 8, batch_size=batch,
                         epochs=epochs)
    lines = []
    pretrain(cfg, ArrayStore(imgs), out=tmp / f"rate-{model}-{batch}.pt", overwrite=True, device=device, progress=False,
             log=lines.append)
    rates = [float(ln.split(" img/s")[0].rsplit(", ", 1)[1]) for ln in lines if " img/s" in ln]
    return {"model": model, "hidden": hidden, "batch": batch, "steps_per_epoch": steps_per_epoch,
            "epoch_images_per_s": rates, "images_per_s": max(rates[1:] or rates)}


def section_pretrain_throughput(res, args, device, tmp):
    rows = []
    plan = [("wrn-16-4", 4096, 256), ("wrn-16-4", 4096, 512), ("wrn-16-4", 4096, 1024)]
    if args.smoke:
        plan = [("wrn-10-1", 64, 16)]
    for model, hidden, batch in plan:
        r = _pretrain_rate(model, hidden, batch, 4 if args.smoke else 24, 2, device, tmp)
        log(f"pretrain {model} head {hidden} batch {batch}: {r['images_per_s']:.0f} img/s")
        rows.append(r)
    paper = next((r for r in rows if r["model"] == "wrn-16-4" and r["batch"] == 256), None)
    out = {"rows": rows}
    if paper:
        out["paper_run_hours_at_batch_256"] = 105_000 * 200 / paper["images_per_s"] / 3600
    return out


def _dp_timing(model_name, phase, *, n, b, k, p, steps, device, nonprivate, precision="fp32"):
    import torch
    from torch.nn import functional as F

    from dprandp.augment import random_crop_flip
    from dprandp.data import to_float
    from dprandp.models import create_model
    from dprandp.privacy import DPSGD, DPConfig, PoissonSampler

    model = create_model(model_name, num_classes=10, seed=0).to(device)
    if phase == "II":
        for name, prm in model.named_parameters():
            prm.requires_grad_(name.startswith(model.PRIOR_LACKS))
    params = [q for q in model.parameters() if q.requires_grad]
    x_all = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, device=device)
    y_all = torch.randint(0, 10, (n,), device=device)
    aug = torch.Generator().manual_seed(1)

    def make_views(idx):
        idx = idx.to(device)
        return random_crop_flip(to_float(x_all[idx]), augmult=k, generator=aug), y_all[idx]

    cfg = DPConfig.for_dataset(num_samples=n, batch_size=b, noise_multiplier=9.3, max_grad_norm=1.0, augmult=k,
                               physical_batch_size=p)
    sampler = PoissonSampler(num_samples=n, sample_rate=cfg.sample_rate, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(params, lr=0.1)
    engine = DPSGD(model, opt, config=cfg, noise_generator=torch.Generator().manual_seed(3), precision=precision)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, sizes = [], []
    for i in range(steps + 1):  # the first step warms up (cudnn autotuning, allocator)
        idx = sampler.sample()
        sync()
        t = time.perf_counter()
        engine.step_from_indices(idx, make_views)
        sync()
        if i:
            times.append(time.perf_counter() - t)
            sizes.append(idx.numel())
    out = {"model": model_name, "phase": phase, "B": b, "K": k, "physical": p, "steps": steps, "precision": precision,
           "seconds_per_step": float(np.median(times)), "samples": sizes,
           "views_per_s": float(np.sum(sizes) * k / np.sum(times))}
    if nonprivate:
        idx = sampler.sample()
        times_np = []
        for i in range(3):
            sync()
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            for j in range(0, idx.numel(), p):
                v, y = make_views(idx[j:j + p])
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    logits = model(v.flatten(0, 1))
                loss = F.cross_entropy(logits.float(), y.repeat_interleave(k), reduction="sum") / (b * k)
                loss.backward()
            opt.step()
            sync()
            if i:
                times_np.append(time.perf_counter() - t)
        out["nonprivate_seconds_per_step"] = float(np.median(times_np))
        out["dp_over_nonprivate"] = out["seconds_per_step"] / out["nonprivate_seconds_per_step"]
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return out


def section_dp_steps(res, args, device):
    import torch

    if device.type == "cuda":  # as the trainer runs DP-SGD: full float32 (TF32 off, also for cuDNN)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    if args.smoke:
        plan = [("wrn-10-1", "II", 64, 2, 32, 1, "fp32"), ("wrn-10-1", "III", 64, 2, 32, 1, "fp32"),
                ("wrn-10-1", "II", 64, 2, 32, 1, "bf16"), ("wrn-10-1", "III", 64, 2, 32, 1, "bf16"),
                ("wrn-10-1", "II", 64, 1, 64, 1, "fp32"), ("wrn-10-1", "III", 64, 1, 64, 1, "fp32")]
        n = 640
    else:  # the paper's K = 16 in float32 and with bf16 passes (--precision bf16), then K = 4 with the same
        # views per physical batch (same B, T, sigma: same epsilon)
        plan = [("wrn-16-4", "II", 4096, 16, 512, 2, "fp32"), ("wrn-16-4", "III", 4096, 16, 512, 2, "fp32"),
                ("wrn-16-4", "II", 4096, 16, 512, 2, "bf16"), ("wrn-16-4", "III", 4096, 16, 512, 2, "bf16"),
                ("wrn-16-4", "II", 4096, 4, 2048, 2, "bf16"), ("wrn-16-4", "III", 4096, 4, 2048, 2, "bf16"),
                ("wrn-16-4", "II", 4096, 4, 2048, 2, "fp32"), ("wrn-16-4", "III", 4096, 4, 2048, 2, "fp32"),
                ("wrn-16-4", "III", 4096, 16, 1024, 2, "bf16")]  # bf16 halves activations: a larger chunk
        n = 50_000
    rows = []
    for model, phase, b, k, p, steps, precision in plan:
        if elapsed() > args.deadline_s * 0.6:
            log("dp_steps: skipping the rest (time box)")
            break
        try:
            r = _dp_timing(model, phase, n=n, b=b, k=k, p=p, steps=steps, device=device, nonprivate=True,
                           precision=precision)
        except Exception as exc:  # noqa: BLE001 (report, keep measuring)
            r = {"model": model, "phase": phase, "K": k, "physical": p, "precision": precision,
                 "error": f"{type(exc).__name__}: {exc}"[:500]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log(f"dp step {r}")
        rows.append(r)
    out = {"rows": rows}
    out.update(extrapolate(rows))
    return out


def _hours_by_augmult(ok) -> dict[int, float]:
    hours = {}
    for k in sorted({r["K"] for r in ok}):
        s2 = min((r["seconds_per_step"] for r in ok if r["phase"] == "II" and r["K"] == k), default=None)
        s3 = min((r["seconds_per_step"] for r in ok if r["phase"] == "III" and r["K"] == k), default=None)
        if s2 is not None and s3 is not None:
            hours[k] = (96 * s2 + 779 * s3) / 3600
    return hours


def extrapolate(rows) -> dict:
    """Phases II + III of the paper's epsilon = 1 run (96 + 779 steps) from the fastest timed step of each
    phase, per number of views K and per precision; ``paper_run_*`` is the paper's setting (float32 and
    the largest K timed); bf16 rows (``--precision bf16``) go to ``gpu_hours_by_augmult_bf16``."""
    ok = [r for r in rows if "seconds_per_step" in r]
    hours = _hours_by_augmult([r for r in ok if r.get("precision", "fp32") == "fp32"])
    bf16 = _hours_by_augmult([r for r in ok if r.get("precision") == "bf16"])
    out = {"gpu_hours_by_augmult_bf16": {str(k): h for k, h in bf16.items()}} if bf16 else {}
    if hours:
        k_paper = max(hours)
        out.update({"paper_run_seconds": hours[k_paper] * 3600, "paper_run_gpu_hours": hours[k_paper],
                    "gpu_hours_by_augmult": {str(k): h for k, h in hours.items()}})
    return out


def find_cifar10(roots=("/data", "/datasets", "/mnt", "/opt", "/root", "/home"), depth: int = 4,
                 budget: int = 50_000) -> list[str]:
    """Paths named cifar-10* or cifar10* up to ``depth`` folders below ``roots`` (at most ``budget``
    entries looked at): is a CIFAR-10 copy already on the GPU machine? The working tree that
    travels there is capped at 64 MiB, too small for its 184 MB."""
    found, seen = [], 0
    for root in roots:
        base = Path(root)
        if not base.is_dir():
            continue
        for folder, dirs, files in os.walk(base):
            rel = Path(folder).relative_to(base)
            seen += len(dirs) + len(files)
            found += [str(Path(folder) / n) for n in dirs + files if n.lower().startswith(("cifar-10", "cifar10"))]
            if len(rel.parts) >= depth:
                dirs.clear()
            if seen > budget or len(found) >= 5:
                return found[:5]
    return found[:5]


SECTIONS = ("tests", "pretrain_throughput", "dp_steps", "priors")
PAPER_PHASE1_IMAGES = 105_000 * 200  # SPEC.md: 105k StyleGAN-Oriented images, 200 epochs


def pipeline_hours(result: dict) -> list[dict]:
    """The whole paper pipeline (Phase I + Phases II and III) in GPU-hours, for every Phase I batch
    size timed on the paper model and every (K, precision) whose DP steps were extrapolated."""
    phase1 = {r["batch"]: PAPER_PHASE1_IMAGES / r["images_per_s"] / 3600
              for r in result.get("pretrain_throughput", {}).get("rows", []) if r.get("model") == "wrn-16-4"}
    dp = result.get("dp_steps", {})
    dp_hours = [(int(k), "fp32", h) for k, h in dp.get("gpu_hours_by_augmult", {}).items()]
    dp_hours += [(int(k), "bf16", h) for k, h in dp.get("gpu_hours_by_augmult_bf16", {}).items()]
    return [{"phase1_batch": b, "K": k, "precision": prec, "phase1_hours": h1, "dp_hours": h23, "hours": h1 + h23}
            for b, h1 in sorted(phase1.items()) for k, prec, h23 in sorted(dp_hours, key=lambda t: (-t[0], t[1]))]


def section_priors(res, args, device, renderer, out_dir):
    from dprandp.pretrain import ArrayStore, PretrainConfig, pretrain

    wait = max(5.0, min(120.0, args.deadline_s - elapsed() - 200))
    have = renderer.finish(wait)
    log(f"rendered {have} images in {renderer.seconds:.0f} s")
    store = ArrayStore(renderer.array[:have], description={"kind": "process", "process": "stylegan-oriented",
                                                           "num_images": have, "size": args.image_size, "seed": 0})
    rates = {(r["model"], r["batch"]): r["images_per_s"] for r in res.get("pretrain_throughput", {}).get("rows", [])}
    rows = []
    # (model, head width, batch, share of the time left, lr per 256): the cpu preset's lr for the
    # cpu model, SPEC.md's for the paper model.
    # (The WRN-16-1 prior made here on 2026-11-28 fine-tuned worse than the cpu preset's: only the
    # paper model is trained now, for all the time left.)
    plan = [("wrn-16-4", 4096, 512, 1.0, 0.12)]
    if args.smoke:
        plan = [("wrn-10-1", 64, 16, 1.0, 0.12)]
    for model, hidden, batch, share, lr_per_256 in plan:
        budget = (args.deadline_s - 25 - elapsed()) * share
        rate = rates.get((model, batch)) or 2000.0  # the rate at this batch: another batch's overran in 2026-11
        epochs = int(max(1, min(200, budget * rate * 0.85 // have)))
        if budget < 20:
            log(f"prior {model}: no time left")
            break
        cfg = PretrainConfig(model=model, hidden=hidden, head_groups=16 if hidden % 16 == 0 else 8,
                             batch_size=batch, epochs=epochs, lr_per_256=lr_per_256)
        path = out_dir / f"prior-{model}-gpu.pt"
        t = time.monotonic()
        r = pretrain(cfg, store, out=path, overwrite=True, device=device, progress=False, log=log)
        row = {"model": model, "hidden": hidden, "batch": batch, "images": have, "epochs": epochs,
               "lr": cfg.lr, "seconds": time.monotonic() - t, "images_per_s": r.images_per_s,
               "losses": r.epoch_losses, "path": path.name}
        log(f"prior {row}")
        rows.append(row)
    return {"render_seconds": renderer.seconds, "rendered": have, "image_size": args.image_size, "rows": rows}


# ------------------------------------------------------------------ report
def write_section(result: dict, command: str, section: str = "gpu",
                  title: str = "GPU checks on one lent GPU (bench/gpu.py)") -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from _report import write_section as write

    env = result.get("env", {})
    lines = [f"## {title}", "", f"One lent **{env.get('gpu', '?')}** (torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}); "
             f"the script ran for {result.get('seconds', 0):.0f} s of device time.", ""]
    if "cifar10_found" in env:
        lines += [f"CIFAR-10 already on the GPU machine: {', '.join(env['cifar10_found']) or 'none found'} "
                  "(the working tree that travels there is capped at 64 MiB, below its 184 MB).", ""]
    tests = result.get("tests", {})
    if tests:
        lines += [f"- `pytest tests/test_cuda.py tests/test_device.py` on the GPU: **{tests.get('summary', '?')}** "
                  f"(exit {tests.get('returncode')}). CUDA against float64 CPU references: per-sample clipped sums "
                  "(layer-wise and vmap, TF32 off and on), the DP-SGD step, the noise std, the augmentations; "
                  "Phase I in bf16; `dprandp train --device cuda`; torchrun with NCCL.", ""]
    pt = result.get("pretrain_throughput", {})
    if pt.get("rows"):
        lines += ["Phase I throughput, the real `pretrain()` loop (views made on the GPU, bf16 autocast, "
                  "channels_last; images/s, each image two views; best epoch after the first):", "",
                  "| model | head | batch | images/s |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['hidden']} | {r['batch']} | {r['images_per_s']:.0f} |" for r in pt["rows"]]
        if "paper_run_hours_at_batch_256" in pt:
            lines += ["", f"Paper Phase I (105k images x 200 epochs, batch 256) extrapolated: "
                          f"**{pt['paper_run_hours_at_batch_256']:.2f} GPU-hours**."]
        lines.append("")
    dp_rows = []
    for key in ("dp_steps", "dp_steps_fp32"):
        for r in result.get(key, {}).get("rows", []):
            dp_rows.append((result[key].get("precision", "fp32"), r))
    if dp_rows:
        lines += ["Paper-preset DP-SGD steps (WRN-16-4, Poisson B = 4096 of N = 50,000, K views per sample, sigma = 9.3; "
                  "median of the timed steps after one warm-up; the non-private step runs the same views through "
                  "forward + backward of the mean loss at the same precision):", "",
                  "| phase | K | precision | physical batch | s / step | views/s | non-private s / step | "
                  "DP / non-private | peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for prec, r in dp_rows:
            prec = r.get("precision", prec)
            if "error" in r:
                lines.append(f"| {r['phase']} | {r.get('K', '?')} | {prec} | {r['physical']} | failed: {r['error'][:80]} | | | | |")
                continue
            lines.append(f"| {r['phase']} | {r['K']} | {prec} | {r['physical']} | {r['seconds_per_step']:.2f} | "
                         f"{r['views_per_s']:.0f} | {r.get('nonprivate_seconds_per_step', float('nan')):.2f} | "
                         f"{r.get('dp_over_nonprivate', float('nan')):.2f}x | {r.get('peak_memory_gib', float('nan')):.1f} |")
        for key in ("dp_steps", "dp_steps_fp32"):
            dp = result.get(key, {})
            if "paper_run_gpu_hours" in dp:
                lines += ["", f"Phases II + III of the paper (96 + 779 steps) extrapolated, {dp.get('precision', 'fp32')}: "
                              f"**{dp['paper_run_gpu_hours']:.2f} GPU-hours** on this H200 (reference implementation: "
                              "roughly 20 A100-hours)."]
            by_k = dp.get("gpu_hours_by_augmult", {})
            for k, h in by_k.items():
                if int(k) != max(map(int, by_k)):  # the paper's K is reported just above
                    lines += ["", (f"The same 96 + 779 steps with K = {k} views (same B, T and sigma, so the "
                                   f"same epsilon; accuracy not measured here): **{h:.2f} GPU-hours**.")]
            for k, h in dp.get("gpu_hours_by_augmult_bf16", {}).items():
                lines += ["", (f"The same 96 + 779 steps with K = {k} and `--precision bf16` (forward and backward "
                               f"in bf16; clipping, sums and noise in float32; accuracy not measured here): "
                               f"**{h:.2f} GPU-hours**.")]
        lines.append("")
    whole = pipeline_hours(result)
    if whole:
        lines += ["The whole paper pipeline extrapolated (Phase I: 105k images x 200 epochs at the batch shown, "
                  "bf16; Phases II + III: 96 + 779 steps at B = 4096 with K views; only the batch 256 / K = 16 / "
                  "fp32 row is the paper's recipe, and no other row's accuracy is measured):", "",
                  "| Phase I batch | K | DP precision | Phase I h | II + III h | total GPU-hours |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {w['phase1_batch']} | {w['K']} | {w['precision']} | {w['phase1_hours']:.2f} | "
                  f"{w['dp_hours']:.2f} | **{w['hours']:.2f}** |" for w in whole]
        lines.append("")
    pr = result.get("priors", {})
    if pr.get("rows"):
        lines += [f"GPU priors (StyleGAN-Oriented, {pr['rendered']} images at {pr['image_size']} px rendered by "
                  f"CPU workers in {pr['render_seconds']:.0f} s):", "",
                  "| model | head | batch | epochs | seconds | images/s | first / last epoch loss |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['hidden']} | {r['batch']} | {r['epochs']} | {r['seconds']:.0f} | "
                  f"{r['images_per_s']:.0f} | {r['losses'][0]:.3f} / {r['losses'][-1]:.3f} |" for r in pr["rows"]]
    if result.get("notes"):
        lines += [""] + [f"- {n}" for n in result["notes"]]
    lines += ["", "(The Machine line below is where this section was written from `gpu.json`; every number above "
                  "was measured on the GPU machine.)"]
    write(section, "\n".join(lines), command=command)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu")
    ap.add_argument("--deadline-s", type=float, default=520.0)
    ap.add_argument("--tests-timeout-s", type=float, default=150.0)
    ap.add_argument("--render", type=int, default=105_000, help="StyleGAN-Oriented images for the priors")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script on a CPU)")
    ap.add_argument("--write", type=Path, default=None, help="write BENCHMARKS.md's gpu section from this gpu.json")
    ap.add_argument("--command", default="python bench/gpu.py --out $OUT --deadline-s 555")
    ap.add_argument("--section", default="gpu", help="BENCHMARKS.md section that --write fills")
    ap.add_argument("--title", default="GPU checks on one lent GPU (bench/gpu.py)", help="its heading")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                    help="run only these (e.g. tests dp_steps, to re-check a fix in a short lease)")
    args = ap.parse_args()
    if args.write:
        write_section(json.loads(args.write.read_text()), args.command, args.section, args.title)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.render = min(args.render, 400)
    workers = args.workers or max(1, (os.cpu_count() or 2) - 2)
    renderer = None
    if "priors" in args.sections:  # before CUDA starts (spawned workers)
        renderer = Renderer(args.render, args.image_size, workers)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    res = {"env": {"torch": torch.__version__, "cuda": torch.version.cuda,
                   "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
                   "cpus": os.cpu_count(), "device": str(device),
                   "cifar10_found": find_cifar10()}}
    tmp = args.out / "tmp"
    tmp.mkdir(exist_ok=True)

    def save():
        res["seconds"] = elapsed()
        (args.out / "gpu.json").write_text(json.dumps(res, indent=1))

    for name, fn in (("tests", lambda: section_tests(res, args)),
                     ("pretrain_throughput", lambda: section_pretrain_throughput(res, args, device, tmp)),
                     ("dp_steps", lambda: section_dp_steps(res, args, device)),
                     ("priors", lambda: section_priors(res, args, device, renderer, args.out))):
        if name not in args.sections:
            continue
        log(f"== {name}")
        try:
            res[name] = fn()
        except Exception as exc:  # noqa: BLE001 (a failed section must not lose the others)
            import traceback

            traceback.print_exc()
            res[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        save()
    for f in tmp.glob("*"):
        f.unlink()
    tmp.rmdir()
    print(json.dumps({k: v for k, v in res.items() if k != "priors"}, indent=1)[-6000:])
    print(json.dumps(res.get("priors", {}))[-2000:])


if __name__ == "__main__":
    main()
