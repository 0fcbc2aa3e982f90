"""Arithmetic precision of Phase I: bf16 autocast where the hardware runs it natively.

Phase I touches no private data, so its precision is a speed/quality trade-off, never a privacy
question (the DP phases run in float32 unless asked otherwise, with clipping in float32 either
way: see :func:`dprandp.privacy.clipped_grad_sum`). Under bf16
autocast the convolutions and matmuls run in bfloat16 and the loss in float32; the weights, the
optimizer and the saved prior stay float32.

``auto`` picks bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX: Intel Sapphire
Rapids and later, AMD Zen 4 and later), where oneDNN runs it about 1.6-1.7x faster than float32 (this machine)
(BENCHMARKS.md, section ``pretrain_precision``); elsewhere float32, because emulated bf16 is
slower than float32.
"""

from __future__ import annotations

import torch

from dprandp.errors import require

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_native_bf16() -> bool:
    """True when this CPU executes bf16 dot products in hardware (AVX512-BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32`` for ``precision`` (one of :data:`PRECISIONS`) on ``device``."""
    require(precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"
