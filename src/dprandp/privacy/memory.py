"""A lower bound on the memory one physical chunk of a DP-SGD step needs, and the memory there is.

A chunk of ``p`` samples with ``K`` views each runs one forward pass over ``p * K`` images, and every
tensor autograd saves for the backward pass is resident when that pass starts. :func:`saved_bytes_per_view`
measures those tensors on the model itself: the bytes saved for two images minus those saved for
one is one image's share, free of what is saved once per pass (the parameters, their casts). So

    p * K * (saved_bytes_per_view + one float view)

bytes are needed at least. Per-sample gradients and the backward pass's temporaries come on top
(on the CPU the real peak was 1.4-3.5x this bound with layer-wise clipping, 5.2x with vmap;
BENCHMARKS.md, ``memory_bound``), so a chunk whose bound exceeds the free memory cannot run.
Refusing it up front is the point: otherwise the kernel's OOM killer ends the process minutes or
hours into a run, with exit status 137 and no message.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

#: The largest measured peak of a chunk over :func:`chunk_bytes_lower_bound` per clipping route, rounded
#: up (CPU; bench/memory_bound.py: layer-wise 1.4-3.5x, the most in bf16; vmap 5.2x): a chunk whose
#: bound times this exceeds the free memory may not fit (a warning, not a refusal).
PEAK_FACTOR = {"layerwise": 4.0, "vmap": 6.0}


def saved_bytes_per_view(model: nn.Module, view_shape: tuple[int, int, int], *, precision: str = "fp32") -> int:
    """Bytes autograd saves for the backward pass per image of shape ``view_shape`` (C, H, W).

    Measured with the model's current ``requires_grad`` flags (a frozen trunk saves little) and, for
    ``precision="bf16"``, under the same autocast as the DP step. The model is left unchanged.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype

    def saved(n: int) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
            return t

        x = torch.zeros((n, *view_shape), device=device, dtype=dtype)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            out = model(x)
            if out.requires_grad:
                nn.functional.cross_entropy(out.float(), torch.zeros(n, dtype=torch.long, device=device))
        return sum(storages.values())

    was_training = model.training
    model.train()
    try:
        return max(saved(2) - saved(1), 0)
    finally:
        model.train(was_training)


def chunk_bytes_lower_bound(per_view: int, view_shape: tuple[int, int, int], *, physical_batch_size: int,
                            augmult: int, dtype_size: int = 4) -> int:
    """Bytes one physical chunk needs at least: its views and what their forward pass saves."""
    view = dtype_size
    for d in view_shape:
        view *= d
    return physical_batch_size * augmult * (per_view + view)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def host_available_bytes() -> int | None:
    """Memory this process can still allocate on the host, or None where it cannot be read.

    The kernel's MemAvailable, lowered to the room left under a cgroup memory limit (containers,
    batch schedulers), v2 or v1, when one is set.
    """
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    cgroup = Path("/sys/fs/cgroup")
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(cgroup / limit_file), _read_int(cgroup / usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes ~2^63 for no limit
            room = max(limit - usage, 0)
            available = room if available is None else min(available, room)
    return available


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` for new tensors (None where unknown): the host's for the CPU; for CUDA,
    the device's free memory plus what torch's caching allocator holds but does not use."""
    if device.type == "cpu":
        return host_available_bytes()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return None
