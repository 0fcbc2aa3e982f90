"""Noise maps of the StyleGAN random processes: 1/f^alpha random-phase noise under a Laplace envelope.

The original draws alpha ~ U(0.5, 1.5), builds a random-phase spectrum with amplitude 1/|f|^alpha,
multiplies the real image by a 4x4 Laplace(0, 1) envelope upsampled with a Lanczos filter, and
scales to unit standard deviation; every layer then sees the map area-downsampled to its own
resolution. We draw the map at the output size (64 px for the presets) instead of 512 px, and
scale it to unit std there. That is not the same map with fewer pixels: the 512-px map spends part
of its variance on frequencies a 64-px map cannot hold, so after the area downsampling the
original's noise is weaker. Measured over 20 seeds, the std of the map at the 64 / 16 / 4 px layers
is 0.32 / 0.15 / 0.05 in the original against 1.00 / 0.43 / 0.17 here at alpha = 0.5, 0.76 / 0.58 /
0.31 against 1.00 / 0.73 / 0.42 at alpha = 1, and 0.98 / 0.90 / 0.60 against 1.00 / 0.92 / 0.63 at
alpha = 1.5: our per-layer noise is 1.0-3.1x stronger, most at small alpha. ``stylegan-oriented-n512``
renders the original's map (4.8x the render time); on validation its prior tied ours (DP-RandP at
epsilon = 1: 57.7 against 57.5 %, one 15k-image prior each; BENCHMARKS.md ``utility_tuning``, session
25), so the default keeps this map.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def _lanczos3(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    out = np.sinc(x) * np.sinc(x / 3.0)
    return np.where(x < 3.0, out, 0.0)


@lru_cache(maxsize=None)
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) Lanczos-3 upsampling matrix with pixel-centre alignment and edge clamping."""
    m = np.zeros((n_out, n_in))
    centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    for j, c in enumerate(centres):
        taps = np.arange(int(np.floor(c)) - 2, int(np.floor(c)) + 4)
        w = _lanczos3(c - taps)
        for t, wt in zip(np.clip(taps, 0, n_in - 1), w):
            m[j, t] += wt
        m[j] /= m[j].sum()
    m.setflags(write=False)
    return m


@lru_cache(maxsize=None)
def _radial_frequency(size: int) -> np.ndarray:
    """|f| on the half-spectrum grid of ``rfft2`` (size, size // 2 + 1), DC set to 1."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    r = np.sqrt(fx**2 + fy**2)
    r[0, 0] = 1.0
    r.setflags(write=False)
    return r


def pink_noise(rng: np.random.Generator, size: int, alpha: float | None = None) -> np.ndarray:
    """One (size, size) float64 noise map with zero mean and unit std.

    Amplitude 1/|f|^alpha with alpha ~ U(0.5, 1.5) (or the given ``alpha``, for measurements) and
    uniform random phase on the half-spectrum (the real inverse FFT makes it Hermitian), times a
    Lanczos-upsampled 4x4 Laplace envelope."""
    alpha = rng.uniform(0.5, 1.5) if alpha is None else float(alpha)
    amplitude = _radial_frequency(size) ** (-alpha)
    amplitude[0, 0] = 0.0  # no DC
    phase = rng.uniform(0.0, 2.0 * np.pi, size=amplitude.shape)
    field = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(size, size))
    field -= field.mean()
    envelope = rng.laplace(0.0, 1.0, size=(4, 4))
    r = resize_matrix(4, size)
    field *= r @ envelope @ r.T
    std = field.std()
    return field / std if std > 0 else field


def area_pyramid(x: np.ndarray) -> dict[int, np.ndarray]:
    """{res: x area-downsampled to res} for res = size, size/2, ..., 4, each level the 2x2 mean
    of the one above (equal to ``interpolate(mode="area")`` for power-of-two factors)."""
    levels = {x.shape[-1]: x}
    while x.shape[-1] > 4:
        r = x.shape[-1] // 2
        x = x.reshape(r, 2, r, 2).mean(axis=(1, 3))
        levels[r] = x
    return levels
