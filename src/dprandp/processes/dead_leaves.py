"""Dead leaves: an occlusion model of shapes of random size, position and colour.

Shapes have radius r in [0.03, 1] x size with density proportional to r^-3 (scale invariance),
a uniform centre and a uniform RGB colour. We paint front to back: each pixel takes the colour of
the first shape that covers it, which is the exact dead-leaves image of an infinite sequence of
falling shapes; painting stops when the canvas is covered or after 5,000 shapes (pixels still
uncovered then stay black, as in Baradad et al.'s generator).

Speed: shapes are drawn in chunks of 128; each chunk is tested against the still-uncovered pixels
inside its shapes' bounding boxes, all at once, and each pixel takes its first covering shape.
"""

from __future__ import annotations

import numpy as np

from dprandp.processes.registry import RandomProcess

R_MIN, R_MAX = 0.03, 1.0
MAX_SHAPES = 5000
CHUNK = 128
SHAPES = ("circle", "square", "oriented_square", "rectangle", "triangle", "quadrilateral")


def _radii(rng: np.random.Generator, n: int) -> np.ndarray:
    """Inverse CDF of the density r^-3 on [R_MIN, R_MAX]."""
    u = rng.uniform(size=n)
    a, b = R_MIN**-2, R_MAX**-2
    return (a - u * (a - b)) ** -0.5


def _draw_chunk(rng: np.random.Generator, kinds: tuple[str, ...], size: int) -> dict:
    """Shape parameters for CHUNK shapes: circles by (centre, radius), all others as convex
    polygons with 4 vertices in counter-clockwise order (a triangle repeats one vertex)."""
    kind = rng.integers(0, len(kinds), size=CHUNK) if len(kinds) > 1 else np.zeros(CHUNK, np.int64)
    radius = np.maximum(_radii(rng, CHUNK) * size, 1.0)
    centre = rng.uniform(0, size, size=(CHUNK, 2))
    colour = rng.integers(0, 256, size=(CHUNK, 3), dtype=np.int64).astype(np.uint8)
    angle = rng.uniform(0, 2 * np.pi, size=CHUNK)  # oriented squares and rectangles
    on_circle = np.sort(rng.uniform(0, 2 * np.pi, size=(CHUNK, 4)), axis=1)  # triangles, quads
    names = np.array(kinds)[kind]
    unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) / np.sqrt(2.0)  # CCW
    verts = unit[None] * radius[:, None, None]  # squares (and a circle's unused polygon)
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    rotated = np.stack([verts[..., 0] * c - verts[..., 1] * s, verts[..., 0] * s + verts[..., 1] * c], axis=-1)
    a = angle % (np.pi / 2)
    rect = unit[None] * np.sqrt(2.0) * np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)[:, None, :]
    phi = on_circle.copy()
    tri = names == "triangle"
    phi[tri] = np.sort(on_circle[tri, :3], axis=1)[:, [0, 1, 2, 2]]
    ring = radius[:, None, None] * np.stack([np.cos(phi), np.sin(phi)], axis=-1)
    verts = np.where((names == "oriented_square")[:, None, None], rotated, verts)
    verts = np.where((names == "rectangle")[:, None, None], rect, verts)
    verts = np.where(((names == "triangle") | (names == "quadrilateral"))[:, None, None], ring, verts)
    verts = verts + centre[:, None, :]
    return {"circle": names == "circle", "centre": centre, "radius": radius, "verts": verts, "colour": colour}


def _inside_pairs(x: np.ndarray, y: np.ndarray, sh: dict, j: np.ndarray) -> np.ndarray:
    """Whether pixel centre (x[k], y[k]) lies in shape j[k] of a chunk (pairwise, 1-D)."""
    dx, dy = x - sh["centre"][j, 0], y - sh["centre"][j, 1]
    in_circle = dx * dx + dy * dy <= sh["radius"][j] ** 2
    v = sh["verts"][j]
    in_poly = np.ones_like(in_circle)
    for k in range(4):
        p, q = v[:, k], v[:, (k + 1) % 4]
        in_poly &= (q[:, 0] - p[:, 0]) * (y - p[:, 1]) - (q[:, 1] - p[:, 1]) * (x - p[:, 0]) >= 0
    return np.where(sh["circle"][j], in_circle, in_poly)


def dead_leaves(rng: np.random.Generator, size: int, kinds: tuple[str, ...]) -> tuple[np.ndarray, float]:
    """One (size, size, 3) uint8 image and the fraction of the canvas covered."""
    img = np.zeros((size * size, 3), dtype=np.uint8)
    free = np.arange(size * size)  # flat indices of uncovered pixels, ascending
    drawn = 0
    while free.size and drawn < MAX_SHAPES:
        sh = _draw_chunk(rng, kinds, size)
        n = min(CHUNK, MAX_SHAPES - drawn)
        drawn += n
        ys, xs = np.divmod(free, size)
        lo = sh["centre"][:n] - sh["radius"][:n, None]
        hi = sh["centre"][:n] + sh["radius"][:n, None]
        # candidate (pixel, shape) pairs from bounding boxes, shape by shape so that cost follows
        # the boxes' area rather than pixels x shapes
        pix, shp = [], []
        col_lo = np.searchsorted(ys, np.ceil(lo[:, 1]))
        col_hi = np.searchsorted(ys, np.floor(hi[:, 1]), side="right")
        for j in range(n):
            if col_hi[j] <= col_lo[j]:
                continue
            k = np.arange(col_lo[j], col_hi[j])
            xk = xs[k]
            k = k[(xk >= lo[j, 0]) & (xk <= hi[j, 0])]
            if k.size:
                pix.append(k)
                shp.append(np.full(k.size, j))
        if not pix:
            continue
        pix, shp = np.concatenate(pix), np.concatenate(shp)
        hit = _inside_pairs(xs[pix].astype(float), ys[pix].astype(float), sh, shp)
        pix, shp = pix[hit], shp[hit]
        order = np.lexsort((shp, pix))  # by pixel, then by shape: the first row per pixel wins
        pix, shp = pix[order], shp[order]
        first = np.ones(pix.size, dtype=bool)
        first[1:] = pix[1:] != pix[:-1]
        img[free[pix[first]]] = sh["colour"][shp[first]]
        keep = np.ones(free.size, dtype=bool)
        keep[pix[first]] = False
        free = free[keep]
    return img.reshape(size, size, 3), 1.0 - free.size / (size * size)


class DeadLeaves(RandomProcess):
    def __init__(self, name: str, kinds: tuple[str, ...], description: str):
        self.name, self.kinds, self.description = name, kinds, description

    def sizes_ok(self, size: int) -> bool:
        return isinstance(size, (int, np.integer)) and 8 <= size <= 1024

    def size_rule(self) -> str:
        return "an integer from 8 to 1024"

    def _render(self, indices: np.ndarray, *, seed: int, size: int) -> np.ndarray:
        return np.stack([dead_leaves(self.image_rng(seed, i), size, self.kinds)[0] for i in indices])


def squares() -> DeadLeaves:
    return DeadLeaves("dead-leaves-squares", ("square",),
                      "Dead leaves of axis-aligned squares, radius density r^-3, uniform colours (probe 35.2%)")


def oriented() -> DeadLeaves:
    return DeadLeaves("dead-leaves-oriented", ("oriented_square",),
                      "Dead leaves of randomly rotated squares (probe 37.6%)")


def shapes() -> DeadLeaves:
    return DeadLeaves("dead-leaves-shapes", SHAPES,
                      "Dead leaves of mixed shapes: circles, squares, rotated squares, rectangles, triangles, "
                      "quadrilaterals (probe 39.1%)")
