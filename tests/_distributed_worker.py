"""One rank of the 2-process checks in test_distributed.py (launched with torchrun-style env vars).

Usage: python _distributed_worker.py OUT_DIR SPEC_JSON. Writes OUT_DIR/rank{R}.pt with what the
test compares against its single-process reference. Kept import-light so a rank starts fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from dprandp import distributed as D  # noqa: E402
from dprandp.models import create_model  # noqa: E402
from dprandp.privacy import DPSGD, DPConfig  # noqa: E402


def dataset(spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed multi-view data (N, K, 3, H, W): identical on every rank, no augmentation stream."""
    g = torch.Generator().manual_seed(spec["data_seed"])
    n, k, s = spec["num_samples"], spec["augmult"], spec["image_size"]
    return torch.randn(n, k, 3, s, s, generator=g), torch.randint(0, 10, (n,), generator=g)


def dp_run(spec: dict, ctx: D.DistContext, *, sigma: float, zero_loss: bool, noise_seed: int | None) -> dict:
    x, y = dataset(spec)
    model = create_model("wrn-10-1", num_classes=10, seed=spec["model_seed"])
    D.broadcast_module(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = DPConfig.for_dataset(num_samples=spec["num_samples"], batch_size=spec["batch_size"], noise_multiplier=sigma,
                               max_grad_norm=spec["max_grad_norm"], augmult=spec["augmult"],
                               physical_batch_size=spec["physical_batch_size"])
    gen = torch.Generator().manual_seed(D.rank_seed(spec["sampling_seed"], ctx.rank, "sampling"))
    sampler = D.shard_sampler(num_samples=spec["num_samples"], sample_rate=cfg.sample_rate, ctx=ctx, generator=gen)
    noise = torch.Generator().manual_seed(D.shared_seed(noise_seed))
    loss_fn = (lambda logits, t: logits.sum(1) * 0.0) if zero_loss else None
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"])
    engine = DPSGD(model, opt, config=cfg, noise_generator=noise, all_reduce=ctx.all_reduce, loss_fn=loss_fn)
    batches, sizes, states = [], [], [before]
    for _ in range(spec["steps"]):
        idx = sampler.sample()
        batches.append(idx)
        stats = engine.step_from_indices(idx, lambda i: (x[i], y[i]))
        sizes.append(stats.batch_size)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return {"before": before, "after": states[-1], "states": states,
            "batches": batches, "reduced_sizes": sizes, "divergence": D.max_divergence(model)}


def gather_run(spec: dict, ctx: D.DistContext) -> dict:
    g = torch.Generator().manual_seed(spec["data_seed"] + 1)
    b = spec["gather_batch"]
    x1, x2 = torch.randn(b, 6, generator=g), torch.randn(b, 6, generator=g)
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    D.broadcast_module(lin)
    mine = D.shard_batch(torch.arange(b), ctx)
    z1 = torch.nn.functional.normalize(lin(x1[mine]), dim=1)
    z2 = torch.nn.functional.normalize(lin(x2[mine]), dim=1)
    z1, z2 = D.gather_with_grad(z1), D.gather_with_grad(z2)
    align = (z1 - z2).norm(dim=1).pow(2).mean()
    unif = sum(torch.pdist(z).pow(2).mul(-2).exp().mean().log() for z in (z1, z2)) / 2
    loss = align + unif
    loss.backward()
    D.all_reduce_gradients(lin)
    return {"loss": loss.item(), "order": torch.cat([torch.arange(r, b, ctx.world_size) for r in range(ctx.world_size)]),
            "grads": {n: p.grad.clone() for n, p in lin.named_parameters()}}


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    ctx = D.init_distributed(backend="gloo")
    try:
        result = {"rank": ctx.rank, "world_size": ctx.world_size,
                  "exact": dp_run(spec, ctx, sigma=0.0, zero_loss=False, noise_seed=spec["noise_seed"]),
                  "noise": dp_run(spec, ctx, sigma=spec["sigma"], zero_loss=True, noise_seed=None),
                  "gather": gather_run(spec, ctx)}
        torch.save(result, out / f"rank{ctx.rank}.pt")
    finally:
        D.shutdown()


if __name__ == "__main__":
    main()
