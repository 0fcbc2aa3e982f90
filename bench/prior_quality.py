"""Does the Phase I prior help? Non-private linear probe on CIFAR-10, prior vs. random init.

Measures, on this machine:

1. Linear-probe accuracy (multinomial logistic regression, sklearn lbfgs, standardised features)
   on frozen features of (a) the randomly initialised encoder the prior started from (same
   architecture, same seed) and (b) the prior. Two feature sets: the pooled 64k-dim features
   Phase II trains on with the paper's head (``WideResNet.features``: ReLU -> GroupNorm -> global
   average pool), and the same map average-pooled to 2x2 and 4x4 grids (4 x and 16 x 64k dims: what
   Phase II trains on with ``--head-pool 2`` / ``4``). CIFAR-10 is subsampled (default 10k train /
   2k test images, stratified by nothing but a seeded permutation) to keep it to minutes.
2. Pretraining throughput (images/s, each image giving two views: views + forward + backward +
   SGD step) of the ``cpu`` and ``paper`` preset models, side by side in one run.
3. The wall time of the pretraining run that produced the prior (from the prior's provenance).

Writes the ``prior_quality`` section of BENCHMARKS.md.

    python bench/prior_quality.py --prior /work/cache/prior-cpu.pt [--train 10000 --test 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import write_section  # noqa: E402
from dprandp.models import create_model  # noqa: E402
from dprandp.pretrain import ContrastiveModel, apply_prior, load_prior, preset, two_views  # noqa: E402
from dprandp.pretrain.trainer import contrastive_loss  # noqa: E402
from dprandp.pretrain.views import MEAN, STD  # noqa: E402


def load_cifar(path: Path, n_train: int, n_test: int, seed: int):
    d = np.load(path)
    rng = np.random.default_rng(seed)
    tr = rng.permutation(len(d["x_train"]))[:n_train]
    te = rng.permutation(len(d["x_test"]))[:n_test]
    return d["x_train"][tr], d["y_train"][tr], d["x_test"][te], d["y_test"][te]


GRIDS = (1, 2, 4)


@torch.no_grad()
def features(model, images: np.ndarray, batch: int = 500) -> dict[int, np.ndarray]:
    """{grid: the final-norm output average-pooled to grid x grid, flattened} (grid 1 = global pool)."""
    model.eval()
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    parts = {g: [] for g in GRIDS}
    for s in range(0, len(images), batch):
        x = (torch.from_numpy(images[s:s + batch]).permute(0, 3, 1, 2).float() / 255 - mean) / std
        h = model.final_norm(model.trunk(x))
        for g in GRIDS:
            parts[g].append(F.adaptive_avg_pool2d(h, g).flatten(1).numpy())
    return {g: np.concatenate(v) for g, v in parts.items()}


def probe(f_train, y_train, f_test, y_test) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(f_train)
    clf = LogisticRegression(max_iter=1000, C=1.0)
    clf.fit(scaler.transform(f_train), y_train)
    return float((clf.predict(scaler.transform(f_test)) == y_test).mean())


def throughput(preset_name: str, batch: int, steps: int, threads: int) -> float:
    """Images/s of full Phase I training steps (views + forward + backward + SGD) on random images."""
    torch.set_num_threads(threads)
    cfg = preset(preset_name, batch_size=batch)
    model = ContrastiveModel(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    images = np.random.default_rng(0).integers(0, 256, (batch, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):  # the first step is warm-up
        t = time.perf_counter()
        v1, v2 = two_views(images, g)
        z1, z2 = model(torch.cat([v1, v2])).chunk(2)
        loss = contrastive_loss(cfg, z1, z2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default="/work/cache/prior-cpu.pt")
    ap.add_argument("--compare", action="append", default=[], metavar="PRIOR",
                    help="another prior of the same architecture to probe in the same run (repeatable)")
    ap.add_argument("--cifar", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10.npz"))
    ap.add_argument("--train", type=int, default=10_000)
    ap.add_argument("--test", type=int, default=2_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    ap.add_argument("--section", default="prior_quality", help="BENCHMARKS.md section to write")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    trunk, meta = load_prior(args.prior)
    prov = meta["provenance"]
    name, seed = meta["model"], int(prov["seed"])
    x_tr, y_tr, x_te, y_te = load_cifar(Path(args.cifar), args.train, args.test, args.seed)

    rows = []
    encoders = [("random init (the prior's own initialisation)", None), (f"Phase I prior `{args.prior}`", (trunk, meta))]
    encoders += [(f"Phase I prior `{p}` (compared)", p) for p in args.compare]
    for label, prior in encoders:
        model = create_model(name, num_classes=10, seed=seed)
        if prior is not None:
            apply_prior(model, prior)
        t = time.perf_counter()
        f_tr, f_te = features(model, x_tr), features(model, x_te)
        accs = [probe(f_tr[g], y_tr, f_te[g], y_te) for g in GRIDS]
        rows.append((label, accs, time.perf_counter() - t))
        print(f"{label}: " + ", ".join(f"{g}x{g} {a:.4f}" for g, a in zip(GRIDS, accs)), flush=True)

    dim = meta["wrn_config"]["width"] * 64
    lines = [
        f"Linear probe (logistic regression on frozen, standardised features; non-private) on a CIFAR-10 "
        f"subsample: {args.train} train / {args.test} test images (seeded permutation {args.seed}). "
        f"Encoder `{name}`; prior `{args.prior}` = {prov.get('process')} process, "
        f"{prov.get('num_images')} images at {prov.get('image_size')} px, {prov.get('epochs_done')}/{prov.get('epochs')} "
        f"epochs, seed {seed}, lr {meta['pretrain_config']['lr_per_256']} per 256, final loss "
        f"{prov['epoch_losses'][-1]:.3f}, code {prov.get('code_version')}.",
        "",
        "| encoder | " + " | ".join(f"probe on {g}x{g}-pooled features ({g * g * dim}-d, Phase II's input with "
                                    f"--head-pool {g})" for g in GRIDS) + " |",
        "| --- |" + " --- |" * len(GRIDS),
    ]
    for label, accs, _ in rows:
        lines.append(f"| {label} | " + " | ".join(f"{100 * a:.1f} %" for a in accs) + " |")
    gains = [100 * (b - a) for a, b in zip(rows[0][1], rows[1][1])]
    lines += ["", "Prior minus random init: " + ", ".join(f"**{d:+.1f} points** at {g}x{g}" for g, d in zip(GRIDS, gains))
              + f" (target: >= +10 on the features Phase II trains on). n = {args.test} test images: one standard "
              f"error is about {100 * np.sqrt(0.25 / args.test):.1f} points."]
    ts = float(prov.get("train_seconds", float("nan")))
    lines += ["", f"Wall time of the pretraining run (training epochs only, from the prior's provenance): "
              f"{ts / 60:.1f} min for {prov.get('epochs_done')} epochs "
              f"({prov.get('num_images', 0) * prov.get('epochs_done', 0) / ts:.1f} images/s), "
              f"on {prov.get('device', 'a device the prior does not record')}."]

    if not args.no_throughput:
        tp = []
        for preset_name, batch, steps in (("cpu", 128, 3), ("paper", 32, 2)):
            cfg = preset(preset_name)
            for threads in (1, 2):
                ips = throughput(preset_name, batch, steps, threads)
                tp.append((preset_name, cfg.model, cfg.hidden, batch, threads, ips))
                print(f"throughput {preset_name} threads={threads}: {ips:.1f} img/s", flush=True)
        torch.set_num_threads(args.threads)
        lines += ["", "Pretraining throughput on this machine (a full step: two views + forward + backward + SGD; "
                  "median of the timed steps after one warm-up; images/s, each image = two views; "
                  "the machine was shared with other jobs, so compare the rows, not the absolute values):", "",
                  "| preset | model | head width | batch | threads | images/s | time for the preset's run |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for preset_name, model_name, hidden, batch, threads, ips in tp:
            cfg = preset(preset_name)
            hours = cfg.num_images * cfg.epochs / ips / 3600
            lines.append(f"| {preset_name} | {model_name} | {hidden} | {batch} | {threads} | {ips:.1f} | {hours:.1f} h |")
        lines += ["", "No GPU on this machine: the paper preset's GPU throughput (bf16 autocast, channels_last) is not measured here."]

    lines += ["", f"Bench wall time: {(time.perf_counter() - t_start) / 60:.1f} min."]
    text = "## Phase I prior quality (bench/prior_quality.py)\n\n" + "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(args.section, text)


if __name__ == "__main__":
    main()
