"""The registry of random processes: every process is a pure function of (seed, index, size).

A :class:`RandomProcess` renders image ``i`` from its own generator, seeded by
``SeedSequence([seed, i, crc32(name)])``, so image ``i`` is the same whatever the batch, the
number of workers or the order of generation; datasets can be rendered in parallel and resumed.
"""

from __future__ import annotations

import abc
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from dprandp.errors import InputError, require

MIN_SIZE = 8
MAX_SIZE = 1024


class RandomProcess(abc.ABC):
    """A random image process. Subclasses set ``name`` and ``description`` and implement
    :meth:`_render` for a validated, non-empty int64 index array."""

    name: str = ""
    description: str = ""

    def sizes_ok(self, size: int) -> bool:
        """Powers of two from 8 to 1024 (the StyleGAN processes double the resolution per block)."""
        return isinstance(size, (int, np.integer)) and MIN_SIZE <= size <= MAX_SIZE and size & (size - 1) == 0

    def size_rule(self) -> str:
        return f"a power of two from {MIN_SIZE} to {MAX_SIZE}"

    def check_size(self, size: int) -> None:
        require(self.sizes_ok(size), f"process {self.name!r} cannot render size {size!r}: the size must be {self.size_rule()}")

    def image_rng(self, seed: int, index: int) -> np.random.Generator:
        """The generator of image ``index``: depends only on (seed, index, process name)."""
        key = zlib.crc32(self.name.encode())
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index), key])))

    def render(self, indices: np.ndarray | Sequence[int], *, seed: int, size: int) -> np.ndarray:
        """Images ``indices`` as uint8 (n, size, size, 3)."""
        idx = _as_indices(indices)
        require(isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0,
                f"seed must be an integer >= 0, got {seed!r}")
        self.check_size(size)
        if idx.size == 0:
            return np.zeros((0, size, size, 3), dtype=np.uint8)
        out = self._render(idx, seed=int(seed), size=int(size))
        assert out.shape == (idx.size, size, size, 3) and out.dtype == np.uint8
        return out

    @abc.abstractmethod
    def _render(self, indices: np.ndarray, *, seed: int, size: int) -> np.ndarray: ...


def _as_indices(indices) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim == 0:
        idx = idx[None]
    require(idx.ndim == 1, "indices must be a 1-D sequence of integers")
    require(idx.size == 0 or np.issubdtype(idx.dtype, np.integer), "indices must be integers")
    idx = idx.astype(np.int64)
    require(idx.size == 0 or idx.min() >= 0, "indices must be >= 0")
    return idx


_REGISTRY: dict[str, Callable[[], RandomProcess]] = {}


def register_process(name: str, factory: Callable[[], RandomProcess]) -> None:
    """Add a process; a name can be registered once."""
    if name in _REGISTRY:
        raise ValueError(f"random process {name!r} is already registered")
    _REGISTRY[name] = factory


def list_processes() -> list[str]:
    """Registered names, the default (``stylegan-oriented``) first."""
    return list(_REGISTRY)


def get_process(name: str) -> RandomProcess:
    if name not in _REGISTRY:
        raise InputError(f"unknown random process {name!r}; known processes: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()


def describe_process(name: str) -> str:
    """One line describing the process."""
    return get_process(name).description
