"""StyleGAN random processes (Oriented, High-frequency, Random) as registry entries.

Oriented and High-frequency render through the fast exact path (:mod:`.stylegan_fast`), a batch
at a time; :meth:`StyleGANProcess.network_output` also exposes the full-width reference
(:mod:`.stylegan_reference`) for tests and benchmarks. Random has dense weights and no shortcut:
it renders image by image through the reference evaluator at width 64.
"""

from __future__ import annotations

import numpy as np
import torch

from dprandp.processes import stylegan_fast, stylegan_reference
from dprandp.processes.registry import RandomProcess
from dprandp.processes.stylegan_params import (
    HIGHFREQ,
    ORIENTED,
    ORIENTED_N512,
    RANDOM,
    ImageParams,
    Variant,
    sample_params,
    to_uint8,
)

BATCH = 32  # images per fast-path batch (results do not depend on it)


class StyleGANProcess(RandomProcess):
    def __init__(self, variant: Variant, description: str):
        self.variant = variant
        self.name = variant.name
        self.description = description

    def params(self, index: int, *, seed: int, size: int) -> ImageParams:
        return sample_params(self.image_rng(seed, index), size, self.variant)

    def network_output(self, indices, *, seed: int, size: int, reference: bool = False) -> np.ndarray:
        """(n, 3, S, S) float outputs before colour normalisation; ``reference=True`` uses the
        full-width evaluator (float64, slow)."""
        self.check_size(size)
        params = [self.params(int(i), seed=seed, size=size) for i in indices]
        if reference or self.variant.dense:
            dtype = torch.float64 if reference else torch.float32
            return np.stack([stylegan_reference.synthesize(p, dtype=dtype) for p in params])
        return stylegan_fast.synthesize_batch(params)

    def render_reference(self, indices, *, seed: int, size: int) -> np.ndarray:
        """uint8 images through the full-width reference (tests, benchmarks)."""
        params = [self.params(int(i), seed=seed, size=size) for i in indices]
        imgs = [to_uint8(stylegan_reference.synthesize(p), p) for p in params]
        return np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8)

    def _render(self, indices: np.ndarray, *, seed: int, size: int) -> np.ndarray:
        out = np.empty((indices.size, size, size, 3), dtype=np.uint8)
        for start in range(0, indices.size, BATCH):
            chunk = indices[start : start + BATCH]
            params = [self.params(int(i), seed=seed, size=size) for i in chunk]
            if self.variant.dense:
                imgs = [stylegan_reference.synthesize(p, dtype=torch.float32) for p in params]
            else:
                imgs = stylegan_fast.synthesize_batch(params)
            for j, (img, p) in enumerate(zip(imgs, params)):
                out[start + j] = to_uint8(img, p)
        return out


def oriented() -> StyleGANProcess:
    return StyleGANProcess(ORIENTED, "StyleGAN-Oriented (default): untrained StyleGAN2 with oriented-edge/line filter "
                           "bank weights, random biases, 1/f noise; colourful oriented textures (ImageNet-100 probe 43.5%)")


def oriented_n512() -> StyleGANProcess:
    return StyleGANProcess(ORIENTED_N512, "StyleGAN-Oriented with the original's noise map: the 1/f map drawn at 512 px "
                           "and area-downsampled to each layer (up to 3x weaker per-layer noise than stylegan-oriented)")


def highfreq() -> StyleGANProcess:
    return StyleGANProcess(HIGHFREQ, "StyleGAN-High-freq: the same network with all 40 bank filters in every layer, "
                           "zero biases, an independent 1/f noise map per layer (probe 42.3%)")


def random() -> StyleGANProcess:
    return StyleGANProcess(RANDOM, "StyleGAN-Random: untrained StyleGAN2 with dense Gaussian 3x3 weights, no noise "
                           "(width 64 instead of 512 to stay affordable on a CPU; probe 34.2%)")
