"""The 40-filter bank of StyleGAN-Oriented (Baradad et al. 2021).

Every 3x3 convolution of the Oriented and High-frequency generators uses filters drawn from this
bank instead of Gaussian weights, which is what gives the images their oriented edges and lines:

- 8 zero-mean step edges with their normal at 0, 22.5, ..., 157.5 degrees;
- 8 zero-mean lines (a -1 valley in a +1 field) at the same orientations;
- a delta; a +1 centre with a -1 surround; a plus-shape of ones; a plus of +1 with -1 corners;
- the negatives of these 20.

The oriented filters are the 3x3 centre of a rotated step/line profile sampled at the tap centres
(a ramp of width one pixel across the edge, as bilinear rotation of a pixel-sharp step gives).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

N_ORIENTATIONS = 8
N_FILTERS = 40


def _oriented(profile, theta: float) -> np.ndarray:
    y, x = np.mgrid[-1:2, -1:2].astype(np.float64)
    u = x * np.cos(theta) + y * np.sin(theta)  # signed distance to the edge through the centre
    f = profile(u)
    return f - f.mean()


def _step(u: np.ndarray) -> np.ndarray:
    return np.clip(-u, -1.0, 1.0)


def _line(u: np.ndarray) -> np.ndarray:
    return -1.0 + 2.0 * np.minimum(np.abs(u), 1.0)


@lru_cache(maxsize=None)
def _bank() -> np.ndarray:
    thetas = [np.pi * i / N_ORIENTATIONS for i in range(N_ORIENTATIONS)]
    filters = [_oriented(_step, t) for t in thetas] + [_oriented(_line, t) for t in thetas]
    delta = np.zeros((3, 3))
    delta[1, 1] = 1.0
    centre_surround = -np.ones((3, 3))
    centre_surround[1, 1] = 1.0
    plus = np.zeros((3, 3))
    plus[1, :] = 1.0
    plus[:, 1] = 1.0
    plus_corners = np.where(plus > 0, 1.0, -1.0)
    filters += [delta, centre_surround, plus, plus_corners]
    filters += [-f for f in filters]
    bank = np.stack(filters)
    assert bank.shape == (N_FILTERS, 3, 3)
    bank.setflags(write=False)
    return bank


def filter_bank() -> np.ndarray:
    """The (40, 3, 3) float64 bank, read-only; index ``k + 20`` is the negative of index ``k``."""
    return _bank()


@lru_cache(maxsize=None)
def _energy() -> np.ndarray:
    e = (_bank() ** 2).sum(axis=(1, 2))
    e.setflags(write=False)
    return e


def filter_energy() -> np.ndarray:
    """Squared Frobenius norm of each bank filter, (40,): what demodulation divides by."""
    return _energy()
