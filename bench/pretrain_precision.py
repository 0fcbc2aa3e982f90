"""Phase I in bf16 autocast against float32 on this CPU: speed side by side, and what it does to training.

1. Throughput: the real Phase I step (two views, forward, contrastive loss, backward, SGD) of
   the ``cpu`` and ``paper`` preset models, fp32 and bf16 interleaved round by round so that
   both see the same machine load; the ratio is the result.
2. Training: the same short ``pretrain()`` run (same seed, same images) in fp32 and in bf16;
   the per-epoch losses side by side, and the pooled features' agreement on CIFAR-10 images
   when the data file is present.

    python bench/pretrain_precision.py [--threads 1] [--rounds 3]

Writes the ``pretrain_precision`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import write_section  # noqa: E402
from dprandp.pretrain import ContrastiveModel, preset, pretrain, two_views  # noqa: E402
from dprandp.pretrain.precision import cpu_has_native_bf16  # noqa: E402
from dprandp.pretrain.trainer import train_step  # noqa: E402


def step_seconds(model, cfg, images, gen, bf16: bool) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr * 1e-3, momentum=cfg.momentum)  # tiny lr: timing only
    t = time.perf_counter()
    train_step(model, opt, torch.cat(two_views(images, gen)), cfg, bf16=bf16)
    return time.perf_counter() - t


def throughput(preset_name: str, batch: int, rounds: int) -> dict[str, float]:
    cfg = preset(preset_name, batch_size=batch)
    model = ContrastiveModel(cfg)
    images = np.random.default_rng(0).integers(0, 256, (batch, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    gen = torch.Generator().manual_seed(0)
    for bf16 in (False, True):  # warm-up (oneDNN primitive creation) of both paths
        step_seconds(model, cfg, images, gen, bf16)
    times = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for name in ("fp32", "bf16"):
            times[name].append(step_seconds(model, cfg, images, gen, name == "bf16"))
    return {name: batch / statistics.median(ts) for name, ts in times.items()}


def short_runs(num_images: int, epochs: int, cifar: Path | None) -> tuple[list[str], dict]:
    from dprandp.pretrain import process_source

    images = process_source("stylegan-oriented", num_images, size=64, seed=0, progress=False)
    cfg = preset("cpu", epochs=epochs, batch_size=128)
    out, priors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            t = time.perf_counter()
            r = pretrain(cfg, images, out=Path(tmp) / f"{precision}.pt", progress=False, precision=precision)
            out[precision] = (r.epoch_losses, time.perf_counter() - t)
            priors[precision] = torch.load(Path(tmp) / f"{precision}.pt", weights_only=False)
            print(precision, r.epoch_losses, flush=True)
        agreement = None
        if cifar is not None and cifar.exists():
            from dprandp.models import create_model
            from dprandp.pretrain import apply_prior
            from dprandp.pretrain.views import MEAN, STD

            x = np.load(cifar)["x_test"][:2000]
            x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
            feats = {}
            for precision in ("fp32", "bf16"):
                m = create_model(cfg.model, num_classes=10, seed=cfg.seed)
                apply_prior(m, Path(tmp) / f"{precision}.pt")
                with torch.no_grad():
                    feats[precision] = m.final_norm(m.trunk(x)).mean(dim=(2, 3))
            cos = torch.nn.functional.cosine_similarity(feats["fp32"], feats["bf16"], dim=1)
            agreement = float(cos.mean())
    lines = [f"Two `pretrain()` runs of the `cpu` preset model (WRN-16-1, head 512, batch 128, lr schedule scaled to "
             f"{epochs} epochs) on the same {num_images} StyleGAN-Oriented images, same seed; mean loss per epoch:", "",
             "| epoch | fp32 loss | bf16 loss |", "| --- | --- | --- |"]
    for e, (a, b) in enumerate(zip(out["fp32"][0], out["bf16"][0]), 1):
        lines.append(f"| {e} | {a:.4f} | {b:.4f} |")
    lines += ["", f"Wall time: fp32 {out['fp32'][1]:.0f} s, bf16 {out['bf16'][1]:.0f} s "
              f"(ratio {out['fp32'][1] / out['bf16'][1]:.2f}x, including one-time set-up)."]
    if agreement is not None:
        lines.append(f"Pooled features of the two priors on 2,000 CIFAR-10 test images: mean cosine similarity {agreement:.3f} "
                     "(training is chaotic: rounding alone sends two runs from the same seed apart, so this measures divergence, not quality; the loss columns compare quality).")
    return lines, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=1024, help="images of the short training runs")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the short training runs")
    ap.add_argument("--cifar", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10.npz")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    native = cpu_has_native_bf16()
    lines = [f"This CPU has native bf16 (AVX512-BF16 or AMX): **{'yes' if native else 'no'}**, so "
             f"`--precision auto` picks **{'bf16' if native else 'fp32'}** for Phase I here. "
             f"{a.threads} thread(s); fp32 and bf16 steps interleaved, {a.rounds} timed rounds after one warm-up each; "
             "images/s (each image = two views).", "",
             "| preset | model | batch | fp32 images/s | bf16 images/s | bf16 speed-up |", "| --- | --- | --- | --- | --- | --- |"]
    for preset_name, batch in (("cpu", 128), ("paper", 32)):
        r = throughput(preset_name, batch, a.rounds)
        lines.append(f"| {preset_name} | {preset(preset_name).model} | {batch} | {r['fp32']:.1f} | {r['bf16']:.1f} | "
                     f"**{r['bf16'] / r['fp32']:.2f}x** |")
        print(lines[-1], flush=True)
    run_lines, _ = short_runs(a.images, a.epochs, a.cifar)
    lines += [""] + run_lines
    lines += ["", "The DP phases run in float32 by default (`--precision bf16` is an opt-in for their forward/backward, "
              "section `dpsgd_precision`; the per-sample norms, clipping and the noisy sum stay float32): clipping "
              "must bound exactly the vector that is summed (BENCHMARKS.md, section `gpu`, measured a 1.7 % "
              "per-sample gradient error with TF32).",
              "", f"Bench wall time: {(time.perf_counter() - t0) / 60:.1f} min."]
    text = "## Phase I precision on the CPU: bf16 autocast against float32 (bench/pretrain_precision.py)\n\n" + "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section("pretrain_precision", text)


if __name__ == "__main__":
    main()
