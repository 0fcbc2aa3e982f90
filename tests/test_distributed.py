"""Data-parallel DP-SGD: 2 gloo processes on CPU against one process with the same seeds.

The 2-process job runs once (``tests/_distributed_worker.py``, torchrun-style environment, a free
port on 127.0.0.1); each test compares one of its outputs with an independent single-process
reference computed here. Sharded Poisson sampling is checked against the Binomial(N, q) law.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dprandp import distributed as D
from dprandp.errors import InputError
from dprandp.models import create_model
from dprandp.privacy import DPSGD, DPConfig, PoissonSampler

WORKER = Path(__file__).with_name("_distributed_worker.py")
SPEC = {"num_samples": 48, "batch_size": 12, "augmult": 2, "image_size": 8, "physical_batch_size": 1,
        "max_grad_norm": 1.0, "lr": 0.5, "steps": 3, "sigma": 2.0, "data_seed": 11, "model_seed": 3,
        "sampling_seed": 7, "noise_seed": 5, "gather_batch": 8}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, world_size: int = 2, timeout: float = 120.0) -> list[dict]:
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), json.dumps(SPEC)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} failed:\n{logs[rank][-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("dist"))




def data():
    g = torch.Generator().manual_seed(SPEC["data_seed"])
    n, k, s = SPEC["num_samples"], SPEC["augmult"], SPEC["image_size"]
    return torch.randn(n, k, 3, s, s, generator=g), torch.randint(0, 10, (n,), generator=g)


def union_batches(world_size: int, steps: int) -> list[torch.Tensor]:
    """What a single process would sample: the union over ranks of each rank's shard batch."""
    per_rank = []
    for r in range(world_size):
        g = torch.Generator().manual_seed(D.rank_seed(SPEC["sampling_seed"], r, "sampling"))
        shard = torch.arange(r, SPEC["num_samples"], world_size)
        q = SPEC["batch_size"] / SPEC["num_samples"]
        per_rank.append([shard[torch.rand(shard.numel(), generator=g, dtype=torch.float64) < q] for _ in range(steps)])
    return [torch.sort(torch.cat([b[t] for b in per_rank])).values for t in range(steps)]


# ------------------------------------------------------------------------------ 2 processes
def test_ranks_sample_disjoint_shards_whose_union_is_the_logical_batch(ranks):
    expected = union_batches(2, SPEC["steps"])
    for t in range(SPEC["steps"]):
        b0, b1 = ranks[0]["exact"]["batches"][t], ranks[1]["exact"]["batches"][t]
        assert bool((b0 % 2 == 0).all()) and bool((b1 % 2 == 1).all())
        assert torch.equal(torch.sort(torch.cat([b0, b1])).values, expected[t])
        # the engine's statistics are summed over ranks: the global realised batch size
        assert ranks[0]["exact"]["reduced_sizes"][t] == expected[t].numel() == ranks[1]["exact"]["reduced_sizes"][t]


def test_sigma_zero_two_processes_equal_one_process(ranks):
    """Each 2-process step equals the 1-process step on the union batch, to float32 rounding.

    The reference restarts every step from the weights the ranks held before it: ReLU kinks make
    a multi-step trajectory chaotic at the 1e-7 level (a rounding difference can flip one unit
    of one sample and move the weights by 1e-4), which would test the model, not the engine.
    One sample per physical chunk makes the per-sample gradients bitwise the same in both runs,
    so the only difference left is the order of the sum (rank sums, then the all-reduce).
    """
    x, y = data()
    model = create_model("wrn-10-1", num_classes=10, seed=SPEC["model_seed"])
    assert all(torch.equal(v, ranks[0]["exact"]["before"][k]) for k, v in model.state_dict().items())
    cfg = DPConfig.for_dataset(num_samples=SPEC["num_samples"], batch_size=SPEC["batch_size"], noise_multiplier=0.0,
                               max_grad_norm=SPEC["max_grad_norm"], augmult=SPEC["augmult"],
                               physical_batch_size=SPEC["physical_batch_size"])
    states = ranks[0]["exact"]["states"]
    moved = 0.0
    for t, batch in enumerate(union_batches(2, SPEC["steps"])):
        model.load_state_dict(states[t])
        engine = DPSGD(model, torch.optim.SGD(model.parameters(), lr=SPEC["lr"]), config=cfg,
                       noise_generator=torch.Generator().manual_seed(0))
        engine.step(x[batch], y[batch])
        for name, w in model.state_dict().items():
            for r in (0, 1):
                got = ranks[r]["exact"]["states"][t + 1][name]
                torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6, msg=f"step {t + 1}, rank {r}, {name}")
            moved = max(moved, float((w - states[t][name]).abs().max()))
    assert moved > 1e-3  # the steps did change the weights, so equality is not vacuous
    assert ranks[0]["exact"]["divergence"] == 0.0  # both replicas hold bit-identical weights


def test_noise_is_added_once_per_logical_batch(ranks):
    # zero per-sample gradients: the update is pure noise, lr * N(0, sigma^2 C^2) / B per step
    before, after = ranks[0]["noise"]["before"], ranks[0]["noise"]["after"]
    delta = torch.cat([(after[k] - before[k]).reshape(-1) for k in before if before[k].is_floating_point()])
    expected = SPEC["lr"] * SPEC["sigma"] * SPEC["max_grad_norm"] * math.sqrt(SPEC["steps"]) / SPEC["batch_size"]
    n = delta.numel()
    assert n > 50_000
    std = float(delta.double().std())
    # relative standard error of a std estimate over n normal coordinates is 1/sqrt(2n) (~0.25 %)
    assert abs(std / expected - 1) < 6 / math.sqrt(2 * n), (std, expected)
    assert abs(float(delta.double().mean())) < 6 * expected / math.sqrt(n)
    # same secret noise on both ranks (seed from rank 0's entropy, broadcast): replicas stay equal
    for k in before:
        assert torch.equal(ranks[1]["noise"]["after"][k], after[k])
    assert ranks[0]["noise"]["divergence"] == 0.0


def test_gathered_contrastive_loss_matches_single_process_global_batch(ranks):
    g = torch.Generator().manual_seed(SPEC["data_seed"] + 1)
    b = SPEC["gather_batch"]
    x1, x2 = torch.randn(b, 6, generator=g), torch.randn(b, 6, generator=g)
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    z1, z2 = (torch.nn.functional.normalize(lin(v), dim=1) for v in (x1, x2))
    # independent reference: an explicit double loop over pairs of the global batch
    align = sum(float((z1[i] - z2[i]).pow(2).sum().detach()) for i in range(b)) / b
    unif = 0.0
    for z in (z1, z2):
        terms = [torch.exp(-2 * (z[i] - z[j]).pow(2).sum()) for i in range(b) for j in range(i + 1, b)]
        unif = unif + torch.log(torch.stack(terms).mean()) / 2
    loss = (z1 - z2).pow(2).sum(1).mean() + unif
    loss.backward()
    assert abs(align + unif.item() - loss.item()) < 1e-5
    for r in (0, 1):
        assert abs(ranks[r]["gather"]["loss"] - loss.item()) < 1e-5
        for name, p in lin.named_parameters():
            torch.testing.assert_close(ranks[r]["gather"]["grads"][name], p.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ one process
def test_sharded_poisson_sampling_is_poisson_over_the_whole_dataset():
    n, world, q, steps = 600, 3, 0.05, 3000
    ctxs = [D.DistContext(rank=r, world_size=world, local_rank=r, device=torch.device("cpu"), is_main=r == 0)
            for r in range(world)]
    shards = [set(D.shard_indices(n, c).tolist()) for c in ctxs]
    assert set().union(*shards) == set(range(n)) and sum(map(len, shards)) == n  # disjoint and covering

    def sizes(fork: bool) -> torch.Tensor:
        samplers = []
        for c in ctxs:
            g = torch.Generator().manual_seed(1234)  # same run seed on every rank, as with --seed
            samplers.append(D.shard_sampler(num_samples=n, sample_rate=q, ctx=c,
                                            generator=D.fork_generator(g, c.rank) if fork else g))
        out = []
        for _ in range(steps):
            batches = [s.sample() for s in samplers]
            for c, b in zip(ctxs, batches):
                assert set(b.tolist()) <= shards[c.rank]
            out.append(sum(b.numel() for b in batches))
        return torch.tensor(out, dtype=torch.float64)

    s = sizes(fork=True)
    mean, var = n * q, n * q * (1 - q)  # Binomial(N, q)
    assert abs(float(s.mean()) - mean) < 4 * math.sqrt(var / steps)
    assert abs(float(s.var()) - var) < 4 * var * math.sqrt(2 / (steps - 1))
    # negative control: one shared sampling stream makes shards move together (variance x world)
    shared = sizes(fork=False)
    assert float(shared.var()) > 2 * var


def test_single_process_fallback_and_identity_collectives(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = D.init_distributed(backend="gloo")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed, ctx.all_reduce) == (0, 1, True, False, None)
    t = torch.arange(4.0)
    assert torch.equal(D.all_reduce_sum(t.clone()), t) and D.gather_with_grad(t) is t
    assert D.shared_seed(42) == 42 and D.shared_seed() != D.shared_seed()  # fresh entropy per call
    g = torch.Generator().manual_seed(9)
    gens = {"noise": torch.Generator().manual_seed(1), "sampling": g}
    state = g.get_state().clone()
    D.distribute_generators(gens, ctx)
    assert torch.equal(g.get_state(), state)  # one process: nothing changes
    # a one-process shard sampler is the plain PoissonSampler, draw for draw
    a = D.shard_sampler(num_samples=50, sample_rate=0.3, ctx=ctx, generator=torch.Generator().manual_seed(4))
    b = PoissonSampler(num_samples=50, sample_rate=0.3, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a.sample(), b.sample()) for _ in range(5))


def test_bad_environment_is_an_input_error(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="RANK"):
        D.init_distributed(backend="gloo")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(InputError, match="not an integer"):
        D.init_distributed(backend="gloo")


def test_fork_generator_gives_distinct_reproducible_streams():
    def fork(rank):
        return D.fork_generator(torch.Generator().manual_seed(77), rank)
    draws = [torch.rand(8, generator=fork(r)) for r in range(3)]
    assert torch.equal(draws[0], torch.rand(8, generator=torch.Generator().manual_seed(77)))  # rank 0 keeps its stream
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])
    assert torch.equal(torch.rand(8, generator=fork(2)), draws[2])
    assert D.shard_batch(torch.arange(8), D.DistContext(rank=1, world_size=2, local_rank=1,
                                                       device=torch.device("cpu"), is_main=False)).tolist() == [1, 3, 5, 7]
    with pytest.raises(InputError, match="divisible"):
        D.shard_batch(torch.arange(7), D.DistContext(rank=0, world_size=2, local_rank=0,
                                                     device=torch.device("cpu"), is_main=True))


def test_only_rank_zero_writes_to_the_real_run_directory(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ledger.jsonl").write_text("{}\n")
    main = D.DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), is_main=True)
    other = D.DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), is_main=False)
    assert D.rank_run_dir(out, main) == out
    scratch = D.rank_run_dir(out, other, copy=True)
    assert scratch != out and (scratch / "ledger.jsonl").read_text() == "{}\n"
    (scratch / "ledger.jsonl").write_text("changed")
    assert (out / "ledger.jsonl").read_text() == "{}\n"
    said = []
    main.main_only(said.append)("a")
    other.main_only(said.append)("b")
    assert said == ["a"]


@pytest.mark.slow
def test_torchrun_train_two_processes_one_run_directory(tmp_path):
    """`torchrun --nproc-per-node 2 -m dprandp train`: one report, one run directory, global batches."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "dprandp", "train", "--preset", "demo", "--prior", "none",
           "--steps", "3", "--eval-every", "0", "--no-progress", "--json", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    reports = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 1 is silent
    summary = json.loads(reports[0])
    steps = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s.get("kind") == "step"]
    assert len(steps) == 3 and summary["steps"] == 3
    # metrics hold the realised *global* batch (summed over ranks): Binomial(N, q) with N q = 256,
    # far from the ~128 of one rank's shard
    sizes = [json.loads(line)["batch_size"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind") == "step"]
    assert len(sizes) == 3 and all(200 < s < 320 for s in sizes), sizes


_PRETRAIN_WORKER = """
import sys, torch
torch.set_num_threads(1)
from dprandp.pretrain import open_store, pretrain, PretrainConfig
cfg = PretrainConfig(model="wrn-10-1", hidden=32, out_dim=16, head_groups=8, batch_size=16, lr_per_256=0.5, epochs=2,
                     seed=4)
mode, out = sys.argv[1], sys.argv[2]
kw = dict(device="cpu", progress=False, precision="fp32")
if mode == "full":
    pretrain(cfg, open_store(sys.argv[3]), out=out, **kw)
elif mode == "half":
    pretrain(cfg, open_store(sys.argv[3]), out=out, stop_after_epoch=1, **kw)
else:
    pretrain(cfg, open_store(sys.argv[3]), out=out, resume=True, **kw)
"""


def test_phase1_resume_on_two_processes_equals_the_uninterrupted_run(tmp_path):
    """Every rank's augmentation stream is saved and given back: 1 + 1 epochs == 2 epochs, bit for bit
    (found in review: ranks other than 0 re-forked rank 0's stream and drifted)."""
    import numpy as np

    from dprandp.pretrain import load_prior

    rng = np.random.default_rng(0)
    coarse = torch.tensor(rng.random((48, 3, 4, 4)))
    images = torch.nn.functional.interpolate(coarse, size=16, mode="bilinear").permute(0, 2, 3, 1).numpy()
    np.save(tmp_path / "s.npy", (images * 255).astype(np.uint8))
    script = tmp_path / "worker.py"
    script.write_text(_PRETRAIN_WORKER)

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(script), *args, str(tmp_path / "s.npy")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    torchrun("full", str(tmp_path / "full.pt"))
    torchrun("half", str(tmp_path / "res.pt"))
    torchrun("resume", str(tmp_path / "res.pt"))
    (a, meta_a), (b, meta_b) = load_prior(tmp_path / "full.pt"), load_prior(tmp_path / "res.pt")
    assert meta_a["provenance"]["epoch_losses"] == meta_b["provenance"]["epoch_losses"]
    assert all(torch.equal(a[k], b[k]) for k in a)
