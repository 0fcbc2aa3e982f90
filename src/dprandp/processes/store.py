"""Render a random process to one uint8 ``.npy`` store, incrementally and in parallel.

The array (num, size, size, 3) is written through ``numpy.lib.format.open_memmap`` into a
temporary file next to the output and renamed over it only when complete, so a reader never sees
half a store; Ctrl-C or SIGTERM (``timeout``, a scheduler) removes the temporary file. The sidecar
``OUT.npy.json`` records the array's shape, dtype and :func:`content_fingerprint`, so a reader can
tell when the array was later replaced by other means. Images are rendered in fixed chunks of
:data:`CHUNK` indices; every image depends only on (process, seed, index, size) and every renderer
runs torch with one thread, so the bytes are the same for any number of workers. Everything a user
can get wrong is checked by :func:`check_request` before any image is rendered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dprandp.errors import InputError, check_writable, require
from dprandp.processes.registry import get_process

CHUNK = 64
HEADER_BYTES = 4096  # generous bound on the .npy header
GRID_IMAGES = 64
TERMINATED = 128 + signal.SIGTERM  # the exit status of a process ended by SIGTERM


@dataclass(frozen=True)
class GenerateRequest:
    process: str
    num: int
    size: int
    seed: int
    out: Path
    workers: int = 1
    overwrite: bool = False
    grid: Path | None = None

    @property
    def nbytes(self) -> int:
        return self.num * self.size * self.size * 3


def sidecar_path(out: Path) -> Path:
    """``OUT.npy.json``: what the store holds (process, seed, size, count; shape, dtype and content
    fingerprint to check it against the array), read by ``dprandp pretrain`` so that a prior records
    where its images came from."""
    return out.with_name(out.name + ".json")


def content_fingerprint(array: np.ndarray, per_end: int = 8) -> str:
    """SHA-256 of a few images from the start, middle and end of a store (cheap on a memory map): a
    store regenerated in place with the same shape (another seed or process) no longer matches.
    ``dprandp generate`` records it in the sidecar; ``dprandp pretrain`` in a prior's resume state."""
    n = len(array)
    picks = sorted({*range(min(per_end, n)), *range(max(0, n // 2 - per_end // 2), min(n, n // 2 + per_end // 2)),
                    *range(max(0, n - per_end), n)})
    return hashlib.sha256(np.ascontiguousarray(array[picks]).tobytes()).hexdigest()


@contextlib.contextmanager
def _sigterm_raises_system_exit():
    """While the store is written, SIGTERM raises ``SystemExit(TERMINATED)`` instead of killing the
    process outright, so that ``finally`` removes the temporary store (as it does for Ctrl-C); the
    exit status is the one a shell reports for a SIGTERM death (143). Signal handlers can only be set
    in the main thread: elsewhere, no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        raise SystemExit(TERMINATED)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default is the closest
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _init_worker() -> None:
    """Pool workers: SIGTERM kills (``pool.terminate()`` sends it; the parent's handler is inherited
    through fork), and Ctrl-C is the parent's to handle (no traceback per worker)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_request(req: GenerateRequest) -> None:
    """Raise :class:`InputError` for anything that would make the run fail; renders nothing."""
    proc = get_process(req.process)
    require(isinstance(req.num, int) and req.num > 0, f"--num must be an integer > 0, got {req.num}")
    proc.check_size(req.size)
    require(isinstance(req.seed, int) and req.seed >= 0, f"--seed must be an integer >= 0, got {req.seed}")
    require(isinstance(req.workers, int) and req.workers >= 1, f"--workers must be an integer >= 1, got {req.workers}")
    require(req.out.suffix == ".npy", f"--out must end in .npy, got {req.out}")
    check_writable(req.out, "output", req.overwrite)
    check_writable(sidecar_path(req.out), "store description", req.overwrite)
    if req.grid is not None:
        require(req.grid.suffix.lower() == ".png", f"--grid must end in .png, got {req.grid}")
        check_writable(req.grid, "grid", req.overwrite)
        require(req.grid.resolve() != req.out.resolve(), "--grid and --out must be different files")
    parent = req.out.parent if str(req.out.parent) else Path(".")
    free = shutil.disk_usage(parent).free
    need = req.nbytes + HEADER_BYTES
    require(free >= need, f"not enough disk space in {parent}: the store needs {need / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB free")


def _render_chunk(task: tuple[str, int, int, int, int]) -> tuple[int, np.ndarray, float]:
    """Render one chunk with one torch thread; returns (start, images, CPU seconds spent)."""
    import torch

    cpu = time.process_time()
    name, seed, size, start, stop = task
    torch.set_num_threads(1)
    images = get_process(name).render(np.arange(start, stop), seed=seed, size=size)
    return start, images, time.process_time() - cpu


def save_grid(images: np.ndarray, path: Path, *, columns: int = 8, gap: int = 2) -> None:
    """Save up to ``columns`` x ``columns`` images as one PNG with white gaps (atomic)."""
    from PIL import Image

    n = min(len(images), columns * columns)
    cols = min(columns, n)
    rows = -(-n // cols)
    s = images.shape[1]
    canvas = np.full((rows * (s + gap) - gap, cols * (s + gap) - gap, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[r * (s + gap) : r * (s + gap) + s, c * (s + gap) : c * (s + gap) + s] = images[k]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        Image.fromarray(canvas).save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def generate(req: GenerateRequest, *, progress: bool | None = None) -> dict:
    """Render ``req.num`` images to ``req.out``; returns a summary (path, shape, seconds, rate).

    Interrupted (Ctrl-C: KeyboardInterrupt; SIGTERM: ``SystemExit(TERMINATED)``), it leaves ``req.out``
    and its sidecar as they were and removes its temporary files (the grid, a preview written just
    before the store is renamed into place, may already be new)."""
    import torch
    from tqdm import tqdm

    check_request(req)
    tmp = req.out.with_name(f".{req.out.name}.{os.getpid()}.tmp.npy")
    meta_tmp = req.out.with_name(f".{req.out.name}.{os.getpid()}.tmp.json")
    tasks = [(req.process, req.seed, req.size, a, min(a + CHUNK, req.num)) for a in range(0, req.num, CHUNK)]
    show = sys.stderr.isatty() if progress is None else progress
    start_time = time.perf_counter()
    parent_cpu = time.process_time()
    worker_cpu = 0.0
    threads = torch.get_num_threads()
    pool = None
    with _sigterm_raises_system_exit():
        try:
            store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(req.num, req.size, req.size, 3))
            if req.workers > 1:
                # fork (as torch's DataLoader does) starts in milliseconds; spawn re-imports torch per worker
                method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
                pool = mp.get_context(method).Pool(min(req.workers, len(tasks)), initializer=_init_worker)
                results = pool.imap_unordered(_render_chunk, tasks)
            else:
                results = map(_render_chunk, tasks)
            first_at = None
            with tqdm(total=req.num, unit="img", desc=req.process, disable=not show) as bar:
                for a, images, cpu in results:
                    store[a : a + len(images)] = images
                    worker_cpu += cpu if req.workers > 1 else 0.0
                    bar.update(len(images))
                    if first_at is None:
                        first_at = time.perf_counter() - start_time
            store.flush()
            first = np.array(store[:GRID_IMAGES])
            fingerprint = content_fingerprint(store)
            del store
            if req.grid is not None:  # before the store's rename: after it, nothing slow remains to interrupt
                save_grid(first, req.grid)
            # what the store holds, checked against the array by `open_store` (the array may be replaced later)
            meta = {"process": req.process, "num_images": req.num, "size": req.size, "seed": req.seed,
                    "shape": [req.num, req.size, req.size, 3], "dtype": "uint8", "content_sha256": fingerprint,
                    "generator": "dprandp generate"}
            meta_tmp.write_text(json.dumps(meta) + "\n")
            os.replace(tmp, req.out)
            os.replace(meta_tmp, sidecar_path(req.out))
        finally:
            torch.set_num_threads(threads)
            if pool is not None:
                pool.terminate()
                pool.join()
            tmp.unlink(missing_ok=True)
            meta_tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - start_time
    cpu_s = worker_cpu + time.process_time() - parent_cpu  # rendering + writing, all processes
    # after the first chunk arrives the workers are up: the rate from there on is what a long run sees
    rest = req.num - min(req.workers, len(tasks)) * CHUNK  # every worker's first chunk counts as start-up
    steady = rest / (seconds - first_at) if rest > 0 and seconds > first_at else req.num / seconds
    return {"out": str(req.out), "shape": [req.num, req.size, req.size, 3], "process": req.process,
            "seed": req.seed, "seconds": round(seconds, 3), "images_per_s": round(req.num / seconds, 1),
            "first_chunk_s": round(first_at, 3), "steady_images_per_s": round(steady, 1),
            "cpu_ms_per_image": round(1e3 * cpu_s / req.num, 2),
            "grid": str(req.grid) if req.grid else None}


__all__ = ["TERMINATED", "GenerateRequest", "InputError", "check_request", "content_fingerprint", "generate",
           "save_grid"]
