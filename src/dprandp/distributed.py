"""Data-parallel DP-SGD and pretraining with ``torch.distributed`` (launched by ``torchrun``).

DP-SGD distributes cleanly because clipping is per sample. What must not change is the
mechanism the accountant composes, one subsampled Gaussian per logical step:

* **Sampling.** Rank ``r`` owns the shard ``r, r + W, r + 2W, ...`` of the dataset and
  Poisson-samples it at the *global* rate q with a generator of its own
  (:func:`shard_sampler`, :func:`distribute_generators`). Every sample is then kept
  independently with probability q, which is exactly Poisson sampling of the whole dataset. Ranks
  sharing one sampling stream would keep samples ``2j`` and ``2j + 1`` together: not Poisson.
* **Sum, then noise once.** Each rank sums its clipped per-sample gradients; one
  :func:`all_reduce_sum` adds the rank sums (the ``all_reduce`` hook of
  :class:`~dprandp.privacy.DPSGD`); *then* every rank adds noise N(0, σ²C²) drawn from a noise
  generator whose state is identical on all ranks, and divides by the expected global batch B.
  All ranks hold the same reduced sum (a collective returns the same bits everywhere) and the same
  noise, so they apply the same update and the weights never need to be broadcast again.
  We chose this over "rank 0 adds noise and broadcasts the gradient" because that costs a second
  collective of the model's size per step for nothing; and over "every rank adds its own noise"
  because that adds W draws (std √W·σC) and the ranks' weights drift apart.
* **Secret noise.** By default the noise seed comes from the OS entropy of *rank 0* and reaches
  the other ranks through :func:`broadcast_generator` / :func:`shared_seed`; it is never derived
  from anything a user could know. It travels over the process group's network, like the
  gradients themselves: run multi-node jobs on a network you trust.
* **Writes.** Only the main process (global rank 0, :attr:`DistContext.is_main`) writes files.

Phase I (contrastive, no privacy) is ordinary data parallelism: each rank embeds its slice of
the global batch (:func:`shard_batch`), :func:`gather_with_grad` collects the embeddings of all
ranks so that uniformity is computed over the *global* batch (as on one device), and
:func:`all_reduce_gradients` averages the parameter gradients before the optimizer step.

Without ``torchrun`` (no ``RANK``/``WORLD_SIZE`` in the environment) everything degrades to a
single process: :func:`init_distributed` returns rank 0 of 1 and every collective is the identity.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import os
import secrets
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dprandp.errors import InputError, require
from dprandp.privacy.sampling import PoissonSampler

BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True, kw_only=True)
class DistContext:
    """Where this process sits in the job. ``is_main``: the one process that writes files."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    backend: str | None = None  # None: single process, no process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def all_reduce(self):
        """The hook to pass to ``DPSGD(all_reduce=...)``: None on a single process."""
        return all_reduce_sum if self.distributed else None

    def log(self, message: str, log=None) -> None:
        """Call ``log(message)`` (default: print) on the main process only."""
        if self.is_main:
            (log or print)(message)

    def main_only(self, fn):
        """``fn`` on the main process, a do-nothing function elsewhere (for ``log=`` callbacks)."""
        return fn if self.is_main and fn is not None else (lambda *args, **kwargs: None)


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def _default_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_distributed(*, backend: str | None = None, device: str | torch.device | None = None,
                     timeout_s: float = 1800.0) -> DistContext:
    """Join the process group described by torchrun's environment, or run as a single process.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` through
    ``env://``). The backend defaults to ``nccl`` when CUDA is available (each process then uses
    ``cuda:LOCAL_RANK``) and ``gloo`` otherwise; ``backend="gloo"`` forces the CPU. Calling it
    again returns the context of the group already joined.
    """
    require(backend is None or backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if dist.is_available() and dist.is_initialized():
        return _context_from_group(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        dev = _default_device(device if backend != "gloo" else "cpu")
        return DistContext(rank=0, world_size=1, local_rank=0, device=dev, is_main=True, backend=None)
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    require(world >= 1 and 0 <= rank < world, f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    require(dist.is_available(), "this torch build has no torch.distributed")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        require(name in os.environ, f"{name} is not set; launch with torchrun (it sets RANK, WORLD_SIZE, {name})")
    if backend is None:
        wants_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        backend = "nccl" if wants_cuda else "gloo"
    require(backend != "nccl" or torch.cuda.is_available(), "backend nccl needs CUDA; use gloo on the CPU")
    if backend == "nccl":
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device) if device is not None else torch.device("cpu")
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    atexit.register(shutdown)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, is_main=rank == 0,
                       backend=backend)


def _context_from_group(device=None) -> DistContext:
    """The group joined earlier (e.g. by `pretrain` before `train` in `dprandp run`); ``device``
    only says where this caller computes (collectives move tensors where the backend needs them)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device is not None:
        dev = torch.device(device)
    else:
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, is_main=rank == 0,
                       backend=backend)


def shutdown() -> None:
    """Leave the process group (a no-op on a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device | None:
    """NCCL only moves CUDA tensors; gloo moves CPU tensors (and CUDA ones, through the host)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def _collective(tensor: torch.Tensor, fn) -> torch.Tensor:
    dev = _comm_device()
    if dev is None or tensor.device == dev:
        fn(tensor)
        return tensor
    moved = tensor.to(dev)
    fn(moved)
    tensor.copy_(moved)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of ``tensor`` over all ranks, in place; returns it. Identity on one process.

    This is the ``all_reduce`` hook of :class:`~dprandp.privacy.DPSGD`: it receives the rank's sum
    of clipped gradients (and step statistics) *before* any noise is added.
    """
    if _active():
        _collective(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return tensor


def barrier() -> None:
    if _active():
        dist.barrier()


# ---------------------------------------------------------------------------------- randomness
def rank_seed(seed: int, rank: int, stream: str = "") -> int:
    """A 63-bit seed for ``(seed, rank, stream)``, independent across ranks and streams."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(rank), zlib.crc32(stream.encode())])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def shared_seed(seed: int | None = None) -> int:
    """The same seed on every rank: ``seed`` if given, else 63 bits of rank 0's OS entropy.

    For DP noise leave ``seed`` None (secret): rank 0 draws it with :mod:`secrets` and broadcasts
    it, so one draw of noise per step is the same on all ranks. A given ``seed`` must be the
    same on every rank (checked).
    """
    value = secrets.randbits(63) if seed is None else int(seed)
    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if seed is None:
        _collective(t, lambda x: dist.broadcast(x, src=0))
        return int(t.item())
    lo, hi = t.clone(), t.clone()
    _collective(lo, lambda x: dist.all_reduce(x, op=dist.ReduceOp.MIN))
    _collective(hi, lambda x: dist.all_reduce(x, op=dist.ReduceOp.MAX))
    require(int(lo.item()) == int(hi.item()), f"ranks were given different seeds ({int(lo.item())} .. {int(hi.item())})")
    return value


def broadcast_generator(generator: torch.Generator, src: int = 0) -> torch.Generator:
    """Give every rank the state of rank ``src``'s ``generator`` (in place; returns it)."""
    if _active():
        state = generator.get_state()
        _collective(state, lambda x: dist.broadcast(x, src=src))
        generator.set_state(state)
    return generator


def gather_generator_states(generator: torch.Generator) -> list[torch.Tensor]:
    """Every rank's state of ``generator``, in rank order, on every rank (``[state]`` on one process):
    what a checkpoint needs to give each rank its own stream back on resume."""
    state = generator.get_state()
    if not _active():
        return [state]
    states = [torch.empty_like(state) for _ in range(dist.get_world_size())]
    dev = _comm_device()
    if dev is None:
        dist.all_gather(states, state)
        return states
    moved = [s.to(dev) for s in states]
    dist.all_gather(moved, state.to(dev))
    return [m.cpu() for m in moved]


def fork_generator(generator: torch.Generator, rank: int) -> torch.Generator:
    """Re-seed ``generator`` for ``rank`` (rank 0 keeps its stream; returns it).

    The new seed hashes the current state with the rank, so distinct ranks get independent
    streams whether the state came from a seed (reproducible) or from OS entropy (secret).
    """
    if rank != 0:
        digest = hashlib.sha256(generator.get_state().numpy().tobytes() + f"/rank{int(rank)}".encode()).digest()
        generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return generator


def distribute_generators(generators: Mapping[str, torch.Generator], ctx: DistContext, *,
                          shared: Iterable[str] = ("noise",),
                          per_rank: Iterable[str] = ("sampling", "augment")) -> Mapping[str, torch.Generator]:
    """Make named generators ready for data-parallel DP-SGD, in place.

    ``shared`` streams (the DP noise) get rank 0's state on every rank: one noise draw per step.
    ``per_rank`` streams (Poisson sampling, augmentation) get an independent stream per rank,
    which is what makes the union of the shards' batches a Poisson sample. On one process
    nothing changes. Call it after seeding or loading generator states, before the first step.
    """
    shared, per_rank = tuple(shared), tuple(per_rank)
    require(not set(shared) & set(per_rank), f"a stream cannot be both shared and per-rank: {set(shared) & set(per_rank)}")
    if ctx.distributed:
        for name in shared:
            if name in generators:
                broadcast_generator(generators[name])
        for name in per_rank:
            if name in generators:
                fork_generator(generators[name], ctx.rank)
    return generators


# ---------------------------------------------------------------------------------- sampling
def shard_indices(num_samples: int, ctx: DistContext) -> torch.Tensor:
    """The global indices rank ``ctx.rank`` owns: ``rank, rank + W, ...`` (disjoint, covering)."""
    return torch.arange(ctx.rank, num_samples, ctx.world_size, dtype=torch.long)


def shard_sampler(*, num_samples: int, sample_rate: float, ctx: DistContext, generator: torch.Generator,
                  steps: int | None = None) -> PoissonSampler:
    """Poisson sampler of this rank's shard at the *global* rate q; yields global indices.

    ``generator`` must be this rank's own stream (see :func:`distribute_generators`). With one
    process it is exactly ``PoissonSampler(num_samples=..., sample_rate=..., generator=...)``.
    """
    return PoissonSampler.for_shard(num_samples=num_samples, rank=ctx.rank, world_size=ctx.world_size,
                                    sample_rate=sample_rate, generator=generator, steps=steps)


def shard_batch(indices, ctx: DistContext):
    """This rank's slice ``indices[rank::W]`` of a global (non-private) batch, e.g. in Phase I.

    The global batch must split evenly, so that averaging the ranks' gradients equals the
    gradient of the global mean loss.
    """
    n = len(indices)
    require(n % ctx.world_size == 0, f"batch size {n} must be divisible by the number of processes {ctx.world_size}")
    return indices[ctx.rank::ctx.world_size]


# ---------------------------------------------------------------------------------- models
@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> nn.Module:
    """Copy rank ``src``'s parameters and buffers to every rank (e.g. after init or loading)."""
    if _active():
        for t in list(module.parameters()) + list(module.buffers()):
            _collective(t.data, lambda x: dist.broadcast(x, src=src))
    return module


@torch.no_grad()
def max_divergence(module: nn.Module) -> float:
    """max over coordinates of (max - min across ranks): 0.0 when all replicas are identical."""
    if not _active():
        return 0.0
    flat = torch.cat([t.detach().reshape(-1).double() for t in module.state_dict().values()
                      if t.is_floating_point()])
    lo, hi = flat.clone(), flat.clone()
    _collective(lo, lambda x: dist.all_reduce(x, op=dist.ReduceOp.MIN))
    _collective(hi, lambda x: dist.all_reduce(x, op=dist.ReduceOp.MAX))
    return float((hi - lo).max()) if flat.numel() else 0.0


@torch.no_grad()
def all_reduce_gradients(module: nn.Module, *, average: bool = True) -> None:
    """Sum (or average) ``.grad`` of every parameter over ranks with one collective.

    For non-private data parallelism (Phase I). Parameters without a gradient on this rank take
    part with zeros, so every rank calls the collective with the same shapes.
    """
    if not _active():
        return
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    all_reduce_sum(flat)
    if average:
        flat /= dist.get_world_size()
    offset = 0
    for p in params:
        k = p.numel()
        p.grad = flat[offset:offset + k].view_as(p).clone()
        offset += k


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; the backward sums the incoming gradients over ranks, then keeps
    this rank's rows (the adjoint of "every rank computes the loss from the gathered tensor")."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor)
        parts[rank] = tensor
        ctx.rows, ctx.rank = tensor.shape[0], rank
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = all_reduce_sum(grad.contiguous().clone())
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) from all ranks in rank order, with gradient.

    Use for the contrastive loss of Phase I so that uniformity sees the global batch:
    ``z1, z2 = gather_with_grad(z1), gather_with_grad(z2)`` then the usual loss. Every rank then
    computes the same global loss; the backward sums the gradients of all ranks' copies, so
    averaging the parameter gradients (:func:`all_reduce_gradients`, or DDP) gives exactly the
    single-device gradient of that loss. Identity on one process.
    """
    if not _active():
        return tensor
    return _GatherWithGrad.apply(tensor)


# ---------------------------------------------------------------------------------- files
def rank_run_dir(out: str | os.PathLike, ctx: DistContext, *, copy: bool = False) -> Path:
    """Where this rank writes: ``out`` on the main process, a private scratch directory elsewhere.

    Lets a training loop written for one process run unchanged on every rank (same ledger, same
    stopping decisions, same checkpoints) while only rank 0's files are real. ``copy=True``
    (for resuming) first copies ``out``'s contents, which must be readable from every node. The
    scratch directory is deleted when the process exits.
    """
    if ctx.is_main:
        return Path(out)
    scratch = Path(tempfile.mkdtemp(prefix=f"dprandp-rank{ctx.rank}-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    target = scratch / "run"
    if copy:
        require(Path(out).is_dir(), f"rank {ctx.rank} cannot read the run directory {out} (resuming needs it on every node)")
        shutil.copytree(out, target)
    return target
