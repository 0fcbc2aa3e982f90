"""Fast exact evaluation of StyleGAN-Oriented / -High-frequency: no channel is materialised.

Why it is possible. In a layer, weight[o, i] = g_o F[k_i] and the styles s_i scale input channels,
so the demodulated output channel o is c_o * h with one shared map h = sum_i s_i (F[k_i] * x_i)
and c_o = g_o / sqrt(g_o^2 S + eps), S = sum_i s_i^2 |F[k_i]|^2. Without eps, c_o = sign(g_o)/sqrt(S):
every output channel is +-h/sqrt(S) plus the shared noise map n plus its own bias b_o, then
ReLU x sqrt(2). The next layer (and ToRGB) only ever needs weighted sums over channels,
sum_o w_o relu(sigma_o h/sqrt(S) + n + b_o), one per 3x3 tap of the next layer's filters (9)
and per RGB output (3). For one sign sigma this is a piecewise-linear function of the scalar
v = sigma h/sqrt(S) + n with breakpoints -b_o: with channels sorted by -b_o and prefix sums
P1[m] = sum_{j<m} w_j, P2[m] = sum_{j<m} w_j b_j, it equals v P1[m] + P2[m] where m is the number
of breakpoints below v. Per pixel: two binary searches and two table rows instead of 512 channels.

The epsilon. eps = 1e-8 makes c_o differ from sign(g_o)/sqrt(S) by the relative amount
delta_o ~ eps / (2 g_o^2 S), so the trick alone is not exact. Channels with delta_o > 1e-6
(|g_o| below ~1e-3; about 0.4 per layer) are evaluated individually with their exact c_o; for all
others the relative error of a channel is below 1e-6, under float32 accumulation error. So the
fast path computes the same function as the reference to float32 rounding: tests/test_processes.py
bounds the relative error of the network output by 2e-6 (8-32 px), about 3x what is measured
there (<= 6.5e-7; <= 1.8e-6 at 64 px). Rendered uint8 images agree except for rare values at a
rounding boundary.

Determinism. The tables are built for a batch, but every operation acts on one image's row on
its own (elementwise float64 ops, per-row sorts, sequential per-row cumulative sums, per-image
einsum for the first layer); the per-pixel torch part uses only elementwise ops (no fused
multiply-add, no matmul, no reductions), binary search and gathers. So an image's bytes never
depend on which other images share its batch (tested with batches of 1, 5, 32 and 64).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dprandp.processes.filters import filter_bank, filter_energy
from dprandp.processes.stylegan_params import DEMOD_EPS, ImageParams, architecture

EXACT_TOL = 1e-6  # channels whose demodulation deviates more than this are materialised
_SQRT2 = math.sqrt(2.0)
_BANK_T = np.ascontiguousarray(filter_bank().reshape(-1, 9).T)  # (9, 40)


def _row_sum(x: np.ndarray) -> np.ndarray:
    """Sum over axis 1 in a fixed sequential order (cumsum), whatever the batch size."""
    return np.cumsum(x, axis=1)[:, -1]


def _tap_weights(styles: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """(..., 9, C) per-input-channel tap weights of a layer: s_i F[k_i][a, b] (tap index 3a + b)."""
    return styles[..., None, :] * _BANK_T[:, filters].swapaxes(0, -2) if styles.ndim > 1 else (
        styles[None, :] * _BANK_T[:, filters])


def _layer_tables(layer: list, consumers: list) -> dict:
    """Tables of one layer for a batch (numpy, float64, every row computed on its own).

    ``layer``: the layer's ConvParams of each image. ``consumers``: functions that, given a
    (B, C) sorting permutation, return the (B, T_k, C) weights the next layer's taps / the RGB
    layer put on the sorted output channels (ReLU gain included).

    Channels are sorted once by (group, -bias) with group 0 = positive g, 1 = negative g,
    2 = materialised (epsilon matters). The search key is -bias + group (float32 in the search);
    queries are clamped to [-0.5, 0.5] first, so a query of group 1 never lands in group 0 or 2.
    Table columns: [0, n+] prefix sums of group 0; [n+ + 1, n+ + 1 + n-] prefix sums of group 1.
    """
    styles = np.stack([p.styles for p in layer])
    filters = np.stack([p.filters for p in layer])
    g = np.stack([p.gain for p in layer])
    bias = np.stack([p.bias for p in layer])
    b, c_out = g.shape
    s_sum = _row_sum(styles**2 * filter_energy()[filters])[:, None]  # (B, 1)
    kappa = 1.0 / np.sqrt(s_sum)
    c = g / np.sqrt(g * g * s_sum + DEMOD_EPS)
    exceptional = (1.0 - np.abs(c) / kappa) > EXACT_TOL
    group = np.where(exceptional, 2, np.where(g > 0, 0, 1))
    key = -bias + group
    order = np.argsort(key, axis=1)  # ties only within highfreq's zero biases; any fixed order is fine
    w = np.concatenate([f(order) for f in consumers], axis=1)  # (B, T, C), sorted channels
    t = w.shape[1]
    b_sorted = np.take_along_axis(bias, order, axis=1)
    both = torch.from_numpy(np.concatenate([w, w * b_sorted[:, None, :]], axis=1))  # (B, 2T, C) float64
    prefix = torch.cumsum(both, dim=2).numpy()  # sequential per row (torch's is ~2x numpy's here)
    n_plus = (group == 0).sum(axis=1)
    tab = np.empty((b, 2 * t, c_out + 2), dtype=np.float32)
    tab[:, :, 0] = 0.0
    for i in range(b):
        n = n_plus[i]
        tab[i, :, 1 : n + 1] = prefix[i, :, :n]
        tab[i, :, n + 1] = 0.0
        tab[i, :, n + 2 :] = prefix[i, :, n:] - prefix[i, :, n - 1 : n] if n else prefix[i]
    tab = torch.from_numpy(tab)
    n_exc = exceptional.sum(axis=1)
    e_max = int(n_exc.max())
    exc_c = np.zeros((b, e_max))
    exc_b = np.zeros((b, e_max))
    exc_w = np.zeros((b, e_max, t))
    for i in np.flatnonzero(n_exc):  # group 2 sorts last
        pos = order[i, c_out - n_exc[i] :]
        exc_c[i, : pos.size], exc_b[i, : pos.size] = c[i, pos], bias[i, pos]
        exc_w[i, : pos.size] = w[i, :, c_out - pos.size :].T
    exc_n = n_exc.astype(np.int64)
    noise = None if layer[0].noise is None else np.stack([p.noise for p in layer])
    return {
        "kappa": kappa,
        "theta": np.take_along_axis(key, order, axis=1),  # (B, C) sorted keys
        "tab": tab,  # (B, 2T, C + 2)
        "exc_n": exc_n,
        "exc_c": exc_c,
        "exc_b": exc_b,
        "exc_w": exc_w,
        "noise": noise,
    }


def prepare(params: list[ImageParams]) -> list[dict]:
    """Per-layer tables of a batch, in layer order; layer 0 also gets the tap maps of its
    input (the 4x4 constant), computed image by image."""
    per_image = [[p for block in ip.convs for p in block] for ip in params]
    layers = [list(ls) for ls in zip(*per_image)]
    block_of = [bi for bi, block in enumerate(params[0].convs) for _ in block]
    out = []
    for li, layer in enumerate(layers):
        consumers = []
        if li + 1 == len(layers) or block_of[li + 1] != block_of[li]:
            rgb = np.stack([ip.rgbs[block_of[li]].weight * ip.rgbs[block_of[li]].styles for ip in params])
            rgb = rgb * _SQRT2  # (B, 3, C)
            consumers.append(lambda order, rgb=rgb: np.take_along_axis(rgb, order[:, None, :], axis=2))
        if li + 1 < len(layers):
            nxt = layers[li + 1]
            styles = np.stack([p.styles for p in nxt]) * _SQRT2
            filters = np.stack([p.filters for p in nxt])
            consumers.append(
                lambda order, s=styles, f=filters: _tap_weights(
                    np.take_along_axis(s, order, axis=1), np.take_along_axis(f, order, axis=1)
                )
            )
        out.append(_layer_tables(layer, consumers))
    taps = []
    for p in layers[0]:
        w0 = _tap_weights(p.styles, p.filters)  # (9, C)
        x0 = params[len(taps)].const.reshape(w0.shape[1], -1)  # (C, 16)
        taps.append(np.einsum("tc,cp->tp", w0, x0).reshape(9, 4, 4))  # no BLAS, same path per image
    out[0]["input_taps"] = np.stack(taps)
    return out


def _get(prepped: list[dict], li: int, key: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(prepped[li][key], dtype=np.float32))


def _conv_taps(r: torch.Tensor) -> torch.Tensor:
    """Correlation from tap maps: r (B, 9, H, W) -> (B, H, W), zero padding."""
    b, _, h, w = r.shape
    rp = torch.nn.functional.pad(r, (1, 1, 1, 1))
    out = rp[:, 0, 0:h, 0:w].clone()
    for t in range(1, 9):
        a, c = divmod(t, 3)
        out += rp[:, t, a : a + h, c : c + w]
    return out


def _fir_rows(p: torch.Tensor, n: int, axis: int) -> torch.Tensor:
    """out[t] = (p[t] + 3 p[t+1] + 3 p[t+2] + p[t+3]) / 4 along ``axis`` (1 or 2), t < n."""
    def sl(k):
        return p[:, k : k + n] if axis == 1 else p[:, :, k : k + n]

    return ((sl(0) + sl(3)) + (sl(1) + sl(2)) * 3.0) * 0.25


def _upconv_taps(r: torch.Tensor) -> torch.Tensor:
    """Transposed stride-2 conv from tap maps, then the [1,3,3,1] filter: (B, 9, H, W) -> (B, 2H, 2W)."""
    b, _, h, w = r.shape
    v = r.new_zeros(b, 2 * h + 3, 2 * w + 3)  # (2H+1) plus one pixel of padding each side
    for t in range(9):
        a, c = divmod(t, 3)
        v[:, 1 + a : 1 + a + 2 * h : 2, 1 + c : 1 + c + 2 * w : 2] += r[:, t]
    return _fir_rows(_fir_rows(v, 2 * h, 1), 2 * w, 2)


def upsample_rgb(x: torch.Tensor) -> torch.Tensor:
    """Skip-connection upsampling (B, 3, H, W) -> (B, 3, 2H, 2W): (x[m-1] + 3x[m])/4, (3x[m] + x[m+1])/4."""
    def up(x, dim):
        n = x.shape[dim]
        xp = torch.nn.functional.pad(x, (1, 1) if dim == 3 else (0, 0, 1, 1))
        prev, mid, nxt = (xp.narrow(dim, k, n) for k in range(3))
        even = (prev + mid * 3.0) * 0.25
        odd = (mid * 3.0 + nxt) * 0.25
        return torch.stack([even, odd], dim=dim + 1).flatten(dim, dim + 1)

    return up(up(x, 2), 3)


def _layer_forward(h: torch.Tensor, prepped: list[dict], li: int) -> torch.Tensor:
    """h (B, H, W) -> consumer maps (B, T, H, W)."""
    b, hh, ww = h.shape
    hf = h.reshape(b, -1)
    p = hf.shape[1]
    kappa = _get(prepped, li, "kappa")  # (B, 1)
    n = _get(prepped, li, "noise").reshape(b, -1) if prepped[li]["noise"] is not None else torch.zeros_like(hf)
    theta = _get(prepped, li, "theta")  # (B, C)
    tab = prepped[li]["tab"]  # (B, 2T, C+2) float32 tensor
    t = tab.shape[1] // 2
    kh = kappa * hf
    v_pos = kh + n
    v_neg = n - kh
    m_pos = torch.searchsorted(theta, v_pos.clamp(-0.5, 0.5))
    m_neg = torch.searchsorted(theta, v_neg.clamp(-0.5, 0.5) + 1.0) + 1
    rows = torch.gather(tab, 2, m_pos[:, None, :].expand(b, 2 * t, p))  # (B, 2T, P)
    out = rows[:, :t] * v_pos[:, None, :]
    out += rows[:, t:]
    rows = torch.gather(tab, 2, m_neg[:, None, :].expand(b, 2 * t, p))
    out += rows[:, :t] * v_neg[:, None, :]
    out += rows[:, t:]
    counts = prepped[li]["exc_n"]
    if counts.max() > 0:
        exc_c, exc_b, exc_w = (_get(prepped, li, k) for k in ("exc_c", "exc_b", "exc_w"))
        for e in range(int(counts.max())):
            rows_e = torch.from_numpy(np.flatnonzero(counts > e))  # only images with a slot e
            a = torch.relu(exc_c[rows_e, e : e + 1] * hf[rows_e] + n[rows_e] + exc_b[rows_e, e : e + 1])
            out[rows_e] = out[rows_e] + a[:, None, :] * exc_w[rows_e, e, :, None]
    return out.reshape(b, t, hh, ww)


def synthesize_batch(params: list[ImageParams]) -> np.ndarray:
    """(B, 3, S, S) float32 network outputs, equal to :func:`stylegan_reference.synthesize` per image."""
    assert params and not params[0].variant.dense, "the fast path needs bank filters"
    size = params[0].size
    blocks = architecture(size, params[0].variant.channel_max)
    prepped = prepare(params)
    r = _get(prepped, 0, "input_taps")  # (B, 9, 4, 4)
    img = None
    li = 0
    for block in blocks:
        for spec in block.convs:
            h = _upconv_taps(r) if spec.up else _conv_taps(r)
            out = _layer_forward(h, prepped, li)
            li += 1
            if spec is block.convs[-1]:
                rgb = out[:, :3]
                img = rgb if img is None else upsample_rgb(img) + rgb
                r = out[:, 3:]
            else:
                r = out
    return img.numpy()
