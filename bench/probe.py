"""Cost of Phase II on cached features, per head grid (``--head-pool``).

    python bench/probe.py                      # WRN-16-1, grids 1 2 4 8, B = 1000, one thread
    python bench/probe.py --no-write           # print only

With ``--phase2-features cached`` a run pays once for a pass of the frozen trunk over the training
images, then each DP step is a linear probe on C p^2 numbers per image (p = the head's grid). This
times both parts side by side in one process:

* the DP-SGD step of :class:`~dprandp.pipeline.probe.ProbeModel` (Poisson batch of ``B``, vmap
  per-sample gradients, clipping, noise) for each grid, rounds interleaved so that machine noise
  hits every grid alike; the features are random, since the cost does not depend on their values;
* the trunk's feature pass (images per second), which is the same for every grid.

It answers one question: does a finer grid (more features) make the cached probe too slow?
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import write_section  # noqa: E402


def probe_engine(model_name: str, pool: int, batch_size: int, physical: int, num_samples: int):
    import torch

    from dprandp.models import create_model
    from dprandp.pipeline.probe import ProbeModel
    from dprandp.privacy import DPSGD, DPConfig

    model = create_model(model_name, num_classes=10, head_pool=pool, seed=0)
    for name, p in model.named_parameters():  # Phase II's trainable set, as the pipeline defines it
        p.requires_grad = name.startswith(type(model).PRIOR_LACKS)
    probe = ProbeModel(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5, momentum=0.9)
    config = DPConfig.for_dataset(num_samples=num_samples, batch_size=batch_size, noise_multiplier=1.5,
                                  max_grad_norm=1.0, augmult=1, physical_batch_size=physical)
    engine = DPSGD(probe, optimizer, config=config, noise_generator=torch.Generator().manual_seed(0), method="vmap")
    width = model.final_norm.norm.num_channels * pool * pool
    return engine, width


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wrn-16-1")
    p.add_argument("--pools", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--physical-batch-size", type=int, default=250)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per grid (after one warm-up step)")
    p.add_argument("--trunk-images", type=int, default=2000, help="images for the feature-pass timing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)

    import torch

    from dprandp.models import create_model
    from dprandp.pipeline.probe import pooled_features

    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    num_features_rows = 5000  # a pool of rows the steps index into (N only sets q here)
    engines = {}
    for pool in a.pools:
        engine, width = probe_engine(a.model, pool, a.batch_size, a.physical_batch_size, 50_000)
        feats = torch.randn(num_features_rows, width, generator=gen)
        labels = torch.randint(0, 10, (num_features_rows,), generator=gen)
        engines[pool] = (engine, width, feats, labels)
    times: dict[int, list[float]] = {pool: [] for pool in a.pools}
    for r in range(a.rounds + 1):
        for pool, (engine, _, feats, labels) in engines.items():
            idx = torch.randint(0, num_features_rows, (a.batch_size,), generator=gen)
            t = time.perf_counter()
            engine.step_from_indices(idx, lambda j, f=feats, y=labels: (f[j], y[j]))
            if r > 0:  # round 0 warms up
                times[pool].append(time.perf_counter() - t)

    model = create_model(a.model, num_classes=10, head_pool=max(a.pools), seed=0)
    images = torch.randint(0, 256, (a.trunk_images, 32, 32, 3), dtype=torch.uint8, generator=gen)
    pooled_features(model, images[:256], batch_size=256)  # warm-up
    t = time.perf_counter()
    pooled_features(model, images, batch_size=500)
    trunk_rate = a.trunk_images / (time.perf_counter() - t)

    ref = statistics.median(times[4]) if 4 in times else None
    lines = [
        "## Phase II on cached features: cost per head grid (issue 7)",
        "",
        f"{a.model}, B = {a.batch_size} (physical {a.physical_batch_size}), vmap per-sample gradients, "
        f"{a.threads} thread(s); median of {a.rounds} steps per grid, rounds interleaved.",
        "",
        "| head grid | features per image | DP step (median) | vs 4 × 4 | 300 steps |",
        "| --- | --- | --- | --- | --- |",
    ]
    for pool in a.pools:
        med = statistics.median(times[pool])
        ratio = f"{med / ref:.2f}x" if ref else "n/a"
        lines.append(f"| {pool} × {pool} | {engines[pool][1]:,} | {med:.3f} s | {ratio} | {300 * med / 60:.1f} min |")
    lines += [
        "",
        f"The one-off feature pass of the frozen trunk runs at **{trunk_rate:.0f} images/s** "
        f"(the same for every grid): {50_000 / trunk_rate / 60:.1f} min for CIFAR-10's 50,000 training images.",
    ]
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section("probe_cost", text, command="python bench/probe.py " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
