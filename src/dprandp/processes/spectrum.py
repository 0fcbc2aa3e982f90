"""Spectrum + Colour: a random 1/f^s power law and the colour statistics of a random palette.

Following Baradad et al.'s statistical image models, per image:

- a palette image: 3-22 random colours with random proportions, box-blurred, whose colour PCA
  gives a decorrelating basis, a mean colour and one target histogram per decorrelated channel;
- a spectrum: amplitude 1 / (|fx|^sx + |fy|^sy) with s ~ U(0.5, 3.5) and a small anisotropy
  (sx, sy = s +- d, d ~ N(0, (3/60)^2));
- starting from uniform noise in the decorrelated space, 10 alternating projections: impose the
  amplitude spectrum (keeping the phase, mean and std of each channel), then the palette's
  histograms (exact rank matching); then map back through the palette's PCA and stretch to
  [0, 255].
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from dprandp.processes.registry import RandomProcess

N_ITER = 10
SLOPE_RANGE = (0.5, 3.5)


def _box_blur(x: np.ndarray, m: int) -> np.ndarray:
    """Mean over an m x m window with symmetric (mirror) boundaries, per channel, same size."""
    if m <= 1:
        return x
    before, after = (m - 1) // 2, m // 2
    p = np.pad(x, ((0, 0), (before, after), (before, after)), mode="symmetric")
    c = np.cumsum(np.cumsum(p, axis=1), axis=2)
    c = np.pad(c, ((0, 0), (1, 0), (1, 0)))
    h, w = x.shape[1:]
    return (c[:, m : m + h, m : m + w] - c[:, :h, m : m + w] - c[:, m : m + h, :w] + c[:, :h, :w]) / (m * m)


def palette(rng: np.random.Generator, size: int):
    """(basis (3, 3), mean colour (3,), sorted target values (3, size^2)) of a random palette image."""
    n_colours = 3 + int(np.floor(rng.uniform(0, 20)))
    p = 0.001 + rng.uniform(0, 1, n_colours)
    counts = rng.multinomial(size * size, p / p.sum())
    index = np.repeat(np.arange(n_colours), counts).reshape(size, size)
    colours = np.floor(rng.uniform(0, 256, size=(n_colours, 3)))
    ref = colours[index].transpose(2, 0, 1)
    ref = _box_blur(ref, int(np.ceil(rng.uniform(0, 10))))
    ref = ref + rng.uniform(0, 10)
    ref = ref - ref.min()
    ref = 255.0 * ref / max(ref.max(), 1e-12)
    flat = ref.reshape(3, -1)
    mean = flat.mean(axis=1)
    centred = flat - mean[:, None]
    _, vecs = np.linalg.eigh(centred @ centred.T)
    basis = vecs.T  # rows: principal directions
    target = np.sort(basis @ centred, axis=1)
    return basis, mean, target


@lru_cache(maxsize=None)
def _freq(size: int) -> tuple[np.ndarray, np.ndarray]:
    f = np.abs(np.fft.fftfreq(size))
    return f[:, None], f[None, :]


def spectrum(rng: np.random.Generator, size: int) -> np.ndarray:
    s = rng.uniform(*SLOPE_RANGE)
    d = rng.normal() * (SLOPE_RANGE[1] - SLOPE_RANGE[0]) / 60.0
    fy, fx = _freq(size)
    with np.errstate(divide="ignore"):
        amp = 1.0 / (1e-16 + fx ** (s + d) + fy ** (s - d))
    amp[0, 0] = 0.0
    return amp


def spectrum_colour(rng: np.random.Generator, size: int) -> np.ndarray:
    basis, mean, target = palette(rng, size)
    amp = spectrum(rng, size)
    x = 256.0 * rng.uniform(size=(3, size * size))
    rows = np.arange(3)[:, None]
    for _ in range(N_ITER):
        m, s = x.mean(axis=1, keepdims=True), x.std(axis=1, keepdims=True)
        f = np.fft.fft2((x - m).reshape(3, size, size))
        y = np.fft.ifft2(amp * np.exp(1j * np.angle(f))).real.reshape(3, -1)
        y = (y - y.mean(axis=1, keepdims=True)) / np.maximum(y.std(axis=1, keepdims=True), 1e-12) * s + m
        # histogram matching by rank: the k-th smallest value becomes the palette's k-th smallest
        order = np.argsort(y, axis=1, kind="stable")
        x = np.empty_like(y)
        x[rows, order] = target
    rgb = basis.T @ x + mean[:, None]
    rgb = rgb - rgb.min()
    rgb = rgb / max(rgb.max(), 1e-12) * 255.0
    return rgb.reshape(3, size, size).transpose(1, 2, 0).astype(np.uint8)


class SpectrumColour(RandomProcess):
    name = "spectrum"
    description = ("Spectrum + Colour: random 1/f^s power spectrum (s ~ U(0.5, 3.5)) with the colour "
                   "histograms of a random palette, decorrelated by PCA (statistical image model)")

    def sizes_ok(self, size: int) -> bool:
        return isinstance(size, (int, np.integer)) and 8 <= size <= 1024

    def size_rule(self) -> str:
        return "an integer from 8 to 1024"

    def _render(self, indices: np.ndarray, *, seed: int, size: int) -> np.ndarray:
        return np.stack([spectrum_colour(self.image_rng(seed, i), size) for i in indices])
