"""Data-parallel DP-SGD throughput: 1 process against 2 processes (gloo on CPU), in one run.

    python bench/distributed.py [--model wrn-16-1] [--batch-size 64] [--augmult 2] [--steps 5]

Each configuration is launched with torchrun (``python -m torch.distributed.run``, static
rendezvous on 127.0.0.1) running this file with ``--worker``. A worker builds the model, a
synthetic dataset (N = 64 B, so q = 1/64), the rank's shard sampler, and the DP-SGD engine with
the ``all_reduce`` hook; it takes ``--warmup`` untimed steps, then times ``--steps`` steps
between barriers. Rank 0 reports DP steps/s, samples/s (realised Poisson batch sizes summed
over ranks) and the time of one all-reduce of the model's gradient. Rows share the machine, so
compare them as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from dprandp import distributed as D
    from dprandp.models import create_model
    from dprandp.privacy import DPSGD, DPConfig

    ctx = D.init_distributed(backend="gloo")
    n = 64 * args.batch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, args.augmult, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    model = create_model(args.model, num_classes=10, seed=0)
    D.broadcast_module(model)
    cfg = DPConfig.for_dataset(num_samples=n, batch_size=args.batch_size, noise_multiplier=1.0, max_grad_norm=1.0,
                               augmult=args.augmult, physical_batch_size=args.physical_batch_size)
    gens = {"sampling": torch.Generator().manual_seed(1), "noise": torch.Generator().manual_seed(D.shared_seed())}
    D.distribute_generators(gens, ctx)
    sampler = D.shard_sampler(num_samples=n, sample_rate=cfg.sample_rate, ctx=ctx, generator=gens["sampling"])
    engine = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), config=cfg, noise_generator=gens["noise"],
                   all_reduce=ctx.all_reduce)
    for _ in range(args.warmup):
        engine.step_from_indices(sampler.sample(), lambda i: (x[i], y[i]))
    D.barrier()
    t0, samples = time.perf_counter(), 0
    for _ in range(args.steps):
        samples += engine.step_from_indices(sampler.sample(), lambda i: (x[i], y[i])).batch_size
    D.barrier()
    seconds = time.perf_counter() - t0
    flat = torch.zeros(sum(p.numel() for p in model.parameters()))
    t1 = time.perf_counter()
    for _ in range(10):
        D.all_reduce_sum(flat)
    reduce_ms = (time.perf_counter() - t1) / 10 * 1e3
    diverged = D.max_divergence(model)
    if ctx.is_main:
        Path(args.json).write_text(json.dumps({
            "processes": ctx.world_size, "threads": args.threads, "seconds": seconds, "steps": args.steps,
            "samples": samples, "reduce_ms": reduce_ms, "divergence": diverged,
            "params": sum(p.numel() for p in model.parameters())}))
    D.shutdown()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, processes: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               str(Path(__file__).resolve()), "--worker", "--json", str(out), "--threads", str(threads),
               "--model", args.model, "--batch-size", str(args.batch_size), "--augmult", str(args.augmult),
               "--physical-batch-size", str(args.physical_batch_size), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        res = json.loads(out.read_text())
        res["wall_s"] = time.perf_counter() - t0
        return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="wrn-16-1")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--augmult", type=int, default=2)
    p.add_argument("--physical-batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    cores = os.cpu_count() or 1
    configs = [(1, 1), (1, min(2, cores)), (2, 1)]
    rows = []
    for processes, threads in configs:
        r = launch(args, processes, threads)
        rows.append(r)
        print(f"{processes} process(es) x {threads} thread(s): {r['steps'] / r['seconds']:.3f} steps/s, "
              f"{r['samples'] / r['seconds']:.1f} samples/s, all-reduce {r['reduce_ms']:.1f} ms", flush=True)
    base = rows[0]["samples"] / rows[0]["seconds"]
    lines = [
        "## Distributed DP-SGD (issue 9): 1 vs 2 processes on this machine",
        "",
        f"{args.model} ({rows[0]['params']:,} parameters), 32×32 synthetic images, expected batch B = "
        f"{args.batch_size} (q = 1/64), K = {args.augmult} views, physical batch {args.physical_batch_size}, "
        f"gloo on CPU, launched with torchrun; {args.warmup} warm-up + {args.steps} timed steps per row. "
        "samples/s counts the realised Poisson batches summed over ranks.",
        "",
        "| processes × threads | DP steps/s | samples/s | vs 1 × 1 | all-reduce of the gradient | replicas equal |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sps = r["samples"] / r["seconds"]
        lines.append(f"| {r['processes']} × {r['threads']} | {r['steps'] / r['seconds']:.3f} | {sps:.1f} | "
                     f"{sps / base:.2f}× | {r['reduce_ms']:.1f} ms | {'yes' if r['divergence'] == 0 else 'NO'} |")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines += [
        "",
        f"Load average at the end of the run: {load}. Other jobs share these {cores} cores, so the rows are "
        "noisy; with the cores oversubscribed, two processes also get a larger share of CPU time than one, "
        "and a process with 2 threads suffers most (its threads wait for each other). "
        f"On an idle {cores}-core machine 2 processes can at best do what one process does with both cores: "
        "expect little gain. Data parallelism pays off with one process per GPU (or per socket). "
        "Per GPU: each rank computes its B/W samples × K views and the only extra work per logical step is "
        "one all-reduce of the gradient (4 bytes per parameter: 11 MB for WRN-16-4; well under 1 ms over "
        "NVLink, about 20 ms over 10 Gbit Ethernet). A paper-scale Phase III step (B = 4096, K = 16) took "
        "6.8 s on one H200 in float32 (section gpu_s19; 8.3 s in section gpu; the reference code needs about 80 s on an A100), so W GPUs should "
        "run close to W× faster, on one node or several, as long as each rank keeps a physical batch of a "
        "few hundred samples (at W = 16 a rank has ~256 samples per step, one physical chunk). Measured so "
        "far: NCCL under torchrun with one process on one H200 (tests/test_cuda.py); no multi-GPU machine "
        "has run it.",
    ]
    from bench._report import write_section

    write_section("distributed", "\n".join(lines), command="python bench/distributed.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
