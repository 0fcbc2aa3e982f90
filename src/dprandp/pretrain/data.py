"""Where Phase I images come from: a ``.npy`` store on disk, or a random process rendered by index.

Both look the same to the trainer: ``len(source)``, ``source.image_size`` and
``source.batch(indices) -> uint8 (n, H, W, 3)``. Stores are memory-mapped, so a 105k-image store
(1.3 GB at 64 px) costs no RAM up front. A process is rendered once into memory when the images fit
in ``in_memory_bytes`` (cheaper than re-rendering every epoch), else batch by batch; either way
image ``i`` is always the same picture (the generators are deterministic by index and seed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dprandp.errors import InputError, require


class ArrayStore:
    """A uint8 (N, H, W, 3) array (in memory or memory-mapped)."""

    def __init__(self, array: np.ndarray, *, description: dict | None = None) -> None:
        validate_images(array, "image store")
        self.array = array
        self.description = description or {"kind": "array", "shape": list(array.shape)}

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.array.shape[1])

    def batch(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices)
        order = np.argsort(indices, kind="stable")  # read a memory map in file order
        out = np.empty((len(indices),) + self.array.shape[1:], dtype=np.uint8)
        out[order] = self.array[indices[order]]
        return out

    def describe(self) -> dict:
        return dict(self.description)


def validate_images(array, what: str) -> None:
    require(isinstance(array, np.ndarray), f"{what} is not a numpy array (got {type(array).__name__})")
    require(array.dtype == np.uint8, f"{what} must be uint8, got {array.dtype}")
    require(array.ndim == 4 and array.shape[-1] == 3, f"{what} must have shape (N, H, W, 3), got {tuple(array.shape)}")
    require(array.shape[0] >= 2, f"{what} holds {array.shape[0]} images; need at least 2")
    require(min(array.shape[1:3]) >= 8, f"{what} images are {array.shape[1]}x{array.shape[2]} px; need at least 8x8")


def content_fingerprint(array: np.ndarray, per_end: int = 8) -> str:
    """SHA-256 of a few images of a store: :func:`dprandp.processes.store.content_fingerprint`, defined
    there because ``dprandp generate`` records it in the store's sidecar (and must not import Phase I)."""
    from dprandp.processes.store import content_fingerprint as fingerprint

    return fingerprint(array, per_end)


def open_store(path: str | os.PathLike) -> ArrayStore:
    """Memory-map and validate a ``.npy`` store written by ``dprandp generate`` (or anything else)."""
    path = Path(path)
    require(path.is_file(), f"image store {str(path)!r} does not exist")
    from dprandp.data.loaders import require_numpy_file

    require_numpy_file(path, "npy", "image store")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise InputError(f"image store {str(path)!r} is not a .npy array ({type(exc).__name__}: {exc})") from None
    validate_images(array, f"image store {str(path)!r}")
    description = {"kind": "store", "path": str(path.resolve()), "shape": list(array.shape),
                   "content_sha256": content_fingerprint(array)}
    # `dprandp generate`'s own sidecar (STORE.npy.json) first; STORE.json is a fallback that an unrelated
    # file of that name could be, so it only counts when the generator's is absent
    for sidecar in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if sidecar.is_file():  # metadata a generator may have written beside the store
            try:
                meta = json.loads(sidecar.read_text())
            except (OSError, ValueError):
                break
            mismatch = sidecar_mismatch(meta, array, description["content_sha256"])
            if mismatch is None:
                description["store_meta"] = meta
            else:  # a prior trained on these images must not claim the process and seed of others
                description["store_meta_ignored"] = (f"{sidecar.name} ignored ({mismatch}): "
                                                     "the store's process is unknown")
            break
    return ArrayStore(array, description=description)


def sidecar_mismatch(meta, array: np.ndarray, fingerprint: str) -> str | None:
    """Why a sidecar does not describe ``array``, or None when every field it records agrees with it.

    The sidecar is a separate file: the array can be overwritten by other means (``np.save``, a copy)
    and leave a stale one beside it. ``dprandp generate`` records shape, dtype and the content
    fingerprint; older sidecars only ``num_images`` and ``size``, and a hand-written one may record
    none of these (it is then taken at its word: a store without a sidecar is legitimate too).
    """
    if not isinstance(meta, dict):
        return f"not a JSON object but {type(meta).__name__}"
    height, width = array.shape[1:3]
    have = {"num_images": array.shape[0], "size": height if height == width else f"{height}x{width}",
            "shape": list(array.shape), "dtype": str(array.dtype), "content_sha256": fingerprint}
    for key, value in have.items():
        if key in meta and meta[key] != value:
            return (f"it records {key} {meta[key]!r}, the store has {value!r}" if key != "content_sha256"
                    else "it records other image contents (same shape; the store was rewritten)")
    return None


class ProcessSource:
    """Images rendered on demand by a random process: image ``i`` = ``render([i], seed, size)``."""

    def __init__(self, process, name: str, num: int, *, size: int, seed: int) -> None:
        self.process, self.name, self.num, self.size, self.seed = process, name, num, size, seed

    def __len__(self) -> int:
        return self.num

    @property
    def image_size(self) -> int:
        return self.size

    def batch(self, indices: np.ndarray) -> np.ndarray:
        out = np.asarray(self.process.render(np.asarray(indices, dtype=np.int64), seed=self.seed, size=self.size))
        require(out.dtype == np.uint8 and out.shape == (len(indices), self.size, self.size, 3),
                f"process {self.name!r} rendered {out.dtype} {tuple(out.shape)}, expected uint8 (n, {self.size}, {self.size}, 3)")
        return out

    def describe(self) -> dict:
        return {"kind": "process", "process": self.name, "num_images": self.num, "size": self.size, "seed": self.seed}


def process_source(name: str, num: int, *, size: int, seed: int, in_memory_bytes: int = 1 << 30, progress: bool = False):
    """A source for ``num`` images of process ``name``: rendered up front if they fit in memory."""
    require(2 <= num <= 10**9, f"--num must be in 2..1e9, got {num}")
    try:
        from dprandp import processes  # imported lazily: the generators are a separate module
    except ImportError:
        processes = None
    if not hasattr(processes, "list_processes"):
        raise InputError("random-process generators (dprandp.processes) are not available; use --images")
    known = list(processes.list_processes())
    require(name in known, f"unknown process {name!r}; known processes: {', '.join(known)}")
    source = ProcessSource(processes.get_process(name), name, num, size=size, seed=seed)
    if num * size * size * 3 > in_memory_bytes:
        return source
    from tqdm.auto import tqdm

    array = np.empty((num, size, size, 3), dtype=np.uint8)
    chunk = 256
    for start in tqdm(range(0, num, chunk), desc=f"render {name}", unit="batch", disable=not progress):
        idx = np.arange(start, min(num, start + chunk))
        array[idx] = source.process.render(idx, seed=seed, size=size)
    return ArrayStore(array, description=source.describe())
