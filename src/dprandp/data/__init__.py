"""Datasets for Phases II and III: ``load_dataset(name, path)`` -> :class:`ImageData`.

Every dataset comes out the same way (uint8 ``(N, 32, 32, 3)`` images, int64 labels, class
count and names) so the trainer never branches on where the images came from. Image
normalisation uses fixed constants (never statistics of the private data, which would leak).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dprandp.data.base import RESOLUTION, ImageData, make_image_data, with_validation
from dprandp.data.loaders import (
    load_cifar,
    load_digits,
    load_imagefolder,
    load_medmnist,
    load_npz,
)
from dprandp.errors import InputError

#: name -> loader(path) ; ``--dataset`` choices, in the order shown to users.
DATASETS: dict[str, Callable[[str | None], ImageData]] = {
    "digits": load_digits,
    "cifar10": lambda path: load_cifar(path, name="cifar10"),
    "cifar100": lambda path: load_cifar(path, name="cifar100"),
    "medmnist": load_medmnist,
    "imagefolder": load_imagefolder,
    "npz": load_npz,
}

#: Per-channel mean / std used to normalise inputs: the statistics of the StyleGAN-Oriented
#: Phase I images (SPEC.md), which are public constants, so normalising costs no privacy.
NORMALIZE_MEAN = (0.4409, 0.4279, 0.3868)
NORMALIZE_STD = (0.2683, 0.2610, 0.2687)


def load_dataset(name: str, path: str | None = None, *, val_fraction: float = 0.0,
                 val_seed: int = 0) -> ImageData:
    """Load dataset ``name`` from ``path`` (see :mod:`dprandp.data.loaders` for the formats).

    ``val_fraction > 0`` carves a validation split from train with ``val_seed`` (MedMNIST
    keeps its official validation split instead).
    """
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    data = DATASETS[name](None if path is None else str(path))
    return with_validation(data, fraction=val_fraction, seed=val_seed)


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW (the model's input)."""
    x = torch.as_tensor(images)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(NORMALIZE_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(NORMALIZE_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


__all__ = [
    "DATASETS",
    "ImageData",
    "NORMALIZE_MEAN",
    "NORMALIZE_STD",
    "RESOLUTION",
    "load_dataset",
    "make_image_data",
    "to_float",
    "with_validation",
]
