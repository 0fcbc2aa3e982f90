"""Full-width reference evaluation of the StyleGAN random processes: every channel materialised.

This is the definition the fast path (:mod:`.stylegan_fast`) is tested against, written as the
plain StyleGAN2 operations: modulated 3x3 convolution with demodulation (epsilon included),
transposed-convolution upsampling followed by the [1, 3, 3, 1] low-pass filter, noise, bias,
ReLU x sqrt(2), and the skip architecture's 1x1 ToRGB layers. One image at a time, so the result
of an image never depends on which other images were rendered with it. Slow (~GFLOPs per image
at 512 channels); the Random variant, which has no shortcut, uses it at width 64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dprandp.processes.filters import filter_bank
from dprandp.processes.stylegan_params import DEMOD_EPS, ImageParams, architecture

_FIR = np.array([1.0, 3.0, 3.0, 1.0])


def _fir_2d(dtype) -> torch.Tensor:
    f = _FIR / _FIR.sum() * 2.0  # normalised, times the upsampling gain of 2 per axis
    return torch.tensor(np.outer(f, f), dtype=dtype)


def _depthwise(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    return F.conv2d(x, k.expand(c, 1, *k.shape), groups=c)


def upsample2d(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W): zero insertion, pad (2, 1), 4x4 FIR with gain 4."""
    n, c, h, w = x.shape
    z = x.new_zeros(n, c, 2 * h, 2 * w)
    z[:, :, ::2, ::2] = x
    z = F.pad(z, (2, 1, 2, 1))
    return _depthwise(z, _fir_2d(x.dtype))


def modulated_conv(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, up: bool) -> torch.Tensor:
    """x (1, C_in, H, W), weight (C_out, C_in, 3, 3), styles (C_in,): demodulated 3x3 conv."""
    w = weight * styles[None, :, None, None]
    d = torch.rsqrt(w.square().sum(dim=(1, 2, 3)) + DEMOD_EPS)
    w = w * d[:, None, None, None]
    if not up:
        return F.conv2d(x, w, padding=1)
    y = F.conv_transpose2d(x, w.transpose(0, 1), stride=2)  # (2H+1, 2W+1)
    y = F.pad(y, (1, 1, 1, 1))
    return _depthwise(y, _fir_2d(x.dtype))


def conv_weight(p, dtype) -> torch.Tensor:
    """The full (C_out, C_in, 3, 3) weight of a layer: g_o * F[k_i], or the dense draw."""
    if p.weight is not None:
        return torch.tensor(p.weight, dtype=dtype)
    bank = torch.tensor(filter_bank(), dtype=dtype)
    per_input = bank[torch.from_numpy(p.filters)]  # (C_in, 3, 3)
    return torch.tensor(p.gain, dtype=dtype)[:, None, None, None] * per_input[None]


def synthesize(params: ImageParams, dtype=torch.float64) -> np.ndarray:
    """The network's RGB output for one image, (3, S, S), before colour normalisation."""
    blocks = architecture(params.size, params.variant.channel_max)
    x = torch.tensor(params.const, dtype=dtype)[None]
    img = None
    gain = math.sqrt(2.0)
    for block, layers, rgb in zip(blocks, params.convs, params.rgbs):
        for spec, p in zip(block.convs, layers):
            y = modulated_conv(x, conv_weight(p, dtype), torch.tensor(p.styles, dtype=dtype), spec.up)
            if p.noise is not None:
                y = y + torch.tensor(p.noise, dtype=dtype)[None, None]
            x = torch.relu(y + torch.tensor(p.bias, dtype=dtype)[None, :, None, None]) * gain
        w = torch.tensor(rgb.weight * rgb.styles[None, :], dtype=dtype)
        y = torch.einsum("rc,nchw->nrhw", w, x)
        img = y if img is None else upsample2d(img) + y
    return img[0].numpy()
